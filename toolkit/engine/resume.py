"""Resuming a run: which checkpoint (`train.resume`), loading it into the prepared objects, the
weight average, and retargeting a loaded optimizer for population-based training."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from accelerate import Accelerator
from safetensors.torch import load_file
from torch import nn

from toolkit import checkpoint, rundir
from toolkit.config import Config, load_config, parse_yaml, to_dict, to_flat, with_flat
from toolkit.accelerate_compat import refused_state_file, restore_shared_rng
from toolkit.ema import ModelEma
from toolkit.engine.state import TrainState
from toolkit.errors import ConfigError, ToolkitError
from toolkit.models.freeze import unwrap
from toolkit.models.weights import refusal_reason
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
    return verified_checkpoint(resume)


def verified_checkpoint(resume: str) -> Path:
    """`train.resume=PATH`: the checkpoint directory, complete and intact, or one line why not."""
    path = Path(resume)
    if not path.is_dir():
        raise ConfigError(f"config: train.resume: no such checkpoint directory: {resume}")
    reason = checkpoint.verify(path)
    if reason is not None:
        raise ConfigError(f"config: train.resume: {path} is not a usable checkpoint: {reason}")
    return path


def load_resume(accelerator: Accelerator, path: Path, ckpt_root: Path, tracker: Tracker) -> TrainState:
    """Load a verified checkpoint into the prepared objects; move newer checkpoints aside."""
    try:
        accelerator.load_state(str(path))
        restore_shared_rng(accelerator, path)
        state = TrainState.load(path)
    except pickle.UnpicklingError as e:  # weights_only refused a file: name it, and no advice to load it anyway
        file, why = refused_state_file(path) or (path, e)
        raise ToolkitError(f"cannot resume from {path}: refusing {file}: it holds objects that torch.load with "
                           f"weights_only=True does not load ({refusal_reason(why)})") from None
    except ToolkitError:
        raise
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


# ------------------------------------------------------------------------------------------
# the config a resumed run continues with

# Keys a resume may change: where the run lives and is logged, how often it saves, how long
# it runs. Everything else (model, data, batch size, optimizer, schedule, loss, precision,
# seed, ...) is part of what the checkpoint means, so a different value is refused.
# `auto` precision and channels_last stay `auto` in the checkpoint's config, so resuming on
# another device is not a change; the values the run trained with are in its trainer_state.json
# (recorded_speed), and fit keeps them (toolkit/fast.py).
RESUME_MAY_CHANGE = ("run.dir", "run.name", "train.resume", "train.epochs", "train.checkpoint_every_steps",
                     "train.keep_last", "train.preempt_check_steps", "train.dist_timeout_s", "data.num_workers",
                     "data.eval_batch_size", "train.test_weights", "train.early_stop_patience",
                     "train.early_stop_min_delta", "log.")


def resume_checkpoint(resume: str, run_dir: Optional[str]) -> Optional[Path]:
    """The checkpoint a `train.resume` setting will continue from, or None when it starts fresh
    (auto without run.dir, or no complete checkpoint yet). Reads the disk only (no ranks)."""
    if resume == "none":
        return None
    if resume != "auto":
        return verified_checkpoint(resume)
    if run_dir is None:
        return None
    path, _ = checkpoint.find_resumable(Path(run_dir) / rundir.CHECKPOINTS)
    return path


def recorded_speed(resume: str, run_dir: Optional[str]) -> Dict[str, Any]:
    """The resolved precision and channels_last of the checkpoint a run will resume
    ({"precision": "bf16", "channels_last": True}), {} for a fresh start or a checkpoint from
    before they were recorded. Disk only, no ranks: the Accelerator's precision is chosen from it
    before the Accelerator exists. A checkpoint that is not usable is find_resume's to report."""
    try:
        path = resume_checkpoint(resume, run_dir)
        state = checkpoint.read_state(path) if path is not None else {}
    except (ConfigError, OSError, ValueError):
        return {}
    return {k: state[k] for k in ("precision", "channels_last") if state.get(k) is not None}


def config_for_resume(requested: Config, config_path: Optional[str], overrides: Sequence[str]) -> tuple:
    """A resumed run continues with its checkpoint's config -> (config, changes as lines).

    The checkpoint's config.yaml stands in for the defaults; a --config file and the overrides
    given with the resume are laid over it. What they change must be in RESUME_MAY_CHANGE
    (applied, recorded in config.yaml, and listed); anything else is refused with the keys named.
    A fresh start (nothing to resume) keeps the requested config as it is."""
    path = resume_checkpoint(requested.train.resume, requested.run.dir)
    if path is None:
        return requested, []
    saved_file = path / rundir.CONFIG
    if not saved_file.is_file():
        raise ConfigError(f"config: train.resume: {path} has no {rundir.CONFIG}; it is not a checkpoint of this toolkit")
    saved = load_config(None, (), base=parse_yaml(saved_file.read_text()))
    cfg = load_config(config_path, overrides, base=to_dict(saved))
    if cfg.run.dir is None and path.parent.name == rundir.CHECKPOINTS:  # train.resume=PATH
        cfg = with_flat(cfg, {"run.dir": str(path.parent.parent)})
    before, after = to_flat(saved), to_flat(cfg)
    changed = [k for k in after if after[k] != before[k]]
    fixed = [k for k in changed if not k.startswith(RESUME_MAY_CHANGE)]
    if fixed:
        shown = ", ".join(f"{k} ({before[k]!r} -> {after[k]!r})" for k in fixed)
        raise ConfigError(f"config: train.resume: {shown} would change what checkpoint {path} means; resume "
                          "without them (the run's own config is used) or start a new run")
    done = checkpoint.read_state(path)["epoch"]
    if cfg.train.epochs < done:
        raise ConfigError(f"config: train.epochs: {cfg.train.epochs} is fewer than the {done} epochs "
                          f"checkpoint {path} has trained")
    lines = [f"{k}: {before[k]!r} -> {after[k]!r}" for k in changed if k not in ("train.resume", "run.dir")]
    return cfg, lines
