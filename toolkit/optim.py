"""Optimizers and schedules by name.

Schedules are stepped once per optimizer update, so milestones given in epochs are converted
to update counts here; gradient accumulation and mid-epoch resume then stay exact.
"""

from __future__ import annotations

from typing import Iterable, List

import torch
from torch import nn

from toolkit.registry import Registry

OPTIMIZERS = Registry("optimizer")
SCHEDULERS = Registry("scheduler")


def param_groups(model: nn.Module, weight_decay: float) -> List[dict]:
    """Trainable parameters only (frozen ones never reach the optimizer)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": params, "weight_decay": weight_decay}]


@OPTIMIZERS.register("sgd")
def sgd(params: Iterable, lr: float, momentum: float = 0.0, nesterov: bool = False,
        weight_decay: float = 0.0) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0,
                           weight_decay=weight_decay)


@SCHEDULERS.register("multistep")
def multistep(optimizer: torch.optim.Optimizer, steps_per_epoch: int, milestones: List[int],
              gamma: float = 0.1, epochs: int = 1) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=[m * steps_per_epoch for m in milestones], gamma=gamma)


@SCHEDULERS.register("constant")
def constant(optimizer: torch.optim.Optimizer, steps_per_epoch: int, milestones: List[int],
             gamma: float = 0.1, epochs: int = 1) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
