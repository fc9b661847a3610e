"""The one training loop, on Accelerate: CPU, one GPU, DDP, multi-node and DeepSpeed alike.

    accelerate launch toolkit/train.py --config configs/digits_lenet.yaml
    summary = fit(load_config("configs/digits_lenet.yaml"))

Precision, distribution and accumulation are Accelerate's business (autocast, backward,
accumulate, gather_for_metrics), so there is no second code path. `data.batch_size` is the
global batch, split across processes, so one process and N processes take the same steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import yaml
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import (DataLoaderConfiguration, DistributedType, InitProcessGroupKwargs, ProjectConfiguration,
                              broadcast_object_list, set_seed)
from torch import nn
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from toolkit import checkpoint
from toolkit.config import Config, Stage, check_paths, hparams, resolve_stages, stage_at, to_yaml
from toolkit.data import DATASETS
from toolkit.data.base import collate_for, device_items
from toolkit.data.augment import AUGMENTS
from toolkit.data.device_loader import DeviceLoader, agreed_reason, device_loader_reason
from toolkit.data.mix import BatchMix
from toolkit.data.noise import flip_labels
from toolkit.data.samplers import EpochSampler, PKSampler
from toolkit.ema import ModelEma
from toolkit.errors import ConfigError, NonFiniteLossError, ToolkitError
from toolkit.faults import Faults
from toolkit.preempt import Preemption
from toolkit.losses import LOSSES
from toolkit.models import MODELS, apply_freeze, set_train_mode
from toolkit.models.freeze import unwrap
from toolkit.optim import OPTIMIZERS, SCHEDULERS, param_groups
from toolkit.tracking import Tracker


def _cache_accelerate_package_probe() -> None:
    """Accelerate 1.15 asks importlib whether `lomo_optim` is installed on every optimizer step
    and backward (~0.2 ms each, uncached): 5% of a LeNet step on CPU. Installed packages do not
    change during a run, so answer once."""
    import accelerate.accelerator as acc_mod
    import accelerate.optimizer as opt_mod

    probe = getattr(opt_mod, "is_lomo_available", None)
    if probe is not None and not hasattr(probe, "cache_info"):
        cached = functools.lru_cache(maxsize=1)(probe)
        opt_mod.is_lomo_available = cached
        if getattr(acc_mod, "is_lomo_available", None) is probe:
            acc_mod.is_lomo_available = cached


_cache_accelerate_package_probe()


def _no_context(*_args) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


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


def _loss(criterion: nn.Module, logits: torch.Tensor, y: torch.Tensor, tap: Optional[FeatureTap]):
    return criterion(logits, y) if tap is None else criterion(logits, y, features=tap.features)


@dataclass
class TrainState:
    """Everything beyond Accelerate's state that a resumed run needs. Saved as JSON."""

    epoch: int = 0  # epoch in progress
    batch: int = 0  # loader batches of `epoch` already consumed
    step: int = 0  # optimizer updates so far
    best_val_acc: float = -1.0
    best_epoch: int = -1
    nonfinite_run: int = 0  # consecutive non-finite steps
    nonfinite_total: int = 0
    images: int = 0  # training images seen, all ranks
    train_time_s: float = 0.0
    epoch_sums: List[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # loss*n, correct, n
    log_sums: List[float] = field(default_factory=lambda: [0.0, 0.0])  # loss*n, n since the last log


# ------------------------------------------------------------------------------------------
# set-up


def make_accelerator(cfg: Config) -> Accelerator:
    t = cfg.train
    if t.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("config: train.precision: fp16 needs a CUDA GPU; use bf16 on CPU")
    return Accelerator(
        # Without CUDA, Accelerate forms a gloo group (MULTI_CPU) only when told it is on the CPU;
        # otherwise torchrun's processes each see world size 1.
        cpu=not torch.cuda.is_available(),
        mixed_precision=t.precision,
        gradient_accumulation_steps=t.grad_accum_steps,
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        log_with="tensorboard" if cfg.log.tensorboard else None,
        # The run directory is chosen after start-up (rank 0 picks, all ranks agree); it is set
        # before init_trackers, which is when TensorBoard reads it.
        project_config=ProjectConfiguration(project_dir=".", logging_dir="."),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=t.dist_timeout_s))],
        dynamo_backend="inductor" if t.compile else "no",
        rng_types=[],  # our sampler is seeded per epoch; nothing to synchronise
    )


def resolve_run_dir(cfg: Config, accelerator: Accelerator) -> Path:
    """run.dir, or runs/<name>/<timestamp> chosen on rank 0 and shared with every rank.

    A fresh run (train.resume=none) refuses a directory that already holds a run's checkpoints
    or metrics: it would mix two runs' files, and pruning would delete one run's checkpoints."""
    chosen = [cfg.run.dir or str(Path("runs") / cfg.run.name / datetime.now().strftime("%Y%m%d-%H%M%S"))]
    if accelerator.num_processes > 1:
        broadcast_object_list(chosen, from_process=0)
    run_dir = Path(chosen[0]).absolute()
    if cfg.train.resume == "none" and ((run_dir / "metrics.jsonl").exists() or
                                        checkpoint.list_checkpoints(run_dir / "checkpoints")):
        raise ConfigError(f"config: run.dir: {run_dir} already holds a run; continue it with "
                          "train.resume=auto or choose another run.dir")
    if accelerator.is_main_process:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / ".write_test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"config: run.dir: cannot write to {run_dir}: {e.strerror}") from None
    accelerator.wait_for_everyone()
    return run_dir


def make_loaders(splits, batch_size: int, eval_batch_size: int, num_workers: int, drop_last: bool,
                 seed: int, world: int, sampler: str = "random", pk_k: int = 4):
    for key, b in (("data.batch_size", batch_size), ("data.eval_batch_size", eval_batch_size)):
        if b % world:
            raise ConfigError(f"config: {key}: {b} is not divisible by the {world} processes "
                              "(it is the global batch, split across processes)")
    if not drop_last and world > 1 and len(splits.train) % batch_size:
        raise ConfigError(f"config: data.drop_last: false would pad the last training batch with repeated "
                          f"samples on {world} processes ({len(splits.train)} images, batch {batch_size}); "
                          "keep it true or pick a batch size that divides the split")
    if drop_last and len(splits.train) < batch_size:
        raise ConfigError(f"config: data.batch_size: {batch_size} is larger than the training split "
                          f"({len(splits.train)} images); lower it or set data.drop_last=false")
    common = dict(num_workers=num_workers,
                  pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0)
    if sampler == "pk":
        if (batch_size // world) % pk_k:
            raise ConfigError(f"config: data.batch_size: {batch_size} split over {world} processes must leave "
                              f"whole classes of data.pk_k={pk_k} images on each")
        try:
            order = PKSampler(splits.train.labels, batch_size // pk_k, pk_k, seed)
        except ValueError as e:
            raise ConfigError(f"config: data.batch_size: {e}") from None
        drop_last = True  # the sampler yields whole batches only
    else:
        order = EpochSampler(len(splits.train), seed)
    train = DataLoader(splits.train, batch_size=batch_size, sampler=order, drop_last=drop_last,
                       generator=torch.Generator().manual_seed(seed), collate_fn=collate_for(splits.train), **common)
    val = DataLoader(splits.val, batch_size=eval_batch_size, shuffle=False, collate_fn=collate_for(splits.val), **common)
    test = DataLoader(splits.test, batch_size=eval_batch_size, shuffle=False, collate_fn=collate_for(splits.test),
                      **common)
    return train, val, test, order


# ------------------------------------------------------------------------------------------
# the loop


def train_epoch(model: nn.Module, criterion: nn.Module, optimizer, scheduler, loader,
                accelerator: Accelerator, state: TrainState, tracker: Tracker, *,
                clip_grad_norm: Optional[float], max_nonfinite: int, log_every: int,
                channels_last: bool, faults: Faults, augment: Optional[Callable] = None,
                tap: Optional[FeatureTap] = None, mix: Optional[Callable] = None, ema: Optional[ModelEma] = None,
                normalize: Optional[Callable] = None, nonfinite: str = "skip",
                on_step: Callable[[TrainState, Callable[[], torch.Tensor]], None]) -> List[float]:
    """One pass over `loader` (already positioned past `state.batch` batches). `ema`, when given,
    is updated after every optimizer step; `normalize`, when given, turns the loader's uint8
    batches into float ones on the device (toolkit.data.base.Normalize). `on_step(state, read_sums)` runs after every optimizer
    step; `read_sums()` gives this rank's running sums (for a checkpoint), only when called.

    `nonfinite` (train.nonfinite): "skip" checks every micro-batch's loss before backward, all
    ranks agreeing, and skips non-finite ones (one all-reduce and host sync per micro-batch);
    "stop" never waits for the loss: each rank counts non-finite losses on the device, and the
    count is checked (all ranks together) at every log step, before every checkpoint
    (`read_sums`, which is collective) and at the epoch's end. A check that finds one raises
    NonFiniteLossError, so no weights from after a non-finite step are saved or evaluated.

    Returns the epoch's (loss * n, correct, n) summed over all ranks.
    """
    set_train_mode(model)  # train mode, but BatchNorm of a frozen backbone stays in eval
    device, world = accelerator.device, accelerator.num_processes
    # Running sums on the device, so that no step waits for the host except the non-finite
    # check (on which every rank must agree before anyone calls backward): loss * n and correct
    # for the epoch, loss * n since the last log, each a 0-dim float64 added to in place (no
    # tensor made from host numbers per step). Sample counts are Python numbers.
    loss_sum, correct_sum, log_loss_sum = (torch.zeros((), dtype=torch.float64, device=device) for _ in range(3))
    n_sum = log_n = 0.0
    if accelerator.is_main_process:  # what an interrupted run had summed, over all ranks
        loss_sum += state.epoch_sums[0]
        correct_sum += state.epoch_sums[1]
        n_sum = state.epoch_sums[2]
        log_loss_sum += state.log_sums[0]
        log_n = state.log_sums[1]

    bad_sum = torch.zeros((), dtype=torch.float64, device=device)  # "stop": non-finite losses not yet checked
    checked_step = state.step

    def check(bad: float) -> None:
        """"stop": `bad` is bad_sum summed over ranks; every rank calls this at the same step."""
        nonlocal checked_step
        if nonfinite != "stop":
            return
        if bad > 0:
            raise NonFiniteLossError(
                f"loss was non-finite between steps {checked_step + 1} and {state.step} ({bad:.0f} "
                f"non-finite micro-batch losses over {world} rank(s); train.nonfinite=stop); stopped at step "
                f"{state.step}, checkpoints left as they were (the newest is from before step {checked_step + 1})")
        checked_step = state.step

    def read_sums() -> torch.Tensor:
        """This rank's (loss * n, correct, n, loss * n since the last log, n since the last log).
        Under "stop", first checks (collectively) that no loss since the last check was non-finite."""
        if nonfinite == "stop":
            check(accelerator.reduce(bad_sum, reduction="sum").item())
        return torch.stack([loss_sum, correct_sum, loss_sum.new_tensor(n_sum), log_loss_sum,
                            loss_sum.new_tensor(log_n)])

    # Training time counts every step and the host's waits for the device (the log step's reduce,
    # the epoch's last one), not checkpoints. images/s is over a log window: under "stop" the host
    # runs ahead of the device between log steps, so a single step's time says nothing.
    t_last = time.perf_counter()
    win_images, win_time = state.images, state.train_time_s  # where the log window began
    # Accelerate's contexts cost ~0.2 ms per step each; enter them only when they do something.
    accumulate = accelerator.accumulate if accelerator.gradient_accumulation_steps > 1 else _no_context
    autocast = accelerator.autocast if accelerator.mixed_precision != "no" else _no_context
    zero_grad = _zero_grad_fn(optimizer, accelerator)
    for x, y in loader:
        if normalize is not None:  # (B / world, C, H, W) uint8 -> float32, where the batch is
            x = normalize(x)
        if augment is not None:  # this rank's slice of the global batch, augmented as a whole
            x = augment(x, start=accelerator.process_index * x.shape[0], total=x.shape[0] * world)
        if mix is not None:  # (B,) labels -> (B, K) soft labels
            x, y = mix(x, y)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with accumulate(model):
            with autocast():
                logits = model(x)  # (B / world, C)
                loss = _loss(criterion, logits, y, tap)
            loss = faults.loss(loss, state.step + 1, accelerator.process_index)
            finite = torch.isfinite(loss.detach())
            if nonfinite == "stop":  # counted on the device, checked later: no host sync here
                bad_sum.add_(~finite)
                bad = False
            elif world > 1:
                bad = accelerator.reduce((~finite).float(), reduction="sum").item() > 0
            else:
                bad = not finite.item()
            if bad:
                state.nonfinite_run += 1
                state.nonfinite_total += 1
                # Skip this micro-batch's backward; on the window's last micro-batch the
                # update is skipped too and the window's gradients are dropped.
                optimizer.zero_grad(set_to_none=True)
                if accelerator.is_main_process:
                    tracker.print(f"non-finite loss at step {state.step + 1}: skipped "
                                  f"({state.nonfinite_run}/{max_nonfinite} in a row)")
                if state.nonfinite_run >= max_nonfinite:
                    raise NonFiniteLossError(
                        f"loss was non-finite for {state.nonfinite_run} steps in a row "
                        f"(train.max_nonfinite={max_nonfinite}); stopped at step {state.step}, "
                        "checkpoints left as they were")
            else:
                if accelerator.sync_gradients:
                    state.nonfinite_run = 0
                accelerator.backward(loss)
                if clip_grad_norm is not None and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), clip_grad_norm)
                optimizer.step()  # Accelerate makes this a no-op until the window is complete
                zero_grad()
                m = y.shape[0]
                hard = y if y.ndim == 1 else y.argmax(1)  # mixed labels count as their larger part
                loss_sum.add_(loss.detach(), alpha=m)
                log_loss_sum.add_(loss.detach(), alpha=m)
                correct_sum.add_((logits.detach().argmax(1) == hard).sum())
                n_sum += m
                log_n += m
        state.batch += 1
        state.images += x.shape[0] * world
        if not accelerator.sync_gradients:
            continue
        scheduler.step()
        if ema is not None:
            ema.update(unwrap(model))
            if world > 1:
                ema.sync_buffers()
        state.step += 1
        shown_loss = None
        logging = state.step % log_every == 0
        if logging:  # waits for this rank's queued device work
            tot = accelerator.reduce(torch.stack([log_loss_sum, log_loss_sum.new_tensor(log_n), bad_sum]),
                                     reduction="sum").tolist()  # the "stop" check rides on the log's reduce
            check(tot[2])
            shown_loss = tot[0] / max(tot[1], 1.0)
        now = time.perf_counter()
        state.train_time_s += now - t_last
        ips = (state.images - win_images) / max(state.train_time_s - win_time, 1e-9)
        if logging:
            win_images, win_time = state.images, state.train_time_s
            tracker.log("train", state.step, {"loss": shown_loss, "lr": scheduler.get_last_lr()[0],
                                              "epoch": state.epoch, "images_per_s": ips})
            log_loss_sum.zero_()
            log_n = 0.0
        tracker.advance(accelerator.gradient_accumulation_steps, ips, shown_loss)
        on_step(state, read_sums)
        faults.after_step(state.step, accelerator.process_index)
        t_last = time.perf_counter()  # checkpoint time is not training time
    both = accelerator.reduce(read_sums(), reduction="sum").tolist()
    state.train_time_s += time.perf_counter() - t_last  # the loader's end and this wait for the device
    state.log_sums = both[3:]  # the log window runs on into the next epoch
    return both[:3]


def _zero_grad_fn(optimizer, accelerator: Accelerator) -> Callable[[], None]:
    """`optimizer.zero_grad(set_to_none=True)` as Accelerate does it, without its cost:
    AcceleratedOptimizer.zero_grad reads the wrapped optimizer's signature with `inspect` on
    every call (~60 us per step on the 2-core VM, a few % of a LeNet step). For a plain
    AcceleratedOptimizer around a torch optimizer this calls the wrapped one directly, under the
    same condition (only when the accumulation window closes); anything else (DeepSpeed's
    wrapper, whose engine clears gradients itself) keeps its own zero_grad."""
    inner = getattr(optimizer, "optimizer", None)
    if type(optimizer) is not AcceleratedOptimizer or not isinstance(inner, torch.optim.Optimizer):
        return lambda: optimizer.zero_grad(set_to_none=True)

    def zero_grad() -> None:
        if accelerator.sync_gradients:
            inner.zero_grad(set_to_none=True)
    return zero_grad


@torch.no_grad()
def evaluate(model: nn.Module, criterion: nn.Module, loader, accelerator: Accelerator,
             num_classes: int, channels_last: bool = False, tap: Optional[FeatureTap] = None,
             keep: Optional[torch.Tensor] = None, tta: str = "none",
             normalize: Optional[Callable] = None) -> Dict[str, Any]:
    """Exact under any world size: gather_for_metrics drops the sampler's padding, so every
    sample counts once. Each rank updates its metrics with the gathered batch (no metric sync).

    keep: sorted positions in the split whose penultimate features (and labels) to return, as
    "features" (n, D) and "labels" (n,) on the CPU, for the feature plots.
    tta="flip": logits are the mean of the image's and its mirror image's; the features are the
    image's own (the mirror is run first, so the tap holds the original's).
    normalize: for a loader of uint8 items, their normalisation (run on the device)."""
    model.eval()
    device = accelerator.device
    kw = dict(num_classes=num_classes, sync_on_compute=False)
    top1 = MulticlassAccuracy(top_k=1, average="micro", **kw).to(device)
    top5 = MulticlassAccuracy(top_k=min(5, num_classes), average="micro", **kw).to(device)
    per_class = MulticlassAccuracy(top_k=1, average="none", **kw).to(device)
    confusion = MulticlassConfusionMatrix(**kw).to(device)
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
            for metric in (top1, top5, per_class, confusion):
                metric.update(logits, y)
    finally:
        if own_tap is not None:
            own_tap.remove()
    set_train_mode(model)
    out = {"acc": top1.compute().item(), "top5": top5.compute().item(),
           "loss": (loss_sum / max(count, 1)).item(), "num_samples": count,
           "per_class_acc": per_class.compute().tolist(),
           "confusion": confusion.compute().cpu().tolist()}
    if keep is not None:
        out["features"] = torch.cat(kept_f) if kept_f else torch.zeros(0)
        out["labels"] = torch.cat(kept_y) if kept_y else torch.zeros(0, dtype=torch.long)
    return out


def _plot_sample(n: int, most: int, seed: int) -> Optional[torch.Tensor]:
    """Sorted positions of up to `most` samples out of n (seeded), or None for none."""
    if most <= 0 or n == 0:
        return None
    if n <= most:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:most].sort().values


def _write_confusion(path: Path, names: List[str], matrix: List[List[int]]) -> None:
    rows = [",".join(["true/pred", *names])]
    rows += [",".join([name, *map(str, r)]) for name, r in zip(names, matrix)]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(rows) + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------
# fit: set-up, resume, epochs, test, summary


def _find_resume(accelerator: Accelerator, resume: str, ckpt_root: Path, tracker: Tracker) -> Optional[Path]:
    """The checkpoint `train.resume` asks for, verified; None to start fresh. With "auto",
    incomplete or corrupt checkpoints are skipped and moved aside as `.bad`."""
    if resume == "none":
        return None
    if resume == "auto":
        path, skipped = checkpoint.find_resumable(ckpt_root)
        for bad, reason in skipped:
            tracker.print(f"skipping checkpoint {bad.name}: {reason}")
        accelerator.wait_for_everyone()  # every rank has looked before the bad ones move aside
        if accelerator.is_main_process:
            for bad, _ in skipped:  # kept for inspection, out of the way of pruning and resume
                target = bad.with_name(bad.name + ".bad")
                shutil.rmtree(target, ignore_errors=True)
                os.replace(bad, target)
        if path is None:
            tracker.print(f"train.resume=auto: no complete checkpoint in {ckpt_root}; starting fresh")
        return path
    path = Path(resume)
    reason = checkpoint.verify(path)
    if reason is not None:
        raise ConfigError(f"config: train.resume: {path} is not a usable checkpoint: {reason}")
    return path


def _load_resume(accelerator: Accelerator, path: Path, ckpt_root: Path, tracker: Tracker) -> TrainState:
    """Load a verified checkpoint into the prepared objects; move newer checkpoints aside."""
    try:
        accelerator.load_state(str(path))
        _restore_shared_rng(accelerator, path)
        state = TrainState(**checkpoint.read_state(path))
    except Exception as e:  # a verified checkpoint that does not fit this model/optimizer
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ToolkitError(f"cannot resume from {path}: {msg}") from None
    accelerator.wait_for_everyone()  # every rank has loaded before newer checkpoints move aside
    if accelerator.is_main_process:  # checkpoints past the resume point belong to another history
        for newer in checkpoint.list_checkpoints(ckpt_root):
            if checkpoint.step_of(newer) > state.step and newer.resolve() != path.resolve():
                target = newer.with_name(newer.name + ".stale")
                shutil.rmtree(target, ignore_errors=True)
                os.replace(newer, target)
                tracker.print(f"moved {newer.name} aside to {target.name}: it is newer than the resume point")
    tracker.print(f"resumed from {path} (epoch {state.epoch + 1}, batch {state.batch}, step {state.step})")
    return state


EMA_FILE = "ema.safetensors"


def _load_ema(ema: ModelEma, raw_model: nn.Module, path: Path, tracker: Tracker) -> None:
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
    for i, group in enumerate(optimizer.param_groups):
        for key in ("lr", "initial_lr", "max_lr", "min_lr"):
            if key in group:
                group[key] *= ratio
        if group.get("weight_decay", 0) > 0:  # no-decay groups (biases, norms) stay at 0
            group["weight_decay"] = o.weight_decay
        if "momentum" in group:
            group["momentum"] = o.momentum
    sched.base_lrs = [b * ratio for b in sched.base_lrs]
    sched._last_lr = [g["lr"] for g in optimizer.param_groups]


def choose_loader(mode: str, train_set, accelerator: Accelerator) -> str:
    """`data.loader` -> "device" or "dataloader". `auto` picks the device-resident loader when the
    training set is held in memory and fits (toolkit/data/device_loader.py); DeepSpeed takes its
    micro-batch size from the prepared training DataLoader, so it keeps the DataLoader."""
    if mode == "dataloader":
        return mode
    reason = device_loader_reason(train_set, accelerator.device)
    if reason is None and accelerator.distributed_type == DistributedType.DEEPSPEED:
        reason = "DeepSpeed reads its micro-batch size from the prepared training DataLoader"
    reason = agreed_reason(accelerator, reason)
    if reason is None:
        return "device"
    if mode == "device":
        raise ConfigError(f"config: data.loader: device: {reason}; use data.loader=auto or dataloader")
    return "dataloader"


class _StageRun:
    """What one stage trains with: freeze mode, loss, optimizer, schedule, loaders, augmentation,
    all prepared by Accelerate. A new stage is a new _StageRun on the same plain model: what is
    trainable changes, so DDP must be re-wrapped and the optimizer rebuilt."""

    def __init__(self, accelerator: Accelerator, raw_model: nn.Module, splits, stage: Stage, seed: int,
                 num_classes: int, loader_kind: str, ema: Optional[ModelEma] = None):
        c, d, t = stage.cfg, stage.cfg.data, stage.cfg.train
        self.accelerator = accelerator
        apply_freeze(raw_model, c.model.freeze)  # before the optimizer and DDP see the parameters
        self.num_trainable = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
        loss_kw = {k: v for k, v in dataclasses.asdict(c.loss).items() if k != "name"}
        self.criterion = LOSSES.build(c.loss.name, **loss_kw)
        self.eval_criterion = LOSSES.build(c.loss.name, **loss_kw, reduction="none")
        optim_kw = {k: v for k, v in dataclasses.asdict(c.optim).items()
                    if k not in ("name", "no_decay_norm_bias") and v is not None}
        groups = param_groups(raw_model, c.optim.weight_decay, c.optim.no_decay_norm_bias)
        optimizer = OPTIMIZERS.build(c.optim.name, params=groups, **optim_kw)
        # uint8 sets and image folders hand out uint8 items, normalised where the batch lands
        # (a quarter of the bytes through workers, pinned memory and the copy to the GPU)
        # (data.decode=device: image folders hand out JPEG bytes, decoded on the device)
        self.norm = {k: (getattr(splits, k).device_decode(accelerator.device) if d.decode == "device"
                         else device_items(getattr(splits, k))) for k in ("train", "val", "test")}
        self.decode = "device" if getattr(splits.train, "encoded", False) else "workers"  # as it happened
        train_dl, val_dl, test_dl, self.sampler = make_loaders(
            splits, d.batch_size, d.eval_batch_size, d.num_workers, d.drop_last, seed,
            accelerator.num_processes, d.sampler, d.pk_k)
        self.loader = loader_kind  # "device" | "dataloader"
        self.train_norm = None if loader_kind == "device" else self.norm["train"]  # DeviceLoader normalises
        if loader_kind == "device":
            self.model, self.optimizer, self.val_dl, self.test_dl = accelerator.prepare(
                raw_model, optimizer, val_dl, test_dl)
            self.train_dl = DeviceLoader(splits.train, self.sampler, d.batch_size, train_dl.drop_last,
                                         accelerator.device, accelerator.process_index,
                                         accelerator.num_processes, accelerator.gradient_state)
        else:
            self.model, self.optimizer, self.train_dl, self.val_dl, self.test_dl = accelerator.prepare(
                raw_model, optimizer, train_dl, val_dl, test_dl)
        self.steps_per_epoch = math.ceil(len(self.train_dl) / t.grad_accum_steps)
        sched_kw = {k: v for k, v in dataclasses.asdict(c.sched).items() if k != "name"}
        scheduler = SCHEDULERS.build(c.sched.name, optimizer=self.optimizer, steps_per_epoch=self.steps_per_epoch,
                                     epochs=t.epochs, **sched_kw)
        self.scheduler = accelerator.prepare(scheduler)
        self.tap = FeatureTap(self.model) if getattr(self.criterion, "needs_features", False) else None
        # What validation and test run: the weights' moving average when train.ema_decay > 0.
        self.eval_model = self.model if ema is None else ema.module
        self.eval_tap = self.tap if ema is None or self.tap is None else FeatureTap(ema.module)
        stats = {k: splits.meta[k] for k in ("mean", "std", "image_size") if k in splits.meta}
        self.augment = AUGMENTS.build(d.augment, **stats)
        self.mix = (BatchMix(d.mixup_alpha, d.cutmix_alpha, num_classes)
                    if d.mixup_alpha > 0 or d.cutmix_alpha > 0 else None)

    def close(self) -> None:
        """Release the wrappers so the plain model can be prepared again for the next stage."""
        if self.tap is not None:
            self.tap.remove()
        if self.eval_tap is not None and self.eval_tap is not self.tap:
            self.eval_tap.remove()
        self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False, keep_torch_compile=False)
        self.accelerator.free_memory()
        self.model = self.optimizer = self.scheduler = None


def _restore_shared_rng(accelerator: Accelerator, path: Path) -> None:
    """Every rank takes rank 0's RNG state and accumulation counter.

    All ranks hold the same RNG state by design (same seed, augmentation drawn for the global
    batch), so this equals what Accelerate restored when the world size is unchanged, and it
    stays right when a run resumes on more processes than it was saved with (Accelerate then
    finds no file for the new ranks and silently leaves their state fresh)."""
    import random

    import numpy as np
    from accelerate.utils.other import load as accelerate_load  # weights_only, numpy allowed

    states = accelerate_load(path / "random_states_0.pkl")
    random.setstate(states["random_state"])
    np.random.set_state(states["numpy_random_seed"])
    torch.set_rng_state(states["torch_manual_seed"])
    cuda = states.get("torch_cuda_manual_seed")
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda[0], device=accelerator.device)
    if "step" in states:
        accelerator.step = states["step"]


def _write_plots(run_dir: Path, log, tracker: Tracker) -> None:
    """The run's plots. A plot that fails costs a warning, never the finished run."""
    from toolkit import report

    try:
        images = report.run_report(run_dir, tsne=log.tsne, classes=list(log.embed_classes) or None)
        tracker.print(f"plots: {', '.join(p.name for p in images)} and report.html")
    except Exception as e:  # noqa: BLE001 (the weights and metrics are already safe on disk)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        tracker.print(f"warning: plots not written: {msg} (python -m toolkit.report {run_dir} retries)")


@contextlib.contextmanager
def run_lock(run_dir: Path, wait_s: float = 0.0):
    """Hold RUN/.lock (an exclusive flock, released when the process ends however it ends):
    two processes training into one run directory would overwrite each other's checkpoints.
    Waits up to `wait_s` for a previous holder (a sweep trial orphaned by a killed driver)."""
    import fcntl

    fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                    raise ConfigError(f"config: run.dir: {run_dir} is in use by another process (pid {holder}); "
                                      "wait for it to end or choose another run.dir") from None
                time.sleep(0.5)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def fit(cfg: Config, on_epoch_end: Optional[Callable[[Dict[str, Any]], None]] = None,
        optim_from_config: bool = False, lock_wait_s: float = 0.0) -> Dict[str, Any]:
    """Train, validate every epoch, test at the end. Returns (and writes) the summary.

    `on_epoch_end(row)` gets each epoch's metrics once its checkpoint is saved (row["checkpoint"]).
    With `optim_from_config`, a resumed run takes lr, momentum and weight decay from `cfg`
    rather than from the checkpoint (population-based training continues another trial's
    state with its own perturbed hyperparameters). `lock_wait_s`: how long to wait for
    another process to leave the run directory before giving up."""
    with contextlib.ExitStack() as stack:
        return _fit(cfg, on_epoch_end, optim_from_config, lock_wait_s, stack)


def _fit(cfg: Config, on_epoch_end, optim_from_config: bool, lock_wait_s: float,
         stack: contextlib.ExitStack) -> Dict[str, Any]:
    t_start = time.perf_counter()
    check_paths(cfg)
    accelerator = make_accelerator(cfg)
    t, d = cfg.train, cfg.data
    if t.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    set_seed(cfg.run.seed, deterministic=t.deterministic)
    if t.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    # Not deterministic: let cuDNN time its algorithms for each new input shape and keep the
    # fastest (the shapes repeat every step here); a no-op without CUDA.
    torch.backends.cudnn.benchmark = not t.deterministic

    with accelerator.main_process_first():  # one rank downloads/extracts; the others then read
        splits = DATASETS.build(d.name, root=d.root, split_seed=d.split_seed, limit=d.limit,
                                download=d.download, image_size=d.image_size,
                                train_splits=list(d.train_splits))
    num_classes = cfg.model.num_classes or splits.num_classes
    if num_classes < splits.num_classes:
        raise ConfigError(f"config: model.num_classes: {num_classes} is fewer than the dataset's "
                          f"{splits.num_classes} classes")
    noise_record = None
    if d.label_noise > 0:
        labels = getattr(splits.train, "labels", None)
        if not isinstance(labels, torch.Tensor):
            raise ConfigError(f"config: data.label_noise: dataset {d.name!r} does not expose its labels")
        noisy, changed = flip_labels(labels, d.label_noise, splits.num_classes, d.split_seed)
        noise_record = {"rate": d.label_noise, "seed": d.split_seed, "num_changed": len(changed),
                        "num_train": len(labels), "index": changed.tolist(),
                        "original": labels[changed].tolist(), "noisy": noisy[changed].tolist()}
        splits.train.labels = noisy
    loader_kind = choose_loader(d.loader, splits.train, accelerator)
    # The run directory appears only once the data has loaded: a bad dataset leaves nothing behind.
    stages = resolve_stages(cfg)
    if len(stages) > 1 and accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ConfigError("config: train.stages: several stages need a new optimizer and model wrapper per "
                          "stage, which DeepSpeed's engine does not allow; run the stages as separate runs")
    run_dir = resolve_run_dir(cfg, accelerator)
    if accelerator.is_main_process:
        stack.enter_context(run_lock(run_dir, lock_wait_s))
    tracker = Tracker(accelerator, run_dir, cfg.log.progress)
    raw_model = MODELS.build(cfg.model.name, num_classes=num_classes, pretrained=cfg.model.pretrained)
    if t.channels_last:
        raw_model = raw_model.to(memory_format=torch.channels_last)

    config_yaml = to_yaml(cfg)
    if accelerator.is_main_process:
        (run_dir / "config.yaml").write_text(config_yaml)
        if noise_record is not None:
            (run_dir / "label_noise.json").write_text(json.dumps(noise_record) + "\n")
    ckpt_root = run_dir / "checkpoints"
    resume_path = _find_resume(accelerator, t.resume, ckpt_root, tracker)
    state = TrainState(**checkpoint.read_state(resume_path)) if resume_path else TrainState()
    # A checkpoint holds the optimizer and schedule of the stage its next epoch belongs to.
    stage = stage_at(stages, state.epoch)
    if t.ema_decay > 0 and accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ConfigError("config: train.ema_decay: the weight average needs whole parameters on every rank, "
                          "which DeepSpeed's ZeRO shards; use DDP for EMA runs")
    # The average is copied from the model on its device (Accelerate moves the model there).
    ema = ModelEma(raw_model.to(accelerator.device), t.ema_decay) if t.ema_decay > 0 else None
    run = _StageRun(accelerator, raw_model, splits, stage, cfg.run.seed, num_classes, loader_kind, ema)
    if resume_path is not None:
        state = _load_resume(accelerator, resume_path, ckpt_root, tracker)
        if ema is not None:
            _load_ema(ema, raw_model, resume_path, tracker)
        if optim_from_config:
            saved_lr = float(yaml.safe_load((resume_path / "config.yaml").read_text())["optim"]["lr"])
            apply_optim_hparams(run.optimizer, run.scheduler, stage.cfg.optim, saved_lr)
    tracker.truncate_after(state.step)
    if cfg.log.tensorboard:
        accelerator.project_configuration.project_dir = str(run_dir)
        accelerator.project_configuration.logging_dir = str(run_dir)
        accelerator.init_trackers("tb", config={k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                                                for k, v in hparams(cfg).items()})
    num_params = sum(p.numel() for p in raw_model.parameters())
    tracker.print(f"run {run_dir}: {cfg.model.name} ({num_params:,} parameters, {run.num_trainable:,} trained) on {d.name} "
                  f"({len(splits.train)}/{len(splits.val)}/{len(splits.test)} train/val/test), "
                  f"{accelerator.num_processes} process(es), {accelerator.distributed_type.value}, "
                  f"device {accelerator.device}, precision {t.precision}, loader {run.loader}"
                  + (f", {len(stages)} stages" if len(stages) > 1 else ""))

    def save(st: TrainState) -> Path:
        return checkpoint.save(accelerator, ckpt_root, st.step, dataclasses.asdict(st), config_yaml,
                               t.keep_last, extra={EMA_FILE: ema.state_dict()} if ema is not None else None)

    preempt = Preemption(accelerator, run_dir, t.preempt_check_steps)
    stack.callback(preempt.close)

    def on_step(st: TrainState, read_sums: Callable[[], torch.Tensor]) -> None:
        every = t.checkpoint_every_steps
        mid_epoch = st.batch < len(run.train_dl)  # (the last batch's checkpoint is the epoch's)
        stop = preempt.requested(st.step) if mid_epoch else 0.0
        if stop or (every and st.step % every == 0 and mid_epoch):
            both = accelerator.reduce(read_sums(), reduction="sum").tolist()
            st.epoch_sums, st.log_sums = both[:3], both[3:]
            saved = save(st)
            if stop:
                preempt.stop(stop, st, saved)

    faults = Faults.from_env()
    for epoch in range(state.epoch, t.epochs):
        state.epoch = epoch
        if len(stages) > 1 and epoch == stage.start and state.batch == 0:
            tracker.print(f"stage {stage.index + 1}/{len(stages)} {stage.name!r}: epochs {stage.start + 1}-"
                          f"{stage.end}, loss {stage.cfg.loss.name}, freeze {stage.cfg.model.freeze}, "
                          f"{run.num_trainable:,} parameters trained")
        run.sampler.set_epoch(epoch)
        run.train_dl.set_epoch(epoch)
        loader = run.train_dl
        if isinstance(loader, DeviceLoader):
            loader = loader.iterate(state.batch)  # mid-epoch resume: the epoch's order from batch k
        elif state.batch > 0:
            loader = accelerator.skip_first_batches(run.train_dl, state.batch)
            loader.set_epoch(epoch)
        tracker.start_epoch(epoch, t.epochs, run.steps_per_epoch * t.grad_accum_steps, state.batch)
        loss_n, correct, n = train_epoch(
            run.model, run.criterion, run.optimizer, run.scheduler, loader, accelerator, state, tracker,
            clip_grad_norm=t.clip_grad_norm, max_nonfinite=t.max_nonfinite, nonfinite=t.nonfinite,
            log_every=cfg.log.every_n_steps, channels_last=t.channels_last, faults=faults,
            augment=run.augment, tap=run.tap, mix=run.mix, ema=ema, normalize=run.train_norm, on_step=on_step)
        tracker.end_epoch()
        val = evaluate(run.eval_model, run.eval_criterion, run.val_dl, accelerator, num_classes, t.channels_last,
                       run.eval_tap, tta=t.tta, normalize=run.norm["val"])
        if val["acc"] > state.best_val_acc:
            state.best_val_acc, state.best_epoch = val["acc"], epoch + 1
        row = {"epoch": epoch + 1, "train_loss": loss_n / max(n, 1), "train_acc": correct / max(n, 1),
               "val_loss": val["loss"], "val_acc": val["acc"], "val_top5": val["top5"],
               "lr": run.scheduler.get_last_lr()[0],
               "images_per_s": state.images / max(state.train_time_s, 1e-9)}
        if cfg.log.test_every_epoch:
            per_epoch_test = evaluate(run.eval_model, run.eval_criterion, run.test_dl, accelerator, num_classes,
                                      t.channels_last, run.eval_tap, tta=t.tta, normalize=run.norm["test"])
            row.update(test_loss=per_epoch_test["loss"], test_acc=per_epoch_test["acc"])
        if len(stages) > 1:
            row["stage"] = stage.name
        tracker.log("epoch", state.step, row)
        tracker.print(f"epoch {epoch + 1}/{t.epochs}  train loss {row['train_loss']:.4f} "
                      f"acc {row['train_acc']:.2%}  val loss {val['loss']:.4f} acc {val['acc']:.2%}  "
                      f"{row['images_per_s']:,.0f} img/s")
        state.epoch, state.batch, state.epoch_sums = epoch + 1, 0, [0.0, 0.0, 0.0]
        if state.epoch < t.epochs and state.epoch >= stage.end:  # the next epoch opens a new stage:
            stage = stage_at(stages, state.epoch)  # switch first, so its checkpoint holds the new stage
            run.close()
            run = _StageRun(accelerator, raw_model, splits, stage, cfg.run.seed, num_classes, loader_kind, ema)
        saved = save(state)
        if on_epoch_end is not None:  # the row, and the checkpoint that holds this epoch's end
            on_epoch_end({**row, "checkpoint": str(saved)})
        if state.epoch < t.epochs:
            stop = preempt.requested()
            if stop:
                preempt.stop(stop, state, saved)

    tracker.close()
    log = cfg.log
    test = evaluate(run.eval_model, run.eval_criterion, run.test_dl, accelerator, num_classes, t.channels_last,
                    run.eval_tap, tta=t.tta, normalize=run.norm["test"],
                    keep=_plot_sample(len(splits.test), log.embed_max, cfg.run.seed) if log.plots else None)
    train_eval = None
    if log.plots:  # the training split once more, unaugmented: its confusion matrix and features
        train_eval_dl = accelerator.prepare(DataLoader(splits.train, batch_size=d.eval_batch_size, shuffle=False,
                                                       collate_fn=collate_for(splits.train), num_workers=d.num_workers))
        train_eval = evaluate(run.eval_model, run.eval_criterion, train_eval_dl, accelerator, num_classes,
                              t.channels_last, run.eval_tap, tta=t.tta, normalize=run.norm["train"],
                              keep=_plot_sample(len(splits.train), log.embed_max, cfg.run.seed))
    accelerator.wait_for_everyone()
    # RUN/model.safetensors: the weights the test accuracy belongs to (the average, with EMA)
    accelerator.save_model(run.eval_model, str(run_dir), safe_serialization=True)
    summary = {
        "test_acc": test["acc"], "test_top5": test["top5"], "test_loss": test["loss"],
        "num_test_samples": test["num_samples"], "best_val_acc": state.best_val_acc,
        "best_epoch": state.best_epoch, "epochs": t.epochs, "steps": state.step,
        "images_per_s": state.images / max(state.train_time_s, 1e-9),
        "train_time_s": state.train_time_s, "wall_s": time.perf_counter() - t_start,
        "world_size": accelerator.num_processes, "distributed_type": accelerator.distributed_type.value,
        "precision": t.precision, "loader": run.loader, "decode": run.decode, "ema_decay": t.ema_decay, "tta": t.tta, "num_params": num_params, "num_trainable_params": run.num_trainable, "nonfinite_steps": state.nonfinite_total,
        "resumed_from": str(resume_path) if resume_path else None,
        "per_class_acc": dict(zip(splits.class_names, test["per_class_acc"])),
        "run_dir": str(run_dir),
    }
    tracker.log("test", state.step, {"acc": test["acc"], "top5": test["top5"], "loss": test["loss"]})
    tracker.write_json("summary.json", summary)
    if accelerator.is_main_process:
        _write_confusion(run_dir / "confusion_test.csv", splits.class_names, test["confusion"])
        (run_dir / "data.json").write_text(json.dumps(splits.meta, indent=1) + "\n")
        if train_eval is not None:
            _write_confusion(run_dir / "confusion_train.csv", splits.class_names, train_eval["confusion"])
            if "features" in test and len(test["features"]):
                save_file({"train/features": train_eval["features"].contiguous(), "train/labels": train_eval["labels"],
                           "test/features": test["features"].contiguous(), "test/labels": test["labels"]},
                          str(run_dir / "embeddings.safetensors"))
            _write_plots(run_dir, log, tracker)
    accelerator.end_training()
    return summary
