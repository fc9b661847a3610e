"""A training stage's objects: `StageRun(...)` builds the model wrapper, loss, optimizer,
schedule, loaders and batch preparation for one stage, prepared by Accelerate, and hands the
loop one TrainStep. A new stage is a new StageRun on the same plain model: what is trainable
changes, so DDP must be re-wrapped and the optimizer rebuilt.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn
from torch.utils.data import DataLoader

from toolkit.config import Stage
from toolkit.data.augment import AUGMENTS
from toolkit.data.base import collate_for, device_items
from toolkit.data.device_loader import DeviceLoader, agreed_reason, device_loader_reason
from toolkit.data.mix import BatchMix
from toolkit.data.samplers import EpochSampler, PKSampler
from toolkit.ema import ModelEma
from toolkit.engine.evaluate import FeatureTap
from toolkit.engine.loop import BatchPrep, TrainStep
from toolkit.engine.nonfinite import make_policy
from toolkit.errors import ConfigError
from toolkit.losses import LOSSES
from toolkit.models import apply_freeze
from toolkit.optim import OPTIMIZERS, SCHEDULERS, param_groups


def check_batch_sizes(num_train: int, batch_size: int, eval_batch_size: int, drop_last: bool, world: int,
                      sampler: str = "random", pk_k: int = 4) -> None:
    """The batch settings against the training split and the world size; fit runs it for every
    stage before the run directory is made, so a bad batch size leaves nothing behind."""
    for key, b in (("data.batch_size", batch_size), ("data.eval_batch_size", eval_batch_size)):
        if b % world:
            raise ConfigError(f"config: {key}: {b} is not divisible by the {world} processes "
                              "(it is the global batch, split across processes)")
    if not drop_last and world > 1 and num_train % batch_size:
        raise ConfigError(f"config: data.drop_last: false would pad the last training batch with repeated "
                          f"samples on {world} processes ({num_train} images, batch {batch_size}); "
                          "keep it true or pick a batch size that divides the split")
    if drop_last and num_train < batch_size:
        raise ConfigError(f"config: data.batch_size: {batch_size} is larger than the training split "
                          f"({num_train} images); lower it or set data.drop_last=false")
    if sampler == "pk" and (batch_size // world) % pk_k:
        raise ConfigError(f"config: data.batch_size: {batch_size} split over {world} processes must leave "
                          f"whole classes of data.pk_k={pk_k} images on each")


def make_loaders(splits, batch_size: int, eval_batch_size: int, num_workers: int, drop_last: bool,
                 seed: int, world: int, sampler: str = "random", pk_k: int = 4):
    check_batch_sizes(len(splits.train), batch_size, eval_batch_size, drop_last, world, sampler, pk_k)
    common = dict(num_workers=num_workers,
                  pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0)
    if sampler == "pk":
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


class StageRun:
    """What one stage trains with: freeze mode, loss, optimizer, schedule, loaders, batch
    preparation and the non-finite policy, all prepared by Accelerate. `step` is what
    train_epoch runs; `eval_model`/`eval_tap`/`norm` are what evaluation runs."""

    def __init__(self, accelerator: Accelerator, raw_model: nn.Module, splits, stage: Stage, seed: int,
                 num_classes: int, loader_kind: str, ema: Optional[ModelEma] = None):
        c, d, t = stage.cfg, stage.cfg.data, stage.cfg.train
        self.accelerator = accelerator
        apply_freeze(raw_model, c.model.freeze)  # before the optimizer and DDP see the parameters
        self.num_trainable = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
        loss_kw = {k: v for k, v in dataclasses.asdict(c.loss).items() if k != "name"}
        criterion = LOSSES.build(c.loss.name, **loss_kw)
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
        if loader_kind == "device":
            model, optimizer, self.val_dl, self.test_dl = accelerator.prepare(raw_model, optimizer, val_dl, test_dl)
            self.train_dl = DeviceLoader(splits.train, self.sampler, d.batch_size, train_dl.drop_last,
                                         accelerator.device, accelerator.process_index,
                                         accelerator.num_processes, accelerator.gradient_state)
        else:
            model, optimizer, self.train_dl, self.val_dl, self.test_dl = accelerator.prepare(
                raw_model, optimizer, train_dl, val_dl, test_dl)
        self.steps_per_epoch = math.ceil(len(self.train_dl) / t.grad_accum_steps)
        sched_kw = {k: v for k, v in dataclasses.asdict(c.sched).items() if k != "name"}
        scheduler = accelerator.prepare(SCHEDULERS.build(
            c.sched.name, optimizer=optimizer, steps_per_epoch=self.steps_per_epoch, epochs=t.epochs, **sched_kw))
        tap = FeatureTap(model) if getattr(criterion, "needs_features", False) else None
        stats = {k: splits.meta[k] for k in ("mean", "std", "image_size") if k in splits.meta}
        prep = BatchPrep(
            normalize=None if loader_kind == "device" else self.norm["train"],  # DeviceLoader normalises
            augment=AUGMENTS.build(d.augment, **stats),
            mix=BatchMix(d.mixup_alpha, d.cutmix_alpha, num_classes) if d.mixup_alpha > 0 or d.cutmix_alpha > 0
            else None,
            channels_last=bool(t.channels_last), rank=accelerator.process_index, world=accelerator.num_processes)
        self.step = TrainStep(model, criterion, optimizer, scheduler, prep, make_policy(t.nonfinite, t.max_nonfinite),
                              tap=tap, ema=ema, clip_grad_norm=t.clip_grad_norm)
        # What validation and test run: the weights' moving average when train.ema_decay > 0.
        self.eval_model = model if ema is None else ema.module
        self.eval_tap = tap if ema is None or tap is None else FeatureTap(ema.module)

    def epoch_loader(self, epoch: int, batch: int):
        """The training loader for `epoch`, positioned past its first `batch` batches (resume)."""
        self.sampler.set_epoch(epoch)
        self.train_dl.set_epoch(epoch)
        if isinstance(self.train_dl, DeviceLoader):
            return self.train_dl.iterate(batch)  # the epoch's order from batch k
        if batch > 0:
            loader = self.accelerator.skip_first_batches(self.train_dl, batch)
            loader.set_epoch(epoch)
            return loader
        return self.train_dl

    def close(self) -> None:
        """Release the wrappers so the plain model can be prepared again for the next stage."""
        if self.step.tap is not None:
            self.step.tap.remove()
        if self.eval_tap is not None and self.eval_tap is not self.step.tap:
            self.eval_tap.remove()
        self.accelerator.unwrap_model(self.step.model, keep_fp32_wrapper=False, keep_torch_compile=False)
        self.accelerator.free_memory()
        self.step = None
