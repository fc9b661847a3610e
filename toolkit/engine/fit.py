"""fit: set-up -> resume -> for each epoch (train, validate, log, save, next stage) -> test and results.

    accelerate launch toolkit/train.py --config configs/digits_lenet.yaml
    summary = fit(load_config("configs/digits_lenet.yaml"))

`data.batch_size` is the global batch, split across processes, so one process and N processes
take the same steps. Only rank 0 writes run-directory files; the Tracker does that gating.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import shutil
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import (DataLoaderConfiguration, DistributedType, InitProcessGroupKwargs, ProjectConfiguration,
                              broadcast_object_list, set_seed)
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader

from toolkit import checkpoint, rundir
from toolkit.accelerate_compat import set_logging_dir
from toolkit.config import Config, DataConfig, Stage, check_paths, hparams, resolve_stages, stage_at, to_yaml
from toolkit.data import DATASETS
from toolkit.data.base import collate_for
from toolkit.data.noise import flip_labels
from toolkit.ema import ModelEma
from toolkit.engine.best import BestEpoch, copy_weights
from toolkit.engine.evaluate import evaluate, plot_sample
from toolkit.engine.holdout import select_training
from toolkit.engine.loop import train_epoch
from toolkit.engine.resume import EMA_FILE, apply_optim_hparams, find_resume, load_ema, load_resume, recorded_speed
from toolkit.engine.stage import StageRun, check_batch_sizes, choose_loader
from toolkit.engine.state import TrainState
from toolkit.errors import ConfigError, disk_full
from toolkit.fast import change_note, resolve_channels_last, resolve_precision, summary_fields, with_resolved
from toolkit.faults import Faults
from toolkit.models import MODELS
from toolkit.models.freeze import unwrap
from toolkit.preempt import Preemption
from toolkit.tracking import Tracker, accelerate_trackers, check_trackers, resolve_trackers

OnEpochEnd = Callable[[Dict[str, Any]], None]


def fit(cfg: Config, on_epoch_end: Optional[OnEpochEnd] = None, optim_from_config: bool = False,
        lock_wait_s: float = 0.0) -> Dict[str, Any]:
    """Train, validate every epoch, test at the end. Returns (and writes) the summary.

    `on_epoch_end(row)` gets each epoch's metrics once its checkpoint is saved (row["checkpoint"]).
    With `optim_from_config`, a resumed run takes lr, momentum and weight decay from `cfg`
    rather than from the checkpoint (population-based training continues another trial's
    state with its own perturbed hyperparameters). `lock_wait_s`: how long to wait for
    another process to leave the run directory before giving up."""
    with contextlib.ExitStack() as stack:
        return _fit(cfg, on_epoch_end, optim_from_config, lock_wait_s, stack)


def _fit(cfg: Config, on_epoch_end: Optional[OnEpochEnd], optim_from_config: bool, lock_wait_s: float,
         stack: contextlib.ExitStack) -> Dict[str, Any]:
    t_start = time.perf_counter()
    check_paths(cfg)
    trackers = resolve_trackers(cfg.log.trackers, cfg.log.tensorboard)
    check_trackers(trackers)  # a tracker's missing package: one line, before anything is created
    owns_group = not torch.distributed.is_initialized()  # (a Ray Train worker's group is Ray's)
    # `auto` precision and channels_last are resolved for this process's device (toolkit/fast.py),
    # or kept as the checkpoint a resume continues was trained; config.yaml keeps what was asked.
    asked, recorded = cfg, recorded_speed(cfg.train.resume, cfg.run.dir)
    precision = resolve_precision(cfg.train.precision, recorded.get("precision"))
    cfg = with_resolved(cfg, "train", precision=precision.value)
    accelerator = make_accelerator(cfg, trackers)
    if owns_group:  # on every way out: an error, a stop request, or after end_training (a no-op then)
        stack.callback(release_process_group)
    t = cfg.train
    seed_everything(cfg.run.seed, t.deterministic, t.compile)
    splits, num_classes, noise_record, selection = load_data(cfg.data, cfg.model.num_classes, accelerator)
    loader_kind = choose_loader(cfg.data.loader, splits.train, accelerator)
    stages = resolve_stages(cfg)
    check_distributed_support(accelerator, stages, t.ema_decay)
    for st in stages:
        d = st.cfg.data
        check_batch_sizes(len(splits.train), d.batch_size, d.eval_batch_size, d.drop_last, accelerator.num_processes,
                          d.sampler, d.pk_k)
    raw_model = MODELS.build(cfg.model.name, num_classes=num_classes, pretrained=cfg.model.pretrained)
    channels_last = resolve_channels_last(t.channels_last, raw_model, recorded.get("channels_last"))
    cfg = with_resolved(cfg, "train", channels_last=channels_last.value)
    t, stages = cfg.train, resolve_stages(cfg)  # every stage trains with the resolved value
    if t.channels_last:
        raw_model = raw_model.to(memory_format=torch.channels_last)
    # The run directory appears only once the data, the batch sizes and the model (its weights
    # file) have passed their checks: a run refused for any of them leaves nothing behind.
    run = rundir.RunDir(resolve_run_dir(cfg, accelerator))
    tracker = Tracker(accelerator, run.path, cfg.log.progress)
    stack.enter_context(tracker.lock(lock_wait_s))
    # The directory the run used, not `null`: config.yaml is the record of where it ran.
    config_yaml = to_yaml(dataclasses.replace(asked, run=dataclasses.replace(asked.run, dir=str(run.path))))
    tracker.write_text(rundir.CONFIG, config_yaml)
    if noise_record is not None:
        tracker.write_text(rundir.LABEL_NOISE, json.dumps(noise_record) + "\n")  # one line: it lists every change
    selection.write_records(tracker)  # RUN/excluded.json (data.exclude)

    resume_path = find_resume(accelerator, t.resume, run.checkpoints, tracker)
    state = TrainState.load(resume_path) if resume_path else TrainState()
    stage = stage_at(stages, state.epoch)  # a checkpoint holds the optimizer of its next epoch's stage
    # The average is copied from the model on its device (Accelerate moves the model there).
    ema = ModelEma(raw_model.to(accelerator.device), t.ema_decay) if t.ema_decay > 0 else None
    stage_run = StageRun(accelerator, raw_model, splits, stage, cfg.run.seed, num_classes, loader_kind, ema)
    if resume_path is not None:
        state = resume_into(accelerator, stage_run, ema, raw_model, resume_path, run.checkpoints, tracker,
                            stage.cfg.optim if optim_from_config else None)
    tracker.truncate_after(state.step)
    state.precision, state.channels_last = precision.value, channels_last.value  # saved with every checkpoint
    if trackers:
        set_logging_dir(accelerator, run.path)
        tracker.start_trackers(trackers, hparams(cfg))
    speed = f"precision {precision.describe()}, channels_last {channels_last.describe()}"
    tracker.print(_banner(cfg, run.path, raw_model, stage_run, splits, accelerator, len(stages), speed))
    warnings = run_warnings(cfg.model.pretrained, stages[0]) + [note for st in stages for note in st.notes]
    warnings += [n for n in (change_note("train.precision", precision),
                             change_note("train.channels_last", channels_last)) if n]
    for w in warnings:
        tracker.print(f"warning: {w}")

    preempt = Preemption(accelerator, run.path, t.preempt_check_steps)
    stack.callback(preempt.close)
    saver = Checkpointer(accelerator, run.checkpoints, config_yaml, t.keep_last, t.checkpoint_every_steps, ema,
                         preempt)
    saver.best_weights = load_best_weights(resume_path, state, tracker)
    best = BestEpoch(str(t.monitor), t.early_stop_patience, t.early_stop_min_delta)
    faults = Faults.from_env()
    while state.epoch < t.epochs and not state.stopped_early:
        epoch = state.epoch
        if len(stages) > 1 and epoch == stage.start and state.batch == 0:
            tracker.print(_stage_line(stage, len(stages), stage_run.num_trainable))
        row = run_epoch(cfg, stage_run, accelerator, state, tracker, faults, saver, num_classes)
        if epoch == 0:  # the warm-up epoch, left out of the steady rate (summary.json)
            state.warmup_images, state.warmup_time_s = state.images, state.train_time_s
        if best.update(row, state):  # every rank alike: the validation numbers are gathered
            saver.best_weights = copy_weights(accelerator, stage_run.eval_model)
        if len(stages) > 1:
            row["stage"] = stage.name
        tracker.log("epoch", state.step, row)
        tracker.print(_epoch_line(row, t.epochs))
        state.epoch, state.batch, state.epoch_sums = epoch + 1, 0, [0.0, 0.0, 0.0]
        if best.should_stop(state) and state.epoch < stage.end:  # (at the stage's end it ends anyway)
            tracker.print(stop_early(best, state, stage, t.epochs))
        if state.epoch < t.epochs and state.epoch >= stage.end and not state.stopped_early:
            stage = stage_at(stages, state.epoch)  # the next epoch opens a new stage: switch first,
            stage_run.close()  # so that its checkpoint holds the new stage
            stage_run = StageRun(accelerator, raw_model, splits, stage, cfg.run.seed, num_classes, loader_kind, ema)
            best.new_stage(state)
        saved = saver.save(state)
        done = state.epoch >= t.epochs or bool(state.stopped_early)
        if on_epoch_end is not None:  # the row, and the checkpoint that holds this epoch's end
            on_epoch_end({**row, "checkpoint": str(saved), "last_epoch": done})
        if not done:
            saver.stop_if_requested(state, saved)
    preempt.close()  # the run is past its last checkpoint: Ctrl-C during the test stops at once
    tracker.close()
    selection.write_holdout_probs(tracker, stage_run.eval_model, accelerator, cfg.data.eval_batch_size,  # the final
                                  cfg.data.num_workers, t.channels_last, t.tta)  # model's, on its held-out fold
    summary = finish(cfg, stage_run, splits, accelerator, tracker, run, state, num_classes, t_start=t_start,
                     resumed_from=resume_path, num_params=sum(p.numel() for p in raw_model.parameters()),
                     warnings=warnings, best_weights=saver.best_weights,
                     speed={**summary_fields("precision", precision), **summary_fields("channels_last", channels_last),
                            **selection.summary_fields()})
    accelerator.wait_for_everyone()  # rank 0 has written the plots: every rank tears down together
    accelerator.end_training()
    return summary


# ------------------------------------------------------------------------------------------
# set-up


def release_process_group() -> None:
    """Destroy the process group before the interpreter shuts down. Left to finalization, gloo's
    threads can still hold work whose tensors reference Python objects, and the process aborts
    (SIGABRT, "terminate called without an active exception") after it has done its job; seen
    on a rank that stopped on a preemption request."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def make_accelerator(cfg: Config, trackers: Optional[List[str]] = None) -> Accelerator:
    """The run's Accelerator; TRACKERS (default: log.trackers as resolve_trackers gives them)
    become its `log_with`."""
    t = cfg.train
    if trackers is None:
        trackers = resolve_trackers(cfg.log.trackers, cfg.log.tensorboard)
    if t.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("config: train.precision: fp16 needs a CUDA GPU; use bf16 on CPU")
    # `accelerate launch` with a DeepSpeed launch file sets this in every process. Without CUDA
    # the engine would form a gloo group (cpu=True below) and train without ZeRO: say so instead.
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and not torch.cuda.is_available():
        raise ConfigError("launch: the launch file asks for DeepSpeed, which this toolkit runs on CUDA GPUs only, "
                          "and no GPU is visible; on CPUs launch with launch/cpu_ddp.yaml")
    return Accelerator(
        # Without CUDA, Accelerate forms a gloo group (MULTI_CPU) only when told it is on the CPU;
        # otherwise torchrun's processes each see world size 1.
        cpu=not torch.cuda.is_available(),
        mixed_precision=resolve_precision(t.precision).value,  # fit passes it resolved; `auto` for other callers
        gradient_accumulation_steps=t.grad_accum_steps,
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        log_with=accelerate_trackers(trackers, cfg.run.name) or None,
        # The run directory is chosen after start-up (rank 0 picks, all ranks agree); it is set
        # before init_trackers, which is when TensorBoard reads it (accelerate_compat.set_logging_dir).
        project_config=ProjectConfiguration(project_dir=".", logging_dir="."),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=t.dist_timeout_s))],
        dynamo_backend="inductor" if t.compile else "no",
        rng_types=[],  # our sampler is seeded per epoch; nothing to synchronise
    )


def seed_everything(seed: int, deterministic: bool, compiled: bool) -> None:
    set_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        if compiled:
            torch.use_deterministic_algorithms(True, warn_only=True)
        else:
            # torch.use_deterministic_algorithms imports torch._inductor.config (~1 s of
            # start-up) only to set inductor's copy of the flag, which compiled code alone reads.
            torch._C._set_deterministic_algorithms(True, warn_only=True)
    # Not deterministic: let cuDNN time its algorithms for each new input shape and keep the
    # fastest (the shapes repeat every step here); a no-op without CUDA.
    torch.backends.cudnn.benchmark = not deterministic


def load_data(d: DataConfig, model_classes: Optional[int], accelerator: Accelerator):
    """(splits, number of classes the model predicts, the label-noise record or None, the
    Selection: the held-out fold and excluded samples, already dropped from splits.train)."""
    with accelerator.main_process_first():  # one rank downloads/extracts; the others then read
        splits = DATASETS.build(d.name, root=d.root, split_seed=d.split_seed, limit=d.limit,
                                download=d.download, image_size=d.image_size,
                                train_splits=list(d.train_splits))
    if splits.num_classes < 2:
        raise ConfigError(f"config: data: {d.name} has {splits.num_classes} class(es) in its training split; "
                          "a classifier needs at least 2")
    for name in ("train", "val", "test"):
        if len(getattr(splits, name)) == 0:
            raise ConfigError(f"config: data: the {name} split of {d.name} is empty"
                              f"{' (data.limit)' if d.limit is not None else ''}")
    num_classes = model_classes or splits.num_classes
    if num_classes < splits.num_classes:
        raise ConfigError(f"config: model.num_classes: {num_classes} is fewer than the dataset's "
                          f"{splits.num_classes} classes")
    if d.label_noise <= 0:
        return splits, num_classes, None, select_training(splits, d)
    labels = getattr(splits.train, "labels", None)
    if not isinstance(labels, torch.Tensor):
        raise ConfigError(f"config: data.label_noise: dataset {d.name!r} does not expose its labels")
    noisy, changed = flip_labels(labels, d.label_noise, splits.num_classes, d.split_seed)
    record = {"rate": d.label_noise, "seed": d.split_seed, "num_changed": len(changed),
              "num_train": len(labels), "index": changed.tolist(),
              "original": labels[changed].tolist(), "noisy": noisy[changed].tolist()}
    splits.train.labels = noisy
    return splits, num_classes, record, select_training(splits, d)


def check_distributed_support(accelerator: Accelerator, stages: List[Stage], ema_decay: float) -> None:
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    if len(stages) > 1:
        raise ConfigError("config: train.stages: several stages need a new optimizer and model wrapper per "
                          "stage, which DeepSpeed's engine does not allow; run the stages as separate runs")
    if ema_decay > 0:
        raise ConfigError("config: train.ema_decay: the weight average needs whole parameters on every rank, "
                          "which DeepSpeed's ZeRO shards; use DDP for EMA runs")


def resolve_run_dir(cfg: Config, accelerator: Accelerator) -> Path:
    """run.dir, or runs/<name>/<timestamp> chosen on rank 0 and shared with every rank; created.

    A fresh run writes only into an empty or absent directory: anything there (a user's files,
    another run's weights, summary or checkpoints) would be overwritten or mixed with this
    run's. With train.resume=auto and no checkpoint yet, what a run writes before its first
    checkpoint may be there (the same run, stopped early)."""
    chosen = [cfg.run.dir or str(Path("runs") / cfg.run.name / datetime.now().strftime("%Y%m%d-%H%M%S"))]
    if accelerator.num_processes > 1:
        broadcast_object_list(chosen, from_process=0)
    run = rundir.RunDir(Path(chosen[0]).absolute())
    # Rank 0 looks, every rank gets its answer: a rank that looked later would see the files
    # rank 0 is starting to write.
    problem = [fresh_dir_problem(run, cfg.train.resume) if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(problem, from_process=0)
    if problem[0] is not None:
        raise ConfigError(problem[0])
    if accelerator.is_main_process:  # around the barrier: the other ranks wait until it exists
        rundir.ensure_writable(run.path)
    accelerator.wait_for_everyone()
    return run.path


def run_warnings(pretrained: Optional[str], first: Stage) -> List[str]:
    """Settings that run, but likely not as meant: printed at the start, kept in the summary."""
    out = []
    if first.cfg.model.freeze == "backbone" and not pretrained:
        where = "model.freeze=backbone" if first.name == "main" else f"stage {first.name!r} freezes the backbone"
        out.append(f"{where} without model.pretrained: the frozen backbone keeps its random initial weights "
                   "and only the classifier learns")
    return out


def fresh_dir_problem(run: rundir.RunDir, resume: str) -> Optional[str]:
    """The one line that refuses a run directory a fresh start would clobber, naming what is
    there; None when the directory may be used."""
    if resume not in ("none", "auto") or not run.path.is_dir():
        return None
    if resume == "auto" and checkpoint.list_checkpoints(run.checkpoints):
        return None  # a resume: find_resume decides which checkpoint
    allowed = () if resume == "none" else rundir.BEFORE_FIRST_CHECKPOINT
    # What would be lost first: weights, results, checkpoints; then the rest, hidden files last.
    first = (rundir.MODEL, rundir.SUMMARY, rundir.CHECKPOINTS)
    found = sorted((p.name for p in run.path.iterdir() if p.name not in allowed),
                   key=lambda n: (n not in first, first.index(n) if n in first else 0, n.startswith("."), n))
    if not found:
        return None
    shown = ", ".join(found[:6]) + (f" and {len(found) - 6} more" if len(found) > 6 else "")
    hint = ("continue that run with train.resume=auto, or " if rundir.CHECKPOINTS in found else "") + \
        "choose an empty or new run.dir"
    return (f"config: run.dir: {run.path} is not empty (it holds {shown}); a new run writes only "
            f"into an empty directory: {hint}")


def resume_into(accelerator: Accelerator, stage_run: StageRun, ema: Optional[ModelEma], raw_model: nn.Module,
                path: Path, ckpt_root: Path, tracker: Tracker, optim=None) -> TrainState:
    """Load checkpoint `path` into the prepared objects. `optim` (an OptimConfig): put its lr,
    momentum and weight decay on the loaded optimizer (population-based training)."""
    state = load_resume(accelerator, path, ckpt_root, tracker)
    if ema is not None:
        load_ema(ema, raw_model, path, tracker)
    if optim is not None:
        saved_lr = float(yaml.safe_load((path / rundir.CONFIG).read_text())["optim"]["lr"])
        apply_optim_hparams(stage_run.step.optimizer, stage_run.step.scheduler, optim, saved_lr)
    return state


def load_best_weights(path: Optional[Path], state: TrainState, tracker: Tracker) -> Optional[Dict[str, torch.Tensor]]:
    """The best epoch's weights from the checkpoint a run resumes (every rank reads them), or None."""
    if path is None or state.best_metric_epoch < 0:
        return None
    f = path / rundir.MODEL_BEST
    if not f.is_file():  # a checkpoint from before best weights were kept
        tracker.print(f"{path.name} has no {rundir.MODEL_BEST}: the best weights start again from the next epoch")
        state.best_metric, state.best_metric_epoch = None, -1
        return None
    return load_file(str(f))


def stop_early(best: BestEpoch, state: TrainState, stage: Stage, epochs: int) -> str:
    """Early stopping ends the stage: the run, or on to the next stage. Returns the log line."""
    if stage.end >= epochs:
        state.stopped_early = state.epoch
        return f"early stop after epoch {state.epoch}: {best.reason(state)}"
    skipped, last = stage.end - state.epoch, state.epoch
    state.epoch = stage.end
    return (f"early stop of stage {stage.name!r} after epoch {last}: {best.reason(state)}; "
            f"its last {skipped} epoch(s) are skipped")


# ------------------------------------------------------------------------------------------
# epochs


class Checkpointer:
    """Saves a checkpoint after every epoch, every `every` steps within one, and when a stop is
    requested (SIGTERM, SIGUSR1, RUN/.preempt); then stops the run with the resume hint."""

    def __init__(self, accelerator: Accelerator, root: Path, config_yaml: str, keep_last: int, every: int,
                 ema: Optional[ModelEma], preempt: Preemption):
        self.accelerator, self.root, self.config_yaml = accelerator, root, config_yaml
        self.keep_last, self.every, self.ema, self.preempt = keep_last, every, ema, preempt

    best_weights: Optional[Dict[str, torch.Tensor]] = None  # the best epoch's, saved with every checkpoint

    def save(self, state: TrainState) -> Path:
        extra = {}
        if self.ema is not None:
            extra[EMA_FILE] = self.ema.state_dict()
        if self.best_weights is not None:  # covered by the checkpoint's checksums like the rest
            extra[rundir.MODEL_BEST] = self.best_weights
        return checkpoint.save(self.accelerator, self.root, state.step, dataclasses.asdict(state),
                               self.config_yaml, self.keep_last, extra=extra or None)

    def on_step(self, state: TrainState, read_sums: Callable[[], torch.Tensor], batches: int) -> None:
        """After an optimizer step; `batches` in the epoch (the last batch's checkpoint is the epoch's)."""
        mid_epoch = state.batch < batches
        stop = self.preempt.requested(state.step) if mid_epoch else 0.0
        if stop or (self.every and state.step % self.every == 0 and mid_epoch):
            both = self.accelerator.reduce(read_sums(), reduction="sum").tolist()
            state.epoch_sums, state.log_sums = both[:3], both[3:]
            saved = self.save(state)
            if stop:
                self.preempt.stop(stop, state, saved)

    def stop_if_requested(self, state: TrainState, saved: Path) -> None:
        stop = self.preempt.requested()
        if stop:
            self.preempt.stop(stop, state, saved)


def run_epoch(cfg: Config, stage_run: StageRun, accelerator: Accelerator, state: TrainState, tracker: Tracker,
              faults: Faults, saver: Checkpointer, num_classes: int) -> Dict[str, Any]:
    """Train epoch `state.epoch` (from batch `state.batch`), validate, and return its metrics row."""
    t, epoch = cfg.train, state.epoch
    loader = stage_run.epoch_loader(epoch, state.batch)
    tracker.start_epoch(epoch, t.epochs, stage_run.steps_per_epoch * t.grad_accum_steps, state.batch)
    loss_n, correct, n = train_epoch(stage_run.step, loader, accelerator, state, tracker,
                                     log_every=cfg.log.every_n_steps, faults=faults,
                                     on_step=functools.partial(saver.on_step, batches=len(stage_run.train_dl)))
    tracker.end_epoch()
    val = _evaluate(stage_run, stage_run.val_dl, "val", accelerator, num_classes, t)
    if val["acc"] > state.best_val_acc:
        state.best_val_acc, state.best_epoch = val["acc"], epoch + 1
    row = {"epoch": epoch + 1, "train_loss": loss_n / max(n, 1), "train_acc": correct / max(n, 1),
           "val_loss": val["loss"], "val_acc": val["acc"], "val_top5": val["top5"],
           "lr": state.lr,  # what the epoch's last update used (the schedule has moved on since)
           "images_per_s": state.images / max(state.train_time_s, 1e-9)}
    if cfg.log.test_every_epoch:
        test = _evaluate(stage_run, stage_run.test_dl, "test", accelerator, num_classes, t)
        row.update(test_loss=test["loss"], test_acc=test["acc"])
    return row


def _evaluate(stage_run: StageRun, loader, split: str, accelerator: Accelerator, num_classes: int, t,
              keep: Optional[torch.Tensor] = None) -> Dict[str, Any]:
    return evaluate(stage_run.eval_model, stage_run.eval_criterion, loader, accelerator, num_classes,
                    t.channels_last, stage_run.eval_tap, keep=keep, tta=t.tta, normalize=stage_run.norm[split])


# ------------------------------------------------------------------------------------------
# the end: test, weights, summary, confusion matrices, plots


def finish(cfg: Config, stage_run: StageRun, splits, accelerator: Accelerator, tracker: Tracker,
           run: rundir.RunDir, state: TrainState, num_classes: int, *, t_start: float, resumed_from: Optional[Path],
           num_params: int, warnings: List[str], best_weights: Optional[Dict[str, torch.Tensor]],
           speed: Dict[str, Any]) -> Dict[str, Any]:
    """Save RUN/model.safetensors (last) and RUN/model_best.safetensors, test, write the summary and
    the result files; returns the summary. `t_start`: when fit began (wall_s counts everything up
    to the summary); `warnings`: what run_warnings said at the start, kept in the summary.

    train.test_weights: `both` tests the last weights (test_acc, the confusion matrix, the plots)
    and the best (test_acc_best); `last` only the last; `best` only the best, whose numbers then
    fill test_acc and the rest (`tested_weights` in the summary says which)."""
    t, d, log = cfg.train, cfg.data, cfg.log
    # RUN/model.safetensors: the last epoch's weights (the average, with EMA)
    save_final_weights(accelerator, stage_run.eval_model, run)
    if best_weights is not None:
        tracker.save_tensors(rundir.MODEL_BEST, best_weights)
    can_load = best_weights is not None and accelerator.distributed_type != DistributedType.DEEPSPEED
    if best_weights is not None and not can_load and t.test_weights != "last":
        warnings = warnings + ["the best weights are saved but not tested under DeepSpeed (its engine holds "
                               "the parameters); test RUN/model_best.safetensors with toolkit.predict"]
    tested = "best" if t.test_weights == "best" and can_load else "last"
    if tested == "best":
        unwrap(stage_run.eval_model).load_state_dict(best_weights)
    sample = functools.partial(plot_sample, most=log.embed_max, seed=cfg.run.seed)
    test = _evaluate(stage_run, stage_run.test_dl, "test", accelerator, num_classes, t,
                     keep=sample(len(splits.test)) if log.plots else None)
    train_eval = None
    if log.plots:  # the training split once more, unaugmented: its confusion matrix and features
        train_eval_dl = accelerator.prepare(DataLoader(splits.train, batch_size=d.eval_batch_size, shuffle=False,
                                                       collate_fn=collate_for(splits.train), num_workers=d.num_workers))
        train_eval = _evaluate(stage_run, train_eval_dl, "train", accelerator, num_classes, t,
                               keep=sample(len(splits.train)))
    best_test = None
    if t.test_weights == "both" and can_load:
        unwrap(stage_run.eval_model).load_state_dict(best_weights)
        best_test = _evaluate(stage_run, stage_run.test_dl, "test", accelerator, num_classes, t)
    accelerator.wait_for_everyone()
    summary = {
        "test_acc": test["acc"], "test_top5": test["top5"], "test_loss": test["loss"],
        "tested_weights": tested,
        "test_acc_best": best_test["acc"] if best_test else None,
        "test_top5_best": best_test["top5"] if best_test else None,
        "test_loss_best": best_test["loss"] if best_test else None,
        "monitor": str(t.monitor), "best_epoch": state.best_metric_epoch, "best_metric": state.best_metric,
        "stopped_early": state.stopped_early or None,
        "num_test_samples": test["num_samples"], "best_val_acc": state.best_val_acc,
        "best_val_acc_epoch": state.best_epoch, "epochs": t.epochs, "steps": state.step,
        **training_rates(state), "train_time_s": state.train_time_s,
        "wall_s": time.perf_counter() - t_start,
        "world_size": accelerator.num_processes, "distributed_type": accelerator.distributed_type.value,
        **speed, "loader": stage_run.loader, "decode": stage_run.decode,
        "ema_decay": t.ema_decay, "tta": str(t.tta), "num_params": num_params, "trackers": tracker.trackers,
        "num_trainable_params": stage_run.num_trainable, "nonfinite_steps": state.nonfinite_total,
        "resumed_from": str(resumed_from) if resumed_from else None, "warnings": warnings,
        "per_class_acc": dict(zip(splits.class_names, test["per_class_acc"])), "run_dir": str(run.path),
        # predict and export check the weights they load against these
        "weights_sha256": {f.name: rundir.sha256(f) for f in (run.model, run.model_best)
                           if accelerator.is_main_process and f.is_file()},
    }
    tracker.log("test", state.step, {"acc": test["acc"], "top5": test["top5"], "loss": test["loss"],
                                     **({"acc_best": best_test["acc"]} if best_test else {})})
    tracker.write_json(rundir.SUMMARY, summary)  # before the plots, which read it
    # One name per model output: a model with more outputs than the data has classes (E4's head
    # of 35 on a smaller folder) names the rest by index, so the CSV's header fits its rows.
    names = list(splits.class_names) + [str(i) for i in range(len(splits.class_names), num_classes)]
    tracker.write_text(run.confusion("test").name, confusion_csv(names, test["confusion"]))
    tracker.write_json(rundir.DATA, {**splits.meta, "class_names": list(splits.class_names)})  # predict reads them
    if train_eval is not None:
        tracker.write_text(run.confusion("train").name, confusion_csv(names, train_eval["confusion"]))
        if "features" in test and len(test["features"]):
            tracker.save_tensors(rundir.EMBEDDINGS, {
                "train/features": train_eval["features"].contiguous(), "train/labels": train_eval["labels"],
                "test/features": test["features"].contiguous(), "test/labels": test["labels"]})
        plots = tracker.write_plots(tsne=log.tsne, classes=list(log.embed_classes) or None)
        tracker.tensorboard_images(state.step, plots, splits.test, tested, accelerator.device)
    return summary


def training_rates(state: TrainState) -> Dict[str, Any]:
    """images_per_s: the steady training rate, from the second epoch on (the first pays cuDNN
    autotuning, compilation and first allocations: on an H200 a ResNet-50 run's whole-run rate
    was 712 images/s against a steady 4,607); with one epoch, that epoch's.
    images_per_s_whole_run: every epoch. Neither counts evaluation or checkpoints."""
    whole = state.images / max(state.train_time_s, 1e-9)
    images, seconds = state.images - state.warmup_images, state.train_time_s - state.warmup_time_s
    steady = images > 0 and seconds > 0 and state.warmup_images > 0
    return {"images_per_s": images / seconds if steady else whole, "images_per_s_whole_run": whole,
            "images_per_s_from_epoch": 2 if steady else 1}


def save_final_weights(accelerator: Accelerator, model: nn.Module, run: rundir.RunDir) -> None:
    """RUN/model.safetensors, never half-written: Accelerate writes into a temp folder beside it
    (every rank takes part: ZeRO-3 gathers the weights), then rank 0 renames the file into place.
    A full disk is one line naming the file; the temp folder is removed."""
    tmp = run.path / ".tmp-model"
    if accelerator.is_main_process:  # around the collective save
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_model(model, str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            os.replace(tmp / rundir.MODEL, run.model)
    except (OSError, RuntimeError) as e:
        full = disk_full(e, run.model)
        if full is None:
            raise
        raise full from None
    finally:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)


def confusion_csv(names: List[str], matrix: List[List[int]]) -> str:
    rows = [",".join(["true/pred", *names])]
    rows += [",".join([name, *map(str, r)]) for name, r in zip(names, matrix)]
    return "\n".join(rows) + "\n"


# ------------------------------------------------------------------------------------------
# what the console says


def _banner(cfg: Config, run_dir: Path, raw_model: nn.Module, stage_run: StageRun, splits,
            accelerator: Accelerator, num_stages: int, speed: str) -> str:
    num_params = sum(p.numel() for p in raw_model.parameters())
    return (f"run {run_dir}: {cfg.model.name} ({num_params:,} parameters, {stage_run.num_trainable:,} trained) "
            f"on {cfg.data.name} ({len(splits.train)}/{len(splits.val)}/{len(splits.test)} train/val/test), "
            f"{accelerator.num_processes} process(es), {accelerator.distributed_type.value}, "
            f"device {accelerator.device}, {speed}, loader {stage_run.loader}"
            + (f", {num_stages} stages" if num_stages > 1 else ""))


def _stage_line(stage: Stage, num_stages: int, num_trainable: int) -> str:
    return (f"stage {stage.index + 1}/{num_stages} {stage.name!r}: epochs {stage.start + 1}-{stage.end}, "
            f"loss {stage.cfg.loss.name}, freeze {stage.cfg.model.freeze}, {num_trainable:,} parameters trained")


def _epoch_line(row: Dict[str, Any], epochs: int) -> str:
    return (f"epoch {row['epoch']}/{epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.2%}  "
            f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.2%}  {row['images_per_s']:,.0f} img/s")
