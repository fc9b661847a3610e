"""Batch-hard triplet loss, the PK sampler, and triplet training through the CLI (1 and 2 processes)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import DEMO, launch, ok, summary, train
from toolkit.data.samplers import PKSampler
from toolkit.losses import LOSSES


def test_batch_hard_triplet_by_hand_euclidean():
    f = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0], [0.0, 5.0]])
    y = torch.tensor([0, 0, 1, 1])
    loss = LOSSES.build("triplet", distance="euclidean", margin=0.5, reduction="none")
    # anchor 0: hardest positive 1 (d=1), hardest negative 2 (d=3) -> relu(1 - 3 + .5) = 0
    # anchor 1: pos 0 (1), neg 2 (sqrt(10)) -> 0; anchor 2: pos 3 (2), neg 0 (3) -> 0
    # anchor 3: pos 2 (2), neg 1 (sqrt(26)) -> 0
    assert loss(torch.zeros(4, 2), y, features=f).tolist() == pytest.approx([0, 0, 0, 0], abs=1e-5)
    loss = LOSSES.build("triplet", distance="euclidean", margin=2.5, reduction="none")
    expected = [1 - 3 + 2.5, 1 - 10 ** 0.5 + 2.5, 2 - 3 + 2.5, 2 - 26 ** 0.5 + 2.5]
    assert loss(torch.zeros(4, 2), y, features=f).tolist() == pytest.approx([max(0, e) for e in expected], abs=1e-5)


def test_cosine_distance_and_ce_term():
    f = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
    y = torch.tensor([0, 0, 1, 1])
    logits = torch.randn(4, 2)
    tri = LOSSES.build("triplet", distance="cosine", margin=0.25, reduction="none")
    d = 1 - F.normalize(f, dim=1) @ F.normalize(f, dim=1).T
    a0 = max(0.0, d[0, 1] - min(d[0, 2], d[0, 3]) + 0.25)
    assert tri(logits, y, features=f)[0].item() == pytest.approx(float(a0), abs=1e-6)
    both = LOSSES.build("triplet", distance="cosine", margin=0.25, ce_weight=2.0)
    ce = F.cross_entropy(logits, y)
    assert both(logits, y, features=f).item() == pytest.approx(tri(logits, y, features=f).mean().item() + 2 * ce.item(), rel=1e-5)


def test_anchors_without_positive_or_negative_count_zero_and_grads_are_finite():
    f = torch.zeros(3, 4, requires_grad=True)  # identical features: the euclidean sqrt at 0
    loss = LOSSES.build("triplet", distance="euclidean")(torch.zeros(3, 2), torch.tensor([0, 0, 1]), features=f)
    loss.backward()
    assert torch.isfinite(f.grad).all()
    single = LOSSES.build("triplet", reduction="none")(torch.zeros(2, 2), torch.tensor([0, 1]), features=torch.randn(2, 3))
    assert single.tolist() == [0.0, 0.0]  # no positives at all


def test_pk_sampler_batches():
    labels = torch.arange(200) % 10
    s = PKSampler(labels, p=4, k=3, seed=0)
    order = list(s)
    assert len(order) == len(s) == (200 // 12) * 12
    for b in range(0, len(order), 12):
        batch = labels[order[b:b + 12]]
        groups = batch.view(4, 3)
        assert (groups == groups[:, :1]).all() and len(set(groups[:, 0].tolist())) == 4  # 4 classes x 3
    s.set_epoch(0)
    assert list(s) == order
    s.set_epoch(1)
    assert list(s) != order
    with pytest.raises(ValueError, match="P=11 classes"):
        PKSampler(labels, p=11, k=2, seed=0)


@pytest.mark.slow
def test_triplet_with_ce_trains_with_pk_batches(tmp_path):
    args = ["--config", DEMO, "loss.name=triplet", "loss.ce_weight=1.0", "data.sampler=pk", "data.pk_k=4",
            "optim.name=adam", "optim.lr=0.001", "optim.weight_decay=0",
            "train.epochs=3", "sched.milestones=[]", "log.tensorboard=false"]
    ok(train([*args, f"run.dir={tmp_path / 'one'}"]))
    s1 = summary(tmp_path / "one")
    assert s1["test_acc"] > 0.7 and s1["num_test_samples"] == 360
    ok(launch([*args, f"run.dir={tmp_path / 'two'}"]))  # 16 per rank = 4 whole classes each
    s2 = summary(tmp_path / "two")
    assert s2["world_size"] == 2 and abs(s2["test_acc"] - s1["test_acc"]) < 0.05


@pytest.mark.slow
def test_pk_batch_must_split_into_whole_classes(tmp_path):
    proc = train(["--config", DEMO, "data.sampler=pk", "data.pk_k=5", f"run.dir={tmp_path / 'r'}"], timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: config: data.batch_size: 32 must be a multiple of data.pk_k (5) for the pk sampler"
