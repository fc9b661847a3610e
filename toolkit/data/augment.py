"""Training-batch augmentations by name, applied on the device to whole batches.

    aug = AUGMENTS.build("flip_crop", mean=MEAN, std=STD, image_size=32)
    x = aug(x, start=rank * b, total=world * b)      # (b, C, H, W) -> (b, C, H, W)

Every preset draws its random numbers for the whole global batch and keeps this rank's slice
(`start`, `total`): all ranks hold the same RNG state, so N processes augment exactly as one
process would. The draws come from the device's global RNG, which every checkpoint saves, so a
resumed run draws the same numbers as an uninterrupted one. Presets built on torchvision's
per-image transforms (rotate_flip, imagenet, randaugment, autoaugment) get one seed per image
from that draw and run under a forked RNG, which keeps the same two guarantees.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from toolkit.catalog import AUGMENTS

Augment = Callable[..., torch.Tensor]


@AUGMENTS.register("none")
def none(**_) -> None:
    """No augmentation: training batches as the dataset gives them."""
    return None


def _slice(t: torch.Tensor, start: int, b: int) -> torch.Tensor:
    return t[start:start + b]


def random_crop(x: torch.Tensor, pad: int, start: int = 0, total: Optional[int] = None) -> torch.Tensor:
    """Pad each side by `pad` (edge values) and crop back at a random offset per sample.

    x is samples start..start+B of a global batch of `total`."""
    b, _, h, w = x.shape
    total = b if total is None else total
    xp = F.pad(x, (pad, pad, pad, pad), mode="replicate")  # (B, C, H+2p, W+2p)
    dy = _slice(torch.randint(0, 2 * pad + 1, (total,), device=x.device), start, b)
    dx = _slice(torch.randint(0, 2 * pad + 1, (total,), device=x.device), start, b)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (B, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (B, 1, W)
    out = xp[torch.arange(b, device=x.device)[:, None, None], :, rows, cols]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def random_hflip(x: torch.Tensor, start: int = 0, total: Optional[int] = None) -> torch.Tensor:
    b = x.shape[0]
    total = b if total is None else total
    flip = _slice(torch.rand(total, device=x.device) < 0.5, start, b)  # (B,)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


class Crop:
    def __init__(self, pad: int, flip: bool):
        self.pad, self.flip = pad, flip

    def __call__(self, x: torch.Tensor, start: int = 0, total: Optional[int] = None) -> torch.Tensor:
        x = random_crop(x, self.pad, start, total)
        return random_hflip(x, start, total) if self.flip else x


@AUGMENTS.register("crop")
def crop(pad: int = 4, **_) -> Augment:
    """Random translation by up to `pad` pixels (torchvision's RandomCrop(size, padding)); no flip."""
    return Crop(pad, flip=False)


@AUGMENTS.register("flip_crop")
def flip_crop(pad: int = 4, **_) -> Augment:
    """CIFAR's standard: pad 4 + random crop back to size + horizontal flip."""
    return Crop(pad, flip=True)


class PerImage:
    """A torchvision per-image transform on normalised float batches, one seed per image.

    Images are mapped back to [0, 1] (or uint8 where the transform needs it), transformed,
    and normalised again."""

    def __init__(self, transform: Callable, mean: Sequence[float], std: Sequence[float], uint8: bool):
        self.transform, self.uint8 = transform, uint8
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)

    def __call__(self, x: torch.Tensor, start: int = 0, total: Optional[int] = None) -> torch.Tensor:
        b = x.shape[0]
        total = b if total is None else total
        seeds = _slice(torch.randint(0, 2**62, (total,), device=x.device), start, b).tolist()
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        img = (x * std + mean).clamp(0, 1)  # (B, C, H, W) in [0, 1]
        if self.uint8:
            img = (img * 255).round().to(torch.uint8)
        out = []
        for i, seed in enumerate(seeds):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                out.append(self.transform(img[i]))
        y = torch.stack(out)
        if self.uint8:
            y = y.float() / 255
        return (y.to(x.dtype) - mean) / std


def _v2():
    from torchvision.transforms import v2

    return v2


@AUGMENTS.register("rotate_flip")
def rotate_flip(mean: Sequence[float] = (0.5,) * 3, std: Sequence[float] = (0.5,) * 3, degrees: float = 15,
                **_) -> Augment:
    """E4's augmentation: random rotation within +-15 degrees and horizontal flip."""
    v2 = _v2()
    return PerImage(v2.Compose([v2.RandomRotation(degrees), v2.RandomHorizontalFlip()]), mean, std, uint8=False)


@AUGMENTS.register("imagenet")
def imagenet(mean: Sequence[float] = (0.5,) * 3, std: Sequence[float] = (0.5,) * 3,
             image_size: int = 224, **_) -> Augment:
    """RandomResizedCrop(image_size, scale 0.08-1) + horizontal flip, torchvision's ImageNet recipe."""
    v2 = _v2()
    return PerImage(v2.Compose([v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()]),
                    mean, std, uint8=False)


@AUGMENTS.register("randaugment")
def randaugment(mean: Sequence[float] = (0.5,) * 3, std: Sequence[float] = (0.5,) * 3, **_) -> Augment:
    """RandAugment (2 ops, magnitude 9) + horizontal flip."""
    v2 = _v2()
    return PerImage(v2.Compose([v2.RandAugment(), v2.RandomHorizontalFlip()]), mean, std, uint8=True)


@AUGMENTS.register("autoaugment")
def autoaugment(mean: Sequence[float] = (0.5,) * 3, std: Sequence[float] = (0.5,) * 3, **_) -> Augment:
    """AutoAugment's CIFAR-10 policy + horizontal flip."""
    v2 = _v2()
    return PerImage(v2.Compose([v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10), v2.RandomHorizontalFlip()]),
                    mean, std, uint8=True)
