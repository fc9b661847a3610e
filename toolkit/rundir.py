"""The run-directory contract: every file a command writes into a run, by name, and how it is
written (atomically: a temp file beside the target, fsynced, then renamed over it).

    run = RunDir(Path("runs/digits_lenet/20261127-140000"))
    write_atomic_json(run.summary, {...})
    with run_lock(run.path): ...

Train, extract, tune, report, prepare and checkpoint all write through this module, so a crash
never leaves a half-written file under a final name, and the names live in one place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Union

from toolkit.errors import ConfigError, disk_full

# File and folder names of the run-directory contract (docs/architecture.md, "Run directory").
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
TENSORBOARD = "tb"
MLRUNS = "mlruns"  # MLflow's file store (log.trackers=[mlflow], MLFLOW_TRACKING_URI unset)
WANDB = "wandb"  # W&B's offline run files (log.trackers=[wandb])
CHECKPOINTS = "checkpoints"
MODEL = "model.safetensors"  # the last epoch's weights (the average, with EMA)
MODEL_BEST = "model_best.safetensors"  # the best epoch's, by train.monitor
SUMMARY = "summary.json"
DATA = "data.json"
LABEL_NOISE = "label_noise.json"
EXCLUDED = "excluded.json"  # data.exclude: the training indices left out, and the CSV's sha256
HOLDOUT_PROBS = "holdout_probs.safetensors"  # data.holdout_folds: the held-out fold's index, labels, probs
# toolkit.clean's directory CLEAN: its settings, the folds' space, each fold's run, and the results
CLEAN_JOB = "clean.json"
CLEAN_SPACE = "folds.yaml"
CLEAN_RUNS = "runs"  # CLEAN/runs/fold_K: ordinary runs (toolkit.tune puts a sweep's runs there too)
CLEAN_FOLD = "fold_{fold}"
OOF_PROBS = "oof_probs.safetensors"  # every training sample's out-of-fold probabilities
LABEL_ISSUES = "label_issues.csv"
LABEL_ISSUES_GRID = "label_issues.png"
EMBEDDINGS = "embeddings.safetensors"
CONFUSION = "confusion_{split}.csv"
FEATURES = "features"
REPORT = "report.html"
PREDICTIONS = "predictions.csv"  # toolkit.predict's default output
EXPORT = "export"  # toolkit.export's default folder
TRIAL = "trial.json"  # a sweep trial's run: where its last attempt ran (toolkit.tune)
LOCK = ".lock"
PREEMPT = ".preempt"  # a stop request (slurm/train.sh writes it on SIGUSR1/SIGTERM)
# What a run has written before its first checkpoint (or a sweep or SLURM job put there for it):
# a directory holding only these may start afresh with train.resume=auto.
BEFORE_FIRST_CHECKPOINT = (CONFIG, LABEL_NOISE, EXCLUDED, METRICS, TENSORBOARD, MLRUNS, WANDB, CHECKPOINTS, LOCK,
                           TRIAL, PREEMPT)


@dataclass(frozen=True)
class RunDir:
    """Paths of one run directory, by name. Creating it or locking it are separate steps."""

    path: Path

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def model(self) -> Path:
        return self.path / MODEL

    @property
    def model_best(self) -> Path:
        return self.path / MODEL_BEST

    @property
    def summary(self) -> Path:
        return self.path / SUMMARY

    @property
    def data(self) -> Path:
        return self.path / DATA

    @property
    def label_noise(self) -> Path:
        return self.path / LABEL_NOISE

    @property
    def embeddings(self) -> Path:
        return self.path / EMBEDDINGS

    @property
    def features(self) -> Path:
        return self.path / FEATURES

    @property
    def report(self) -> Path:
        return self.path / REPORT

    @property
    def trial(self) -> Path:
        return self.path / TRIAL

    def confusion(self, split: str) -> Path:
        return self.path / CONFUSION.format(split=split)


def temp_path(path: Path) -> Path:
    """Where `path` is written before it is renamed into place: a hidden sibling, so that the
    rename is atomic (same filesystem) and a crash leaves only a dot-file behind."""
    return path.with_name(f".{path.name}.tmp")


def write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Write `path` through `write(tmp)` (which creates tmp), fsync, rename over `path`. On any
    error the temp file is removed and `path` is left as it was; a full disk is one
    DiskFullError naming `path`."""
    tmp = temp_path(path)
    try:
        write(tmp)
        _inject_no_space(path)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # (a delayed write that finds the disk full fails here)
        os.replace(tmp, path)
    except BaseException as e:
        # Asked before the temp file is removed: the space it holds is part of the evidence.
        full = disk_full(e, path) if isinstance(e, Exception) else None
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if full is not None:
            raise full from e
        raise
    return path


def append_text(path: Path, text: str) -> None:
    """Append `text` to `path` whole or not at all: a write cut short (a full disk) is
    truncated away, so no torn line is left for the next append to glue onto."""
    data = text.encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.fstat(fd).st_size
        try:
            _inject_no_space(path)
            view = memoryview(data)
            while view:  # a short write (the disk filling up) is followed by ENOSPC on the next
                view = view[os.write(fd, view):]
        except OSError as e:
            full = disk_full(e, path)
            os.ftruncate(fd, start)  # truncating frees space, it never needs any
            if full is not None:
                raise full from e
            raise
    finally:
        os.close(fd)


def _inject_no_space(path: Path) -> None:
    """TOOLKIT_FAULT_NO_SPACE (toolkit/faults.py): the test suite's full disk. Imported only
    when set, so that plain runs never load the fault module from here."""
    if os.environ.get("TOOLKIT_FAULT_NO_SPACE"):
        from toolkit.faults import no_space

        no_space(path)


def write_atomic_bytes(path: Path, data: bytes) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_atomic_text(path: Path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def write_atomic_json(path: Path, data: Any, indent: Union[int, None] = 1) -> Path:
    return write_atomic_text(path, json.dumps(data, indent=indent) + "\n")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def replace_dir(tmp: Path, final: Path, old: Path) -> None:
    """Put the complete directory `tmp` at `final` by renames. An existing `final` is first moved
    to `old` and removed only after, so a crash between the renames leaves one of the two whole."""
    if final.exists() or final.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def ensure_writable(path: Path) -> Path:
    """Create `path` (and parents) and prove a file can be written there, or one ConfigError line."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"config: run.dir: cannot write to {path}: {e.strerror}") from None
    return path


# The fds of the run locks this process holds. A process forked while one is held (a DataLoader
# worker) closes its copy at once (_forget_locks): an flock lasts while any process keeps the
# file open, so a worker that outlives its killed parent by the seconds it takes to notice would
# keep the run "in use" and refuse the resume that follows the crash.
_HELD: set = set()


def _forget_locks() -> None:
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_locks)


@contextlib.contextmanager
def run_lock(run_dir: Path, wait_s: float = 0.0) -> Iterator[None]:
    """Hold RUN/.lock (an exclusive flock, released when the process ends however it ends):
    two processes writing into one run directory would overwrite each other's files.
    Waits up to `wait_s` for a previous holder (a sweep trial orphaned by a killed driver).
    A clean exit removes the file, so a finished run leaves no `.lock` behind."""
    path = run_dir / LOCK
    deadline = time.monotonic() + wait_s
    while True:
        fd = _try_lock(path)
        if fd is not None:
            break
        if time.monotonic() >= deadline:
            holder = _read_holder(path)
            raise ConfigError(f"config: run.dir: {run_dir} is in use by another process (pid {holder}); "
                              "wait for it to end or choose another run.dir")
        time.sleep(0.5)
    _HELD.add(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        # Unlinked while still held: a process waiting on this file then finds, once it gets the
        # lock, that the name no longer leads to it, and starts over with a new file (_try_lock).
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        _HELD.discard(fd)
        os.close(fd)  # releases the lock


def _try_lock(path: Path):
    """An fd holding the flock of the file now at `path`, or None when another process holds it."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    try:
        same = os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        same = False
    if not same:  # the holder we waited for removed the file as it let go: lock the new one
        os.close(fd)
        return _try_lock(path)
    return fd


def _read_holder(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()[:32] or "?"
    except OSError:
        return "?"
