"""Optimizers and schedules by name.

    opt = OPTIMIZERS.build("adamw", params=param_groups(model, 0.05, no_decay_norm_bias=True), lr=1e-3)
    sched = SCHEDULERS.build("cosine", optimizer=opt, steps_per_epoch=390, epochs=30, warmup_epochs=2)

Schedules are stepped once per optimizer update, so anything given in epochs (milestones,
warmup, step size) is converted to update counts here; gradient accumulation and mid-epoch
resume then stay exact. Every builder takes the whole section as keywords and uses what it
needs, so one config shape serves every entry.
"""

from __future__ import annotations

import bisect
import math
from typing import Iterable, List, Sequence

import torch
from torch import nn

from toolkit.catalog import OPTIMIZERS, SCHEDULERS


def param_groups(model: nn.Module, weight_decay: float, no_decay_norm_bias: bool = False) -> List[dict]:
    """Trainable parameters only (frozen ones never reach the optimizer).

    With `no_decay_norm_bias`, biases and normalisation weights (every parameter with fewer
    than 2 dimensions) get no weight decay, as in timm and torchvision's references."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not no_decay_norm_bias or weight_decay == 0:
        return [{"params": [p for _, p in params], "weight_decay": weight_decay}]
    decay = [p for _, p in params if p.ndim >= 2]
    no_decay = [p for _, p in params if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# --- optimizers: (params, lr, momentum, nesterov, weight_decay, betas, eps, alpha, ...) -------

@OPTIMIZERS.register("sgd")
def sgd(params: Iterable, lr: float, momentum: float = 0.0, nesterov: bool = False,
        weight_decay: float = 0.0, **_) -> torch.optim.Optimizer:
    """SGD with optional (Nesterov) momentum and weight decay."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0,
                           weight_decay=weight_decay)


@OPTIMIZERS.register("rmsprop")
def rmsprop(params: Iterable, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
            alpha: float = 0.99, eps: float = 1e-8, **_) -> torch.optim.Optimizer:
    """RMSprop (smoothing optim.alpha), with optional momentum and weight decay."""
    return torch.optim.RMSprop(params, lr=lr, alpha=alpha, eps=eps, momentum=momentum,
                               weight_decay=weight_decay)


@OPTIMIZERS.register("adam")
def adam(params: Iterable, lr: float, weight_decay: float = 0.0, betas: Sequence[float] = (0.9, 0.999),
         eps: float = 1e-8, **_) -> torch.optim.Optimizer:
    """Adam (optim.betas); weight decay added to the gradient (L2)."""
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


@OPTIMIZERS.register("adamw")
def adamw(params: Iterable, lr: float, weight_decay: float = 0.0, betas: Sequence[float] = (0.9, 0.999),
          eps: float = 1e-8, **_) -> torch.optim.Optimizer:
    """AdamW: Adam with decoupled weight decay."""
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


@OPTIMIZERS.register("adagrad")
def adagrad(params: Iterable, lr: float, weight_decay: float = 0.0, eps: float = 1e-10,
            **_) -> torch.optim.Optimizer:
    """Adagrad, with optional weight decay."""
    return torch.optim.Adagrad(params, lr=lr, eps=eps, weight_decay=weight_decay)


# --- schedules: (optimizer, steps_per_epoch, epochs, milestones, gamma, ...) -----------------

LRScheduler = torch.optim.lr_scheduler.LRScheduler


class WarmupSteps:
    """Linear warmup from 0 to the base lr over `warmup` updates, times gamma per milestone passed.

    Milestones count updates from the start of the run (warmup included), as MultiStepLR's do."""

    def __init__(self, warmup: int, milestones: Sequence[int], gamma: float):
        self.warmup, self.milestones, self.gamma = warmup, sorted(milestones), gamma

    def __call__(self, step: int) -> float:
        rise = (step + 1) / self.warmup if step < self.warmup else 1.0
        return rise * self.gamma ** bisect.bisect_right(self.milestones, step)


def _stepped(optimizer, steps_per_epoch: int, warmup_epochs: float, milestones: Sequence[int],
             gamma: float) -> LRScheduler:
    warmup = int(round(warmup_epochs * steps_per_epoch))
    updates = [m * steps_per_epoch for m in milestones]
    if warmup == 0:  # the plain torch schedule (and its state_dict, which older runs saved)
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=updates, gamma=gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupSteps(warmup, updates, gamma))


@SCHEDULERS.register("multistep")
def multistep(optimizer, steps_per_epoch: int, milestones: Sequence[int] = (), gamma: float = 0.1,
              warmup_epochs: float = 0.0, **_) -> LRScheduler:
    """lr *= gamma at each milestone epoch, after `warmup_epochs` of linear warmup."""
    return _stepped(optimizer, steps_per_epoch, warmup_epochs, milestones, gamma)


@SCHEDULERS.register("step")
def step(optimizer, steps_per_epoch: int, epochs: int = 1, step_size: int = 1, gamma: float = 0.1,
         warmup_epochs: float = 0.0, **_) -> LRScheduler:
    """lr *= gamma every `step_size` epochs, after `warmup_epochs` of linear warmup."""
    if warmup_epochs == 0:
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size * steps_per_epoch, gamma=gamma)
    return _stepped(optimizer, steps_per_epoch, warmup_epochs,
                    range(step_size, epochs + 1, step_size), gamma)


@SCHEDULERS.register("constant")
def constant(optimizer, steps_per_epoch: int = 1, warmup_epochs: float = 0.0, **_) -> LRScheduler:
    """The base lr throughout, after `warmup_epochs` of linear warmup."""
    if warmup_epochs == 0:
        return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    return _stepped(optimizer, steps_per_epoch, warmup_epochs, (), 1.0)


class WarmupCosine:
    """Linear warmup from 0 to the base lr over `warmup` updates, then cosine to min_factor.

    A class, not a lambda, so LambdaLR's state_dict can save it."""

    def __init__(self, warmup: int, total: int, min_factor: float):
        self.warmup, self.total, self.min_factor = warmup, total, min_factor

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        t = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * t))


@SCHEDULERS.register("cosine")
def cosine(optimizer, steps_per_epoch: int, epochs: int, warmup_epochs: float = 0.0,
           min_lr_factor: float = 0.0, **_) -> LRScheduler:
    """Cosine decay over the run after `warmup_epochs` of linear warmup (per update)."""
    total = steps_per_epoch * epochs
    warmup = int(round(warmup_epochs * steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup, total, min_lr_factor))


@SCHEDULERS.register("onecycle")
def onecycle(optimizer, steps_per_epoch: int, epochs: int, pct_start: float = 0.25, **_) -> LRScheduler:
    """Leslie Smith's one-cycle policy; optim.lr is the peak."""
    max_lr = [g["lr"] for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, epochs=epochs,
                                               steps_per_epoch=steps_per_epoch, pct_start=pct_start)
