"""Losses by name: `LOSSES.build(name, **loss_section)` -> module mapping (logits, targets) -> loss.

Every loss takes `reduction`: training uses the configured one; evaluation asks for "none"
(one value per sample) so that the mean over a split is exact under any world size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.catalog import LOSSES


@LOSSES.register("cross_entropy")
def cross_entropy(label_smoothing: float = 0.0, reduction: str = "mean", **_) -> nn.Module:
    """Cross-entropy on the logits, with optional label smoothing (loss.label_smoothing)."""
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
        if target.ndim == 2:  # soft labels (mixup/CutMix): (B, C) rows summing to 1
            onehot = target.to(p.dtype)
        else:
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


class BatchHardTriplet(nn.Module):
    """Batch-hard triplet loss on the penultimate features (Hermans et al., 2017), optionally
    plus `ce_weight` x cross-entropy on the logits.

    For each anchor: the farthest sample of its class and the nearest sample of another class;
    loss = relu(d(a, p) - d(a, n) + margin). `distance`: "cosine" (1 - cosine similarity) or
    "euclidean". Anchors without a positive or a negative in the batch contribute 0, so use the
    PK sampler (`data.sampler=pk`), which puts K images of each of P classes in every batch.
    """

    needs_features = True

    def __init__(self, margin: float, distance: str, ce_weight: float, label_smoothing: float,
                 reduction: str):
        super().__init__()
        self.margin, self.distance, self.ce_weight, self.reduction = margin, distance, ce_weight, reduction
        self.ce = nn.CrossEntropyLoss(label_smoothing=label_smoothing, reduction="none")

    def distances(self, f: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, B)."""
        f = f.float()
        if self.distance == "cosine":
            f = F.normalize(f, dim=1)
            return 1 - f @ f.T
        sq = f.pow(2).sum(1)
        return (sq[:, None] + sq[None, :] - 2 * f @ f.T).clamp(min=0).add(1e-12).sqrt()  # eps: finite grad at 0

    def forward(self, logits: torch.Tensor, target: torch.Tensor,
                features: torch.Tensor | None = None) -> torch.Tensor:
        if features is None:
            raise ValueError("the triplet loss needs the model's penultimate features")
        d = self.distances(features)
        same = target[:, None] == target[None, :]
        eye = torch.eye(len(target), dtype=torch.bool, device=target.device)
        pos, neg = same & ~eye, ~same
        d_ap = d.masked_fill(~pos, float("-inf")).max(1).values  # hardest positive
        d_an = d.masked_fill(~neg, float("inf")).min(1).values  # hardest negative
        valid = pos.any(1) & neg.any(1)
        per = torch.where(valid, F.relu(d_ap - d_an + self.margin), torch.zeros_like(d_ap))  # (B,)
        if self.ce_weight > 0:
            per = per + self.ce_weight * self.ce(logits.float(), target)
        return per if self.reduction == "none" else per.mean()


@LOSSES.register("triplet")
def triplet(margin: float = 0.25, distance: str = "cosine", ce_weight: float = 0.0,
            label_smoothing: float = 0.0, reduction: str = "mean", **_) -> nn.Module:
    """Batch-hard triplet loss on the penultimate features (loss.margin, loss.distance), + loss.ce_weight x CE."""
    return BatchHardTriplet(margin, distance, ce_weight, label_smoothing, reduction)
