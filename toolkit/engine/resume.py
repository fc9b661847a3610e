"""Resuming a run: which checkpoint (`train.resume`), loading it into the prepared objects, the
weight average, and retargeting a loaded optimizer for population-based training."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

from accelerate import Accelerator
from safetensors.torch import load_file
from torch import nn

from toolkit import checkpoint
from toolkit.accelerate_compat import restore_shared_rng
from toolkit.ema import ModelEma
from toolkit.engine.state import TrainState
from toolkit.errors import ConfigError, ToolkitError
from toolkit.models.freeze import unwrap
from toolkit.tracking import Tracker

EMA_FILE = "ema.safetensors"  # inside a checkpoint, beside Accelerate's files


def _move_aside(path: Path, suffix: str) -> Path:
    """step_N -> step_N<suffix> (replacing an older one): kept for inspection, out of the way of
    pruning and resume."""
    target = path.with_name(path.name + suffix)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(path, target)
    return target


def find_resume(accelerator: Accelerator, resume: str, ckpt_root: Path, tracker: Tracker) -> Optional[Path]:
    """The checkpoint `train.resume` asks for, verified; None to start fresh. With "auto",
    incomplete or corrupt checkpoints are skipped and moved aside as `.bad`."""
    if resume == "none":
        return None
    if resume == "auto":
        path, skipped = checkpoint.find_resumable(ckpt_root)
        for bad, reason in skipped:
            tracker.print(f"skipping checkpoint {bad.name}: {reason}")
        accelerator.wait_for_everyone()  # every rank has looked before the bad ones move aside
        if accelerator.is_main_process:  # one rank moves shared files
            for bad, _ in skipped:
                _move_aside(bad, ".bad")
        if path is None:
            tracker.print(f"train.resume=auto: no complete checkpoint in {ckpt_root}; starting fresh")
        return path
    path = Path(resume)
    reason = checkpoint.verify(path)
    if reason is not None:
        raise ConfigError(f"config: train.resume: {path} is not a usable checkpoint: {reason}")
    return path


def load_resume(accelerator: Accelerator, path: Path, ckpt_root: Path, tracker: Tracker) -> TrainState:
    """Load a verified checkpoint into the prepared objects; move newer checkpoints aside."""
    try:
        accelerator.load_state(str(path))
        restore_shared_rng(accelerator, path)
        state = TrainState(**checkpoint.read_state(path))
    except Exception as e:  # a verified checkpoint that does not fit this model/optimizer
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ToolkitError(f"cannot resume from {path}: {msg}") from None
    accelerator.wait_for_everyone()  # every rank has loaded before newer checkpoints move aside
    if accelerator.is_main_process:  # checkpoints past the resume point belong to another history
        for newer in checkpoint.list_checkpoints(ckpt_root):
            if checkpoint.step_of(newer) > state.step and newer.resolve() != path.resolve():
                target = _move_aside(newer, ".stale")
                tracker.print(f"moved {newer.name} aside to {target.name}: it is newer than the resume point")
    tracker.print(f"resumed from {path} (epoch {state.epoch + 1}, batch {state.batch}, step {state.step})")
    return state


def load_ema(ema: ModelEma, raw_model: nn.Module, path: Path, tracker: Tracker) -> None:
    """The checkpoint's weight average; a checkpoint saved without one (EMA switched on for the
    rest of a run) starts the average from its weights."""
    f = path / EMA_FILE
    if not f.is_file():
        ema.module.load_state_dict(unwrap(raw_model).state_dict())
        tracker.print(f"{path.name} has no {EMA_FILE}: the weight average starts from its weights")
        return
    try:
        ema.load_state_dict(load_file(str(f), device=str(next(ema.module.parameters()).device)))
    except Exception as e:  # verified by its checksum, so a different model or an older format
        raise ToolkitError(f"cannot resume from {path}: {EMA_FILE}: {str(e).splitlines()[0]}") from None


def apply_optim_hparams(optimizer, scheduler, o, saved_lr: float) -> None:
    """Put `o`'s lr, momentum and weight decay on a loaded optimizer without restarting its
    schedule: every lr the schedule keeps (current, initial, peak, floor) is scaled by
    o.lr / saved_lr, the base lr the checkpoint was trained with."""
    sched = getattr(scheduler, "scheduler", scheduler)  # Accelerate's wrapper
    ratio = o.lr / saved_lr
    for group in optimizer.param_groups:
        for key in ("lr", "initial_lr", "max_lr", "min_lr"):
            if key in group:
                group[key] *= ratio
        if group.get("weight_decay", 0) > 0:  # no-decay groups (biases, norms) stay at 0
            group["weight_decay"] = o.weight_decay
        if "momentum" in group:
            group["momentum"] = o.momentum
    sched.base_lrs = [b * ratio for b in sched.base_lrs]
    sched._last_lr = [g["lr"] for g in optimizer.param_groups]
