"""Freezing parts of a model (E4: frozen ImageNet backbone, only the classifier trained; or the
two-stage triplet recipe: features first with the classifier frozen, then the classifier).

    apply_freeze(model, "backbone")   # before building the optimizer and before DDP/prepare
    ...
    set_train_mode(model)             # instead of model.train() at the start of each epoch

Every model in MODELS exposes `model.classifier` (the last layer(s)); "backbone" is every
parameter outside it.

Wrapped models: pass the plain module (`accelerator.unwrap_model(model)`). For convenience both
functions also peel DDP / DataParallel (`.module`) and torch.compile (`._orig_mod`) wrappers
themselves, and set_train_mode calls `.train()` on what it was given, so passing the wrapper
works too. Call apply_freeze BEFORE wrapping in DDP (DDP registers the trainable parameters
when it is built) and before building the optimizer (toolkit.optim.param_groups skips frozen
parameters); changing the freeze mode mid-run means re-wrapping and a new optimizer.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from toolkit.errors import ConfigError

FREEZE_MODES = ("none", "backbone", "classifier")


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _classifier(model: nn.Module) -> nn.Module:
    head = getattr(model, "classifier", None)
    if not isinstance(head, nn.Module):
        raise ConfigError(f"model.freeze: {type(model).__name__} has no `classifier` module to "
                          f"freeze around")
    return head


def apply_freeze(model: nn.Module, mode: str) -> nn.Module:
    """Set requires_grad for MODE, as an absolute state (calling it again with another mode
    switches, it does not accumulate):

    * "none": every parameter trainable;
    * "backbone": only `model.classifier`'s parameters trainable, all others frozen;
    * "classifier": `model.classifier` frozen, all others trainable.

    Returns MODEL (as given). Unknown mode -> one-line ConfigError.
    """
    if mode not in FREEZE_MODES:
        raise ConfigError(f"model.freeze: unknown freeze mode {mode!r}; choose one of: "
                          f"{', '.join(FREEZE_MODES)}")
    inner = unwrap(model)
    head_ids = {id(p) for p in _classifier(inner).parameters()}
    for p in inner.parameters():
        in_head = id(p) in head_ids
        if mode == "none":
            p.requires_grad_(True)
        elif mode == "backbone":
            p.requires_grad_(in_head)
        else:
            p.requires_grad_(not in_head)
    return model


def _all_frozen(params: Iterable[nn.Parameter]) -> bool:
    params = list(params)
    return bool(params) and not any(p.requires_grad for p in params)


def set_train_mode(model: nn.Module) -> nn.Module:
    """`model.train()`, then every BatchNorm whose parameters are all frozen goes back to eval
    mode, so a frozen backbone's running statistics do not drift (and it normalises with them).
    BatchNorm without affine parameters stays in train mode. Dropout is left in train mode.
    Returns MODEL."""
    model.train()
    for m in unwrap(model).modules():
        if isinstance(m, _BatchNorm) and _all_frozen(m.parameters()):
            m.eval()
    return model


def trainable_summary(model: nn.Module) -> str:
    """'N of M parameters trainable', for a log line."""
    params = list(unwrap(model).parameters())
    n = sum(p.numel() for p in params if p.requires_grad)
    return f"{n:,} of {sum(p.numel() for p in params):,} parameters trainable"
