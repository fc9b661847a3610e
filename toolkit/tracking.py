"""What a run tells the user: console (rich progress or plain lines), metrics.jsonl, and the
experiment trackers of log.trackers (TensorBoard, MLflow, W&B, through Accelerate's tracker API).

Only the main process writes or prints. Other ranks get a tracker whose methods do nothing,
so the training loop never branches on rank.

Every row goes to metrics.jsonl and, as scalars named `kind/key`, to each tracker
(`accelerator.log`). Where each tracker writes, unless the user's environment says otherwise:
TensorBoard in RUN/tb/; MLflow in a file store in RUN/mlruns/ (MLFLOW_TRACKING_URI set: there),
experiment = run.name; W&B offline in RUN/wandb/ (WANDB_MODE set: that mode), project = run.name.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

from toolkit.errors import ConfigError, disk_full
from toolkit.rundir import (MLRUNS, REPORT, RunDir, append_text, run_lock, write_atomic, write_atomic_json,
                            write_atomic_text)


# The scalars TensorBoard's HParams tab shows per run (tags as Tracker.log writes them).
HPARAM_METRICS = ("epoch/val_acc", "epoch/val_loss", "epoch/train_loss", "test/acc")


# The package a tracker imports, and the command that installs it (the one-line refusal says it).
TRACKER_PACKAGES = {
    "mlflow": ("mlflow", "pip install mlflow-skinny (the project's extra: pip install -e '.[mlflow]')"),
    "wandb": ("wandb", "pip install wandb"),
}
PREDICTION_GRID_IMAGES = 16  # test images on TensorBoard's test/predictions grid (2 rows of predict's grid)


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def resolve_trackers(names: Sequence[str], tensorboard: bool) -> List[str]:
    """log.trackers as plain words; log.tensorboard=false drops TensorBoard from them (the older
    switch, which runs, tests and benchmarks still use to turn it off)."""
    return [str(n) for n in names if str(n) != "tensorboard" or tensorboard]


def check_trackers(names: Sequence[str]) -> None:
    """One ConfigError line (exit 2) for a chosen tracker whose package does not import, before
    anything is created. Importing is the honest test (a package can be found and still not
    import), and only what was chosen is imported: the default run never loads mlflow or wandb."""
    for name in names:
        if name not in TRACKER_PACKAGES:
            continue
        module, install = TRACKER_PACKAGES[name]
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ConfigError(f"config: log.trackers: {name} needs the {module} package, which does not import "
                              f"({_first_line(e)}); {install}") from None


def accelerate_trackers(names: Sequence[str], project: str) -> List[Any]:
    """What `Accelerator(log_with=...)` gets for NAMES. TensorBoard by name: Accelerate builds it
    at init_trackers("tb") as RUN/tb/. MLflow and W&B as tracker objects named after the project
    (run.name): by name, Accelerate would give them init_trackers' project name, which is "tb",
    as experiment and project. Building them imports neither package."""
    from accelerate.tracking import MLflowTracker, WandBTracker

    out: List[Any] = []
    for name in names:
        if name == "tensorboard":
            out.append("tensorboard")
        elif name == "mlflow":
            out.append(MLflowTracker(experiment_name=project))
        elif name == "wandb":
            # offline unless the user chose a mode: a run never sends data anywhere by default
            out.append(WandBTracker(project, **({} if os.environ.get("WANDB_MODE") else {"mode": "offline"})))
        else:
            raise ValueError(f"unknown tracker {name!r}")  # config validation lists the valid ones
    return out


def mlflow_store(run_dir: Path) -> str:
    """Point MLflow at the user's MLFLOW_TRACKING_URI, else at a file store in RUN/mlruns/, and
    return the URI. MLflow's own default is sqlite:///mlflow.db in the working directory, which
    is outside the run and needs the full mlflow package (SQLAlchemy); its file store is kept but
    refused since MLflow 3.7 unless MLFLOW_ALLOW_FILE_STORE is true, so that is set (only here,
    where the toolkit chose the file store)."""
    import mlflow

    if os.environ.get("MLFLOW_TRACKING_URI"):
        return mlflow.get_tracking_uri()
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (run_dir / MLRUNS).absolute().as_uri()
    mlflow.set_tracking_uri(uri)
    return uri


@contextlib.contextmanager
def env_defaults(values: Dict[str, str]):
    """VALUES in os.environ for the length of the block, each only where the user has not set it
    (W&B reads its directory and run name from there when it starts)."""
    added = [k for k in values if k not in os.environ]
    os.environ.update({k: values[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def read_png(path: Path):
    """A PNG as an (H, W, 3) uint8 array, for SummaryWriter.add_image(dataformats="HWC")."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def first_test_images(test_split, n: int, pre, classes: List[str]):
    """The first N images of the run's own test split, in predict's collection format. Not
    predict's `--split` rebuild: building a folder dataset again checks every image of every
    split (minutes on a large folder). Folder images are read from their files through predict's
    image-file pipeline, the training pipeline of image folders (whatever the engine has since
    made the dataset hand out: uint8, or JPEG bytes with data.decode=device); in-memory sets go
    through SplitAsCollection, as `predict --split` feeds them."""
    from toolkit.data.collection import SplitAsCollection
    from toolkit.predict import ImageFiles

    paths = getattr(test_split, "paths", None)
    if paths is None:
        return SplitAsCollection(test_split, "run", "test", classes, {})
    k = min(n, len(paths))
    return ImageFiles([str(p) for p in paths[:k]], [int(y) for y in test_split.labels[:k]], pre, classes)


def prediction_grid(run_dir: Path, test_split, weights: str, device, n: int):
    """predict's --grid figure for the first N images of the test split, predicted by the weights
    file the test used (`weights`: "last" | "best"), as `python -m toolkit.predict RUN --split
    test --weights W --grid grid.png --grid-max N` draws it: each image titled with the predicted
    class and its probability, green when right, red with the true class when wrong. The model
    comes from the run directory, so this holds under any world size or DeepSpeed sharding."""
    import torch

    from toolkit.predict import (display_image, grid_figure, make_loader, open_run, predict_batches, run_precision,
                                 to_rows)

    loaded = open_run(run_dir, weights)
    source = first_test_images(test_split, n, loaded.preprocess, loaded.classes)
    first = list(range(min(n, len(source))))
    t = loaded.cfg.train
    model = loaded.model.to(device)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    precision, _ = run_precision(loaded, None, device.type == "cuda")
    part = predict_batches(model, make_loader(source, [first], 0), device, source.normalize, 1, precision,
                           t.channels_last, str(t.tta))
    rows = to_rows([part], source, loaded.classes)[:len(first)]
    return grid_figure(rows, [display_image(source, i, loaded.preprocess) for i in first])


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
        self.trackers: List[str] = []  # the run's trackers, by name (start_trackers)

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
        """One line in metrics.jsonl and the same scalars in every tracker under `kind/`."""
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

    def start_trackers(self, names: Sequence[str], hparams: Dict[str, Any]) -> None:
        """Start the Accelerator's trackers (NAMES: those it was built with, accelerate_trackers)
        for this run directory, each with the run's hyperparameters.

        TensorBoard on RUN/tb/ (the logging dir set before this), with the hyperparameters
        written into that same run: TensorBoard's HParams tab shows them next to the run's own
        scalars. Not `init_trackers(config=...)`: Accelerate passes the config to
        `SummaryWriter.add_hparams`, which writes it as a second run, `tb/<time.time()>/` (an extra
        run named by a timestamp in TensorBoard's list), plus `hparams.yml` in a third folder.
        MLflow and W&B get them as their run's parameters / config (store_init_configuration)."""
        names = list(names)
        self.trackers = names  # (every rank: the summary each rank returns names them)
        store = mlflow_store(self.run_dir) if self.enabled and "mlflow" in names else None
        # W&B: its files in RUN/wandb/, its run named like the run directory (unless the user set these)
        wandb_env = {"WANDB_DIR": str(self.run_dir), "WANDB_NAME": self.run_dir.name}
        with env_defaults(wandb_env if self.enabled and "wandb" in names else {}):
            self.accelerator.init_trackers("tb")  # every rank: Accelerate starts the trackers on the main one
        if not self.enabled or not self.accelerator.trackers:
            return
        values = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
        for name in names:
            if name != "tensorboard":
                self.accelerator.get_tracker(name).store_init_configuration(values)
        if store is not None:
            self._name_mlflow_run(store)
        if "tensorboard" in names:
            self._tensorboard_hparams(values)

    def _name_mlflow_run(self, store: str) -> None:
        """The MLflow run named like the run directory and tagged with its path, and one line
        saying where it is (MLflow would name it at random: `bouncy-cat-123`)."""
        import mlflow

        mlflow.set_tags({"mlflow.runName": self.run_dir.name, "run_dir": str(self.run_dir)})
        run_id = self.accelerator.get_tracker("mlflow", unwrap=True).info.run_id
        self.print(f"mlflow: run {run_id} in {store}")

    def _tensorboard_hparams(self, values: Dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

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

    def write_plots(self, tsne: bool, classes: Optional[List[int]]) -> List[Path]:
        """The run's plots and report.html -> the images written. A plot that fails costs a
        warning, never the finished run."""
        if not self.enabled:
            return []
        from toolkit import report

        try:
            images = report.run_report(self.run_dir, tsne=tsne, classes=classes)
            self.print(f"plots: {', '.join(p.name for p in images)} and {REPORT}")
            return images
        except Exception as e:  # noqa: BLE001 (the weights and metrics are already safe on disk)
            self.print(f"warning: plots not written: {_first_line(e)} "
                       f"(python -m toolkit.report {self.run_dir} retries)")
            return []

    def tensorboard_images(self, step: int, plots: Sequence[Path], test_split, weights: str, device) -> None:
        """TensorBoard's images at the end of a run (log.plots): `train/confusion` and
        `test/confusion`, the confusion_*.png files just written by the plots (read back, so
        TensorBoard shows exactly those pictures), and `test/predictions`, the predictions of the
        tested weights (`weights`) on the first images of `test_split` (prediction_grid). Like
        the plots, a failure costs a warning, never the finished run."""
        if not self.enabled or "tensorboard" not in self.trackers:
            return
        writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
        try:
            for split in ("train", "test"):
                for png in (p for p in plots if p.name == f"confusion_{split}.png"):
                    writer.add_image(f"{split}/confusion", read_png(png), step, dataformats="HWC")
            fig = prediction_grid(self.run_dir, test_split, weights, device, PREDICTION_GRID_IMAGES)
            writer.add_figure("test/predictions", fig, step)  # rendered at the figure's dpi, then closed
            writer.flush()
        except Exception as e:  # noqa: BLE001 (the weights, metrics and plots are already on disk)
            import matplotlib.pyplot as plt

            plt.close("all")  # a grid left half-made would stay in memory in a process that runs on (a sweep)
            self.print(f"warning: TensorBoard images not written: {_first_line(e)}")
