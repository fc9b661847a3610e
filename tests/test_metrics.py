"""ClassCounts gives torchmetrics' numbers (it replaced torchmetrics in evaluation for start-up)."""

import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from toolkit.metrics import ClassCounts


def _reference(batches, num_classes):
    kw = dict(num_classes=num_classes, sync_on_compute=False)
    top1 = MulticlassAccuracy(top_k=1, average="micro", **kw)
    topk = MulticlassAccuracy(top_k=min(5, num_classes), average="micro", **kw)
    per_class = MulticlassAccuracy(top_k=1, average="none", **kw)
    confusion = MulticlassConfusionMatrix(**kw)
    for logits, y in batches:
        for m in (top1, topk, per_class, confusion):
            m.update(logits, y)
    return (top1.compute().item(), topk.compute().item(), per_class.compute().tolist(),
            confusion.compute().tolist())


def _ours(batches, num_classes):
    counts = ClassCounts(num_classes, top_k=5)
    for logits, y in batches:
        counts.update(logits, y)
    return counts.acc(), counts.topk_acc(), counts.per_class_acc(), counts.confusion().tolist()


@pytest.mark.parametrize("num_classes,seed", [(10, 0), (10, 1), (3, 2), (35, 3), (7, 4)])
def test_counts_equal_torchmetrics(num_classes, seed):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for size in (17, 64, 1, 33):
        # Coarse logits make ties common; class 0 never appears as a label (absent class).
        logits = torch.randint(0, 4, (size, num_classes), generator=g).float()
        y = torch.randint(1, num_classes, (size,), generator=g)
        batches.append((logits, y))
    assert _ours(batches, num_classes) == _reference(batches, num_classes)


def test_mostly_right_and_empty():
    logits = torch.eye(4)[[0, 1, 2, 3, 0, 1]] * 5  # last two wrong: true classes 2, 3
    y = torch.tensor([0, 1, 2, 3, 2, 3])
    counts = ClassCounts(4)
    counts.update(logits, y)
    assert counts.acc() == pytest.approx(4 / 6)
    assert counts.per_class_acc() == [1.0, 1.0, 0.5, 0.5]
    assert counts.topk_acc() == 1.0  # top_k is capped at the 4 classes
    assert counts.count == 6
    empty = ClassCounts(3)
    assert (empty.acc(), empty.topk_acc(), empty.per_class_acc()) == (0.0, 0.0, [0.0, 0.0, 0.0])
