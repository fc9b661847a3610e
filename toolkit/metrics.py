"""Classification counts: accuracy, top-k accuracy, per-class accuracy and the confusion matrix.

    counts = ClassCounts(num_classes, top_k=5, device=device)
    counts.update(logits, labels)        # (B, C), (B,), as many batches as the split has
    counts.acc(), counts.topk_acc(), counts.per_class_acc(), counts.confusion()

Everything derives from integer counts (a C x C confusion matrix and the top-k hits), so the
result does not depend on how the split was batched or spread over processes. The numbers equal
torchmetrics' `MulticlassAccuracy` (micro, top-1 and top-k; `average="none"`) and
`MulticlassConfusionMatrix`, which the suite checks; this file exists because importing
torchmetrics costs ~2.5 s of start-up (it imports torchvision's model zoo) for four counts.
"""

from __future__ import annotations

from typing import List

import torch


class ClassCounts:
    """Running counts for one split. `confusion[t, p]` counts samples of class t predicted as p;
    the prediction is the arg-max of the logits (the first class among equal maxima)."""

    def __init__(self, num_classes: int, top_k: int = 5, device: torch.device | str = "cpu"):
        self.num_classes = num_classes
        self.top_k = min(top_k, num_classes)
        self._confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
        self._topk_hits = torch.zeros((), dtype=torch.int64, device=device)

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """logits (B, C), labels (B,) integer classes in [0, C)."""
        labels = labels.to(self._confusion.device, torch.int64)
        logits = logits.to(self._confusion.device)
        pred = logits.argmax(dim=1)  # (B,)
        self._confusion += torch.bincount(labels * self.num_classes + pred,
                                          minlength=self.num_classes ** 2)
        top = logits.topk(self.top_k, dim=1).indices  # (B, k)
        self._topk_hits += (top == labels[:, None]).any(dim=1).sum()

    @property
    def count(self) -> int:
        return int(self._confusion.sum())

    def confusion(self) -> torch.Tensor:
        """(C, C) int64: rows are true classes, columns predicted classes."""
        return self._confusion.view(self.num_classes, self.num_classes)

    # Ratios are float32 divisions of the counts, as torchmetrics computes them, so a run's
    # summary carries the same numbers as before the switch; an empty split gives 0.
    def acc(self) -> float:
        return _ratio(self.confusion().trace(), self._confusion.sum())

    def topk_acc(self) -> float:
        return _ratio(self._topk_hits, self._confusion.sum())

    def per_class_acc(self) -> List[float]:
        """Recall of each class; 0.0 for a class with no samples in the split."""
        cm = self.confusion()
        support = cm.sum(dim=1).float()
        hits = cm.diagonal().float()
        return torch.where(support > 0, hits / support.clamp(min=1), torch.zeros_like(hits)).tolist()


def _ratio(num: torch.Tensor, den: torch.Tensor) -> float:
    return (num.float() / den.float()).item() if int(den) > 0 else 0.0
