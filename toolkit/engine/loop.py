"""One training epoch: `train_epoch(step, loader, accelerator, state, tracker, ...)`.

`step` (a TrainStep) is what a stage trains with: the prepared model, loss, optimizer, schedule,
what happens to a batch before the forward pass, and the non-finite policy. Precision,
distribution and accumulation are Accelerate's business (autocast, backward, accumulate), so
the same lines run on CPU, one GPU, DDP and DeepSpeed.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
from accelerate import Accelerator
from torch import nn

from toolkit.accelerate_compat import cache_package_probe, fast_zero_grad
from toolkit.ema import ModelEma
from toolkit.engine.nonfinite import NonFinitePolicy, SkipNonFinite
from toolkit.engine.state import TrainState
from toolkit.faults import Faults
from toolkit.models import set_train_mode
from toolkit.models.freeze import unwrap
from toolkit.tracking import Tracker

OnStep = Callable[[TrainState, Callable[[], torch.Tensor]], None]


def _no_context(*_args) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


@dataclass
class BatchPrep:
    """What happens to a training batch between the loader and the forward pass, in this order:
    uint8 -> float on the device (`normalize`), this rank's slice of the global batch augmented
    as a whole (`augment`), MixUp/CutMix (`mix`: (B,) labels -> (B, K) soft labels), memory format.
    `rank`/`world` pick this process's slice of the augmentation drawn for the global batch: a
    multi-process caller must set them (StageRun does, from the Accelerator)."""

    normalize: Optional[Callable] = None
    augment: Optional[Callable] = None
    mix: Optional[Callable] = None
    channels_last: bool = False
    rank: int = 0
    world: int = 1

    def __call__(self, x: torch.Tensor, y: torch.Tensor):
        if self.normalize is not None:  # (B / world, C, H, W) uint8 -> float32, where the batch is
            x = self.normalize(x)
        if self.augment is not None:  # drawn for the global batch on every rank; this rank keeps its slice
            x = self.augment(x, start=self.rank * x.shape[0], total=x.shape[0] * self.world)
        if self.mix is not None:
            x, y = self.mix(x, y)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y


@dataclass
class TrainStep:
    """What one optimizer step uses; fixed for a stage. `tap` (a FeatureTap) hands the penultimate
    features to a loss that needs them; `ema` is updated after every optimizer step."""

    model: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    prep: BatchPrep = field(default_factory=BatchPrep)
    nonfinite: NonFinitePolicy = field(default_factory=SkipNonFinite)
    tap: Optional[object] = None
    ema: Optional[ModelEma] = None
    clip_grad_norm: Optional[float] = None

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.tap is None:
            return self.criterion(logits, y)
        return self.criterion(logits, y, features=self.tap.features)


class RunningSums:
    """This rank's running sums, kept on the device so that no step waits for the host: loss * n
    and correct for the epoch, loss * n since the last log, each a 0-dim float64 added to in place
    (no tensor made from host numbers per step). Sample counts are Python numbers.

    A resumed epoch starts from the checkpoint's sums, which are already summed over ranks: only
    rank 0 adds them, so that the next all-reduce counts them once."""

    def __init__(self, device: torch.device, state: TrainState, holds_saved: bool):
        self.loss, self.correct, self.log_loss = (torch.zeros((), dtype=torch.float64, device=device)
                                                  for _ in range(3))
        self.n = self.log_n = 0.0
        if holds_saved:
            self.loss += state.epoch_sums[0]
            self.correct += state.epoch_sums[1]
            self.n = state.epoch_sums[2]
            self.log_loss += state.log_sums[0]
            self.log_n = state.log_sums[1]

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        m = y.shape[0]
        hard = y if y.ndim == 1 else y.argmax(1)  # mixed labels count as their larger part
        self.loss.add_(loss, alpha=m)
        self.log_loss.add_(loss, alpha=m)
        self.correct.add_((logits.argmax(1) == hard).sum())
        self.n += m
        self.log_n += m

    def read(self) -> torch.Tensor:
        """(loss * n, correct, n, loss * n since the last log, n since the last log)."""
        return torch.stack([self.loss, self.correct, self.loss.new_tensor(self.n), self.log_loss,
                            self.loss.new_tensor(self.log_n)])

    def log_window(self) -> torch.Tensor:
        return torch.stack([self.log_loss, self.log_loss.new_tensor(self.log_n)])

    def reset_log(self) -> None:
        self.log_loss.zero_()
        self.log_n = 0.0


def train_epoch(step: TrainStep, loader, accelerator: Accelerator, state: TrainState, tracker: Tracker, *,
                log_every: int, faults: Faults = Faults(), on_step: OnStep = lambda *_: None) -> List[float]:
    """One pass over `loader` (already positioned past `state.batch` batches).

    `on_step(state, read_sums)` runs after every optimizer step; `read_sums()` gives this rank's
    running sums (for a checkpoint), only when called; it is collective (the non-finite policy
    checks there). Returns the epoch's (loss * n, correct, n) summed over all ranks."""
    cache_package_probe()  # Accelerate's per-step importlib probe, answered once (idempotent)
    set_train_mode(step.model)  # train mode, but BatchNorm of a frozen backbone stays in eval
    sums = RunningSums(accelerator.device, state, holds_saved=accelerator.is_main_process)
    step.nonfinite.start(accelerator, state)
    read_sums = functools.partial(_checked_sums, sums, step.nonfinite, state)
    clock = _Clock(state)
    # Accelerate's contexts cost ~0.2 ms per step each; enter them only when they do something.
    accumulate = accelerator.accumulate if accelerator.gradient_accumulation_steps > 1 else _no_context
    autocast = accelerator.autocast if accelerator.mixed_precision != "no" else _no_context
    zero_grad = fast_zero_grad(step.optimizer, accelerator)
    for x, y in loader:
        x, y = step.prep(x, y)
        with accumulate(step.model):
            with autocast():
                logits = step.model(x)  # (B / world, C)
                loss = step.loss(logits, y)
            loss = faults.loss(loss, state.step + 1, accelerator.process_index)
            if step.nonfinite.skip(loss, state, tracker):
                # Skip this micro-batch's backward; on the window's last micro-batch the update is
                # skipped too and the window's gradients are dropped.
                step.optimizer.zero_grad(set_to_none=True)
            else:
                if accelerator.sync_gradients:
                    state.nonfinite_run = 0
                accelerator.backward(loss)
                if step.clip_grad_norm is not None and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(step.model.parameters(), step.clip_grad_norm)
                step.optimizer.step()  # Accelerate makes this a no-op until the window is complete
                zero_grad()
                sums.add(loss.detach(), logits.detach(), y)
        state.batch += 1
        state.images += x.shape[0] * accelerator.num_processes
        if not accelerator.sync_gradients:
            continue
        _after_update(step, accelerator, state)
        logging = state.step % log_every == 0
        shown_loss = _reduce_log_window(sums, step.nonfinite, accelerator, state) if logging else None
        ips = clock.tick(state, new_window=logging)
        if logging:
            tracker.log("train", state.step, {"loss": shown_loss, "lr": state.lr,
                                              "epoch": state.epoch, "images_per_s": ips})
        tracker.advance(accelerator.gradient_accumulation_steps, ips, shown_loss)
        on_step(state, read_sums)
        faults.after_step(state.step, accelerator.process_index)
        clock.restart()  # checkpoint time is not training time
    both = accelerator.reduce(read_sums(), reduction="sum").tolist()
    clock.tick(state)  # the loader's end and this wait for the device
    state.log_sums = both[3:]  # the log window runs on into the next epoch
    return both[:3]


class _Clock:
    """Training time counts every step and the host's waits for the device (the log step's reduce,
    the epoch's last one), not checkpoints. images/s is over a log window: when the host runs
    ahead of the device between log steps, a single step's time says nothing."""

    def __init__(self, state: TrainState):
        self.t_last = time.perf_counter()
        self.images, self.time = state.images, state.train_time_s  # where the log window began

    def tick(self, state: TrainState, new_window: bool = False) -> float:
        """Add the time since the last tick to state.train_time_s; images/s over the window."""
        state.train_time_s += time.perf_counter() - self.t_last
        ips = (state.images - self.images) / max(state.train_time_s - self.time, 1e-9)
        if new_window:
            self.images, self.time = state.images, state.train_time_s
        return ips

    def restart(self) -> None:
        self.t_last = time.perf_counter()


def _reduce_log_window(sums: RunningSums, policy: NonFinitePolicy, accelerator: Accelerator,
                       state: TrainState) -> float:
    """The log window's mean loss over all ranks (waits for this rank's queued device work); the
    policy's check rides on the same all-reduce. Starts the next window."""
    tot = accelerator.reduce(torch.cat([sums.log_window(), policy.pending()]), reduction="sum").tolist()
    policy.check(tot[2:], state)
    sums.reset_log()
    return tot[0] / max(tot[1], 1.0)


def _checked_sums(sums: RunningSums, policy: NonFinitePolicy, state: TrainState) -> torch.Tensor:
    """This rank's running sums, after the policy's (collective) check: what a checkpoint saves."""
    policy.check_all(state)
    return sums.read()


def _after_update(step: TrainStep, accelerator: Accelerator, state: TrainState) -> None:
    """Once per optimizer update: the schedule, the weight average, the step count."""
    state.lr = step.scheduler.get_last_lr()[0]  # the rate this update used, before the schedule moves on
    step.scheduler.step()
    if step.ema is not None:
        step.ema.update(unwrap(step.model))
        if accelerator.num_processes > 1:
            step.ema.sync_buffers()
    state.step += 1
