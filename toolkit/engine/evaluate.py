"""Evaluation, exact under any world size, and the feature tap that losses and plots read.

    metrics = evaluate(model, criterion, loader, accelerator, num_classes)
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import torch
from accelerate import Accelerator
from torch import nn

from toolkit.metrics import ClassCounts
from toolkit.models import set_train_mode
from toolkit.models.freeze import unwrap


class FeatureTap:
    """Captures the input of the model's `classifier` (the penultimate features) on every
    forward pass, for losses that need them. A hook inside the forward, so it works through
    DDP, whose gradient sync only sees calls to the wrapped model itself."""

    def __init__(self, model: nn.Module):
        self.features: Optional[torch.Tensor] = None
        self._handle = unwrap(model).classifier.register_forward_pre_hook(self._hook)

    def _hook(self, _module: nn.Module, args: tuple) -> None:
        self.features = args[0]  # (B, D)

    def remove(self) -> None:
        self._handle.remove()


@torch.no_grad()
def evaluate(model: nn.Module, criterion: nn.Module, loader, accelerator: Accelerator,
             num_classes: int, channels_last: bool = False, tap: Optional[FeatureTap] = None,
             keep: Optional[torch.Tensor] = None, tta: str = "none",
             normalize: Optional[Callable] = None) -> Dict[str, Any]:
    """Exact under any world size: gather_for_metrics drops the sampler's padding, so every
    sample counts once. Each rank counts the gathered batch (no metric sync).

    keep: sorted positions in the split whose penultimate features (and labels) to return, as
    "features" (n, D) and "labels" (n,) on the CPU, for the feature plots.
    tta="flip": logits are the mean of the image's and its mirror image's; the features are the
    image's own (the mirror is run first, so the tap holds the original's).
    normalize: for a loader of uint8 items, their normalisation (run on the device)."""
    model.eval()
    device = accelerator.device
    counts = ClassCounts(num_classes, top_k=5, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    own_tap = FeatureTap(model) if keep is not None and tap is None else None
    feature_tap = tap or own_tap
    # A compiled forward does not run hooks added after it was traced (torch.compile guards
    # skip module hooks): when the features are tapped, evaluate through the plain module.
    forward = unwrap(model) if feature_tap is not None else model
    kept_f: List[torch.Tensor] = []
    kept_y: List[torch.Tensor] = []
    count = 0
    try:
        for x, y in loader:
            if normalize is not None:  # uint8 items -> float32, on the device
                x = normalize(x)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with accelerator.autocast():
                mirrored = forward(x.flip(3)) if tta == "flip" else None
                logits = forward(x)  # (B, C)
            if mirrored is not None:
                logits = (logits.float() + mirrored.float()) / 2
            if feature_tap is None:
                logits, y = accelerator.gather_for_metrics((logits.float(), y))  # (N_batch, C), (N_batch,)
                feats = None
            else:  # the loss or the plots need the features too: gather them with the logits
                logits, feats, y = accelerator.gather_for_metrics(
                    (logits.float(), feature_tap.features.flatten(1).float(), y))  # ..., (N_batch, D), ...
            if tap is None:
                loss_sum += criterion(logits, y).double().sum()
            else:
                loss_sum += criterion(logits, y, features=feats).double().sum()
            if keep is not None:
                sel = keep[(keep >= count) & (keep < count + y.shape[0])] - count
                kept_f.append(feats[sel.to(feats.device)].cpu())
                kept_y.append(y[sel.to(y.device)].cpu())
            count += y.shape[0]
            counts.update(logits, y)
    finally:
        if own_tap is not None:
            own_tap.remove()
    set_train_mode(model)
    out = {"acc": counts.acc(), "top5": counts.topk_acc(),
           "loss": (loss_sum / max(count, 1)).item(), "num_samples": count,
           "per_class_acc": counts.per_class_acc(),
           "confusion": counts.confusion().cpu().tolist()}
    if keep is not None:
        out["features"] = torch.cat(kept_f) if kept_f else torch.zeros(0)
        out["labels"] = torch.cat(kept_y) if kept_y else torch.zeros(0, dtype=torch.long)
    return out


def plot_sample(n: int, most: int, seed: int) -> Optional[torch.Tensor]:
    """Sorted positions of up to `most` samples out of n (seeded), or None for none."""
    if most <= 0 or n == 0:
        return None
    if n <= most:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:most].sort().values
