"""Losses by name: `LOSSES.build(name, **loss_config)` -> module mapping (logits, targets) -> loss.

Every loss takes `reduction` so evaluation can ask for per-sample values (exact means under DDP).
"""

from torch import nn

from toolkit.registry import Registry

LOSSES = Registry("loss")


@LOSSES.register("cross_entropy")
def cross_entropy(label_smoothing: float = 0.0, reduction: str = "mean") -> nn.Module:
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing, reduction=reduction)
