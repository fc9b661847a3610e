"""Augmentation presets: shape, determinism, world-size invariance, and that they augment."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from toolkit.data.augment import AUGMENTS

MEAN, STD = [0.4, 0.45, 0.5], [0.2, 0.25, 0.3]
PRESETS = [n for n in AUGMENTS.names() if n != "none"]


def batch(b=8, size=32):
    g = torch.Generator().manual_seed(0)
    img = torch.rand(b, 3, size, size, generator=g)  # a [0, 1] image, then normalised
    return (img - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def build(name):
    return AUGMENTS.build(name, mean=MEAN, std=STD, image_size=32)


def test_the_presets_the_experiments_name_exist():
    assert {"none", "crop", "flip_crop", "rotate_flip", "imagenet", "randaugment", "autoaugment"} <= set(AUGMENTS.names())


@pytest.mark.parametrize("name", PRESETS)
def test_preset_keeps_shape_and_changes_images(name):
    x = batch()
    torch.manual_seed(1)
    y = build(name)(x)
    assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()
    assert not torch.allclose(y, x), "nothing was augmented"


@pytest.mark.parametrize("name", PRESETS)
def test_preset_is_deterministic_and_world_size_invariant(name):
    """Two ranks augmenting their halves == one process augmenting the whole global batch,
    and the global RNG ends in the same state (so the next step matches too)."""
    x = batch()
    aug = build(name)
    torch.manual_seed(7)
    whole = aug(x)
    after_whole = torch.rand(3)
    halves = []
    for start in (0, 4):  # each "rank" starts from the same RNG state
        torch.manual_seed(7)
        halves.append(aug(x[start:start + 4], start=start, total=8))
        after_half = torch.rand(3)
        assert torch.equal(after_half, after_whole)
    torch.testing.assert_close(torch.cat(halves), whole, rtol=0, atol=1e-5)
    torch.manual_seed(7)
    torch.testing.assert_close(aug(x), whole, rtol=0, atol=0)


def test_flip_crop_output_is_a_crop_or_its_mirror():
    x = batch(b=16)
    torch.manual_seed(3)
    y = build("flip_crop")(x)
    xp = F.pad(x, (4, 4, 4, 4), mode="replicate")
    flipped = 0
    for i in range(16):
        crops = [xp[i, :, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
        if any(torch.equal(y[i], c) for c in crops):
            continue
        assert any(torch.equal(y[i], c.flip(2)) for c in crops), f"sample {i} is neither"
        flipped += 1
    assert 0 < flipped < 16


def test_per_image_presets_stay_in_the_normalised_range():
    x = batch()
    lo = ((0 - torch.tensor(MEAN)) / torch.tensor(STD)).view(1, 3, 1, 1)
    hi = ((1 - torch.tensor(MEAN)) / torch.tensor(STD)).view(1, 3, 1, 1)
    for name in ("rotate_flip", "imagenet", "randaugment", "autoaugment"):
        y = build(name)(x)
        assert (y >= lo - 1e-4).all() and (y <= hi + 1e-4).all(), name
