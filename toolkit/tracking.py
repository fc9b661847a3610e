"""What a run tells the user: console (rich progress or plain lines), TensorBoard, metrics.jsonl.

Only the main process writes or prints. Other ranks get a tracker whose methods do nothing,
so the training loop never branches on rank.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

from toolkit.errors import disk_full
from toolkit.rundir import REPORT, RunDir, append_text, run_lock, write_atomic, write_atomic_json, write_atomic_text


# The scalars TensorBoard's HParams tab shows per run (tags as Tracker.log writes them).
HPARAM_METRICS = ("epoch/val_acc", "epoch/val_loss", "epoch/train_loss", "test/acc")


def _clean(metrics: Dict[str, Any]) -> Dict[str, Any]:
    return {k: (float(v) if isinstance(v, float) else v)
            for k, v in metrics.items()}


class Tracker:
    def __init__(self, accelerator, run_dir: Path, progress: str = "auto"):
        self.accelerator = accelerator
        self.enabled = accelerator.is_main_process
        self.run_dir = run_dir
        self.run = RunDir(run_dir)
        self.console = Console(stderr=False, highlight=False)
        if progress == "auto":
            progress = "rich" if self.console.is_terminal else "plain"
        self.mode = progress if self.enabled else "none"
        self._progress: Optional[Progress] = None
        self._task = None
        self._loss = "-"  # the last logged loss: the bar shows it between log steps
        self._t0 = time.perf_counter()

    # --- console -------------------------------------------------------------------------
    def print(self, msg: str) -> None:
        if self.mode == "rich":
            self.console.print(msg)
        elif self.mode == "plain":
            print(msg, flush=True)

    def start_epoch(self, epoch: int, epochs: int, total: int, done: int = 0) -> None:
        if self.mode != "rich":
            return
        if self._progress is None:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[ips]} img/s  loss {task.fields[loss]}"),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                console=self.console, transient=False)
            self._progress.start()
        self._task = self._progress.add_task(f"epoch {epoch + 1}/{epochs}", total=total,
                                             completed=done, ips="-", loss=self._loss)

    def advance(self, n: int, images_per_s: float, loss: Optional[float]) -> None:
        """`loss`: the log window's mean on log steps, None on the others (the bar keeps the last)."""
        if loss is not None:
            self._loss = f"{loss:.4f}"
        if self.mode == "rich" and self._task is not None:
            self._progress.update(self._task, advance=n, ips=f"{images_per_s:,.0f}", loss=self._loss)

    def end_epoch(self) -> None:
        if self.mode == "rich" and self._task is not None:
            self._task = None  # the finished bar stays on screen as the epoch's record

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    # --- files -----------------------------------------------------------------------------
    def log(self, kind: str, step: int, metrics: Dict[str, Any]) -> None:
        """One line in metrics.jsonl and the same scalars in TensorBoard under `kind/`."""
        if not self.enabled:
            return
        row = {"kind": kind, "step": step, "time": round(time.time(), 3), **_clean(metrics)}
        append_text(self.run.metrics, json.dumps(row) + "\n")  # whole or not at all (a full disk)
        scalars = {f"{kind}/{k}": v for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if scalars and self.accelerator.trackers:
            try:
                self.accelerator.log(scalars, step=step)
            except Exception as e:  # TensorBoard's writer thread re-raises its OSError here
                full = disk_full(e, self.run.tensorboard)
                if full is None:
                    raise
                raise full from e

    def start_tensorboard(self, hparams: Dict[str, Any]) -> None:
        """Accelerate's TensorBoard tracker on RUN/tb/ (the logging dir set before this), with
        the run's hyperparameters written into that same run: TensorBoard's HParams tab shows
        them next to the run's own scalars.

        Not `init_trackers(config=...)`: Accelerate passes the config to
        `SummaryWriter.add_hparams`, which writes it as a second run, `tb/<time.time()>/` (an extra
        run named by a timestamp in TensorBoard's list), plus `hparams.yml` in a third folder."""
        self.accelerator.init_trackers("tb")  # every rank: Accelerate starts the writer on the main one
        if not self.enabled or not self.accelerator.trackers:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        values = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
        writer = self.accelerator.get_tracker("tensorboard", unwrap=True)  # a SummaryWriter on RUN/tb/
        # experiment, session start, session end: what add_hparams writes, here into the run itself;
        # the metrics named are the run's own scalar tags (Tracker.log: kind/key)
        for summary in hparams_summaries(values, dict.fromkeys(HPARAM_METRICS, 0.0)):
            writer.file_writer.add_summary(summary)
        writer.flush()

    def truncate_after(self, step: int) -> None:
        """On resume: drop rows logged after the checkpoint, which the resumed run logs again."""
        path = self.run.metrics
        if not self.enabled or not path.exists():
            return
        rows = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # a line torn by the crash
                continue
            # The test row of a finished run is logged again when that run is resumed.
            if row.get("step", 0) <= step and row.get("kind") != "test":
                rows.append(line)
        write_atomic_text(path, "".join(r + "\n" for r in rows))

    def write_json(self, name: str, data: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        write_atomic_json(self.run_dir / name, data)

    def write_text(self, name: str, text: str) -> None:
        if self.enabled:
            write_atomic_text(self.run_dir / name, text)

    def save_tensors(self, name: str, tensors: Dict[str, Any]) -> None:
        """A safetensors file in the run directory, written atomically."""
        if self.enabled:
            from safetensors.torch import save_file

            write_atomic(self.run_dir / name, lambda tmp: save_file(tensors, str(tmp)))

    def lock(self, wait_s: float = 0.0) -> contextlib.AbstractContextManager:
        """RUN/.lock, held by the process that writes (rank 0) for as long as the context lasts."""
        return run_lock(self.run_dir, wait_s) if self.enabled else contextlib.nullcontext()

    def write_plots(self, tsne: bool, classes: Optional[List[int]]) -> None:
        """The run's plots and report.html. A plot that fails costs a warning, never the finished run."""
        if not self.enabled:
            return
        from toolkit import report

        try:
            images = report.run_report(self.run_dir, tsne=tsne, classes=classes)
            self.print(f"plots: {', '.join(p.name for p in images)} and {REPORT}")
        except Exception as e:  # noqa: BLE001 (the weights and metrics are already safe on disk)
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            self.print(f"warning: plots not written: {msg} (python -m toolkit.report {self.run_dir} retries)")
