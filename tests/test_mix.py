"""Mixup / CutMix: soft labels that match the pixels mixed, losses that take them, and runs
through the CLI that train and resume exactly."""

from __future__ import annotations

import pytest
import torch

from helpers import DEMO, assert_same_weights, metrics, ok, summary, train
from toolkit.config import load_config
from toolkit.data.mix import BatchMix
from toolkit.errors import ConfigError
from toolkit.losses import LOSSES


def _batch(b=6, k=5):
    x = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, 8, 8).clone()  # image i is all i
    return x, torch.arange(b) % k


def test_mixup_blends_each_image_with_the_previous_one_and_labels_follow():
    x, y = _batch()
    torch.manual_seed(0)
    xm, t = BatchMix(mixup_alpha=0.4, cutmix_alpha=0.0, num_classes=5)(x, y)
    lam = t[1, y[1]].item()  # image 1 (class 1) with image 0 (class 0)
    assert 0 < lam < 1
    torch.testing.assert_close(xm[1], x[1] * lam + x[0] * (1 - lam))
    torch.testing.assert_close(t.sum(1), torch.ones(6))
    assert t[1, 0].item() == pytest.approx(1 - lam)


def test_cutmix_label_weight_is_the_share_of_pixels_kept():
    x, y = _batch()
    for seed in range(5):
        torch.manual_seed(seed)
        xm, t = BatchMix(mixup_alpha=0.0, cutmix_alpha=1.0, num_classes=5)(x, y)
        kept = (xm[2] == 2).float().mean().item()  # image 2's own pixels; the patch comes from image 1
        assert t[2, 2].item() == pytest.approx(kept) and t[2, 1].item() == pytest.approx(1 - kept)
        assert set(xm[2].unique().tolist()) <= {1.0, 2.0}


def test_same_rng_state_same_mix():
    x, y = _batch()
    mix = BatchMix(mixup_alpha=0.2, cutmix_alpha=1.0, num_classes=5)
    torch.manual_seed(3)
    a = mix(x, y)
    torch.manual_seed(3)
    b = mix(x, y)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("name", ["cross_entropy", "squared", "mse"])
def test_soft_label_losses_equal_hard_ones_on_one_hot_targets(name):
    logits, y = torch.randn(6, 5), torch.randint(0, 5, (6,))
    loss = LOSSES.build(name)
    torch.testing.assert_close(loss(logits, torch.nn.functional.one_hot(y, 5).float()), loss(logits, y))


def test_triplet_with_mixup_is_refused():
    with pytest.raises(ConfigError, match="data.mixup_alpha: mixup/CutMix make soft labels"):
        load_config(DEMO, ["loss.name=triplet", "data.sampler=pk", "data.mixup_alpha=0.2"])
    with pytest.raises(ConfigError, match="data.cutmix_alpha: must be >= 0"):
        load_config(DEMO, ["data.cutmix_alpha=-1"])


@pytest.mark.slow
def test_mixup_run_trains_and_resumes_exactly(tmp_path):
    args = ["--config", DEMO, "train.epochs=3", "sched.milestones=[]", "log.tensorboard=false", "log.plots=false",
            "data.mixup_alpha=0.2", "data.cutmix_alpha=1.0", "optim.lr=0.05"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    ok(train([*args, f"run.dir={full}"]))
    rows = [r for r in metrics(full) if r["kind"] == "epoch"]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] and summary(full)["test_acc"] > 0.3  # chance: 0.1
    killed = train([*args, f"run.dir={resumed}"], env={"TOOLKIT_FAULT_KILL_AT_STEP": "50"})
    assert killed.returncode != 0
    ok(train([*args, f"run.dir={resumed}", "train.resume=auto"]))
    assert_same_weights(full / "model.safetensors", resumed / "model.safetensors")
