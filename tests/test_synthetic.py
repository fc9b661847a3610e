"""The synthetic dataset: sizes, dtype, seeding, and a CLI run at another image size."""

from __future__ import annotations

import pytest
import torch

from helpers import DEMO, ok, summary, train
from toolkit.data import DATASETS


def test_synthetic_sizes_and_seeding():
    s = DATASETS.build("synthetic", split_seed=0, limit=None, image_size=None)
    assert (len(s.train), len(s.val), len(s.test)) == (5000, 1000, 1000) and s.num_classes == 10
    assert s.train.images.dtype == torch.uint8 and s.train.images.shape[1:] == (3, 32, 32)
    x, _ = s.train.__getitems__(list(range(256)))
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05  # normalised
    a = DATASETS.build("synthetic", split_seed=0, limit=10, image_size=64)
    b = DATASETS.build("synthetic", split_seed=0, limit=10, image_size=64)
    c = DATASETS.build("synthetic", split_seed=1, limit=10, image_size=64)
    assert a.train.images.shape == (10, 3, 64, 64) and len(a.test) == 10
    assert torch.equal(a.train.images, b.train.images) and not torch.equal(a.train.images, c.train.images)


@pytest.mark.slow
def test_synthetic_through_the_cli(tmp_path):
    run = tmp_path / "run"
    ok(train(["--config", DEMO, "data.name=synthetic", "data.image_size=48", "data.limit=96", "data.augment=flip_crop",
              "model.name=base_cnn", "train.epochs=1", "sched.milestones=[]", f"run.dir={run}",
              "log.tensorboard=false"]))
    s = summary(run)
    assert s["num_test_samples"] == 96 and s["steps"] == 3
