"""Losses by name: `LOSSES.build(name, **loss_section)` -> module mapping (logits, targets) -> loss.

Every loss takes `reduction`: training uses the configured one; evaluation asks for "none"
(one value per sample) so that the mean over a split is exact under any world size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.registry import Registry

LOSSES = Registry("loss")


@LOSSES.register("cross_entropy")
def cross_entropy(label_smoothing: float = 0.0, reduction: str = "mean", **_) -> nn.Module:
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing, reduction=reduction)


class SoftmaxSquaredError(nn.Module):
    """Squared error between softmax(logits) and one-hot targets (E4's "squared" and "MSE").

    per-sample value: the sum (squared) or the mean (mse) over classes.
    reduction "batch_sum": sum over the batch too (E4's squared loss); "mean": mean over samples;
    "none": (B,)."""

    def __init__(self, per_sample: str, reduction: str):
        super().__init__()
        self.per_sample, self.reduction = per_sample, reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        p = logits.float().softmax(dim=1)  # (B, C)
        onehot = F.one_hot(target, num_classes=logits.shape[1]).to(p.dtype)
        err = (p - onehot).pow(2)
        per = err.sum(1) if self.per_sample == "sum" else err.mean(1)  # (B,)
        if self.reduction == "none":
            return per
        return per.sum() if self.reduction == "batch_sum" else per.mean()


@LOSSES.register("squared")
def squared(reduction: str = "mean", **_) -> nn.Module:
    """Sum of squared errors over classes and over the batch (so it grows with batch size)."""
    return SoftmaxSquaredError("sum", "none" if reduction == "none" else "batch_sum")


@LOSSES.register("mse")
def mse(reduction: str = "mean", **_) -> nn.Module:
    """Mean squared error over classes and samples (torch's F.mse_loss on probabilities)."""
    return SoftmaxSquaredError("mean", reduction)
