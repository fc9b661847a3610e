"""Labels for new images from a trained run: image files, folders, or a split of the run's dataset.

    python -m toolkit.predict RUN images/ --grid grid.png             # files and folders (recursive)
    python -m toolkit.predict RUN --split test --weights last          # the run's own test split
    accelerate launch --config_file launch/cpu_ddp.yaml toolkit/predict.py RUN images/ --topk 3
    toolkit-predict RUN images/                                        # the console command, from any directory

    from toolkit import load_run, predict                              # in a notebook
    model, preprocess, classes = load_run(RUN)                         # eval mode, on the CPU
    rows = predict(RUN, ["a.png", "b.png"])                            # one dict per input

Everything the images need comes from RUN, nothing is restated: the model and its weights
(`--weights best|last`; default best where RUN/model_best.safetensors exists, else last), the
image size, channels and normalisation (RUN/data.json: what the dataset fed the model), the
class names, and the run's precision, channels_last and test-time flip (RUN/config.yaml; an `auto`
precision is the one the run ran with, summary.json's, and an `auto` channels_last is decided for
the device predict runs on, as training decides it: toolkit/fast.py). Image
files go through the training pipeline of image folders (`toolkit.data.images.load_resized`:
decode, shorter side to the run's size, centre crop), then the run's mean/std. A split
(`--split train|val|test`) is rebuilt from the run's config and data.split_seed, and fed exactly
as the engine's evaluation feeds it: on the test split with `--weights last`, predict's accuracy
is summary.json's test_acc.

A folder is searched recursively; where its top-level folders are class names of the run (a
class-per-folder tree such as an image folder's test/), its images get those true labels.
Images that do not decode (empty, truncated, not an image, decompression bombs) are listed
and do not stop the run: their CSV row carries the reason in `error`.

Any number of processes: the inputs are cut into batches of --batch-size in input order, and
batch j goes to rank j % world (as extraction deals out shards), so every input is predicted
once, each batch holds the same images whatever the world size, and rank 0 writes the rows in
input order after gathering them.

Output: a CSV (index, input, label, pred_1, prob_1 ... pred_k, prob_k, error), by default
RUN/predictions.csv (an explicit --out that exists is refused without --force); a summary line
(images, images/s, accuracy and top-k accuracy where labels are known, which weights); with
--grid, one PNG of the images titled with the predicted label and probability (green/red when
the true label is known). Exit codes: 0 done, 1 runtime failure, 2 bad input (nothing written).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from toolkit.clihelp import epilog
from toolkit.errors import ConfigError
from toolkit.rundir import PREDICTIONS

PathLike = Union[str, Path]
WEIGHT_CHOICES = ("best", "last")
GRID_COLS = 8  # tiles per row of the --grid PNG
GRID_TILE_PX = (160, 180)  # (width, height) of one tile in pixels: the image and a two-line title above it
GRID_DPI = 100


# ------------------------------------------------------------------------------------------
# the run: weights, classes, preprocessing, model


def weights_file(run_dir: Path, choice: Optional[str]) -> Tuple[str, Path]:
    """-> ("best" | "last", the file). `choice` None: best where the run has it, else last."""
    from toolkit.rundir import MODEL, MODEL_BEST

    files = {"last": run_dir / MODEL, "best": run_dir / MODEL_BEST}
    if choice is None:
        choice = "best" if files["best"].is_file() else "last"
    if choice not in files:
        raise ConfigError(f"--weights: {choice!r}; choose one of: {', '.join(WEIGHT_CHOICES)}")
    path = files[choice]
    if not path.is_file():
        if choice == "best":
            raise ConfigError(f"--weights: best: {run_dir} has no {MODEL_BEST} (the run was trained before the "
                              f"best epoch's weights were kept, or did not finish); use --weights last")
        raise ConfigError(f"run {run_dir}: not a finished training run: no {MODEL} (train it to the end, or "
                          "continue it with train.resume=auto)")
    check_recorded_sha256(run_dir, path)
    return choice, path


def check_recorded_sha256(run_dir: Path, path: Path) -> None:
    """The weights file against the SHA-256 the run recorded in summary.json when it wrote it
    (runs trained before it was recorded are taken as they are)."""
    import json

    from toolkit.rundir import SUMMARY, sha256

    try:
        recorded = json.loads((run_dir / SUMMARY).read_text()).get("weights_sha256") or {}
    except (OSError, ValueError, AttributeError):
        recorded = {}
    want = recorded.get(path.name) if isinstance(recorded, dict) else None
    if want is not None and sha256(path) != want:
        raise ConfigError(f"--weights: {path} is not the file the run wrote (its SHA-256 differs from "
                          f"{run_dir / SUMMARY}'s weights_sha256): it was changed or replaced after training")


def class_names(run_dir: Path, num_classes: int) -> List[str]:
    """The run's class names, one per model output. Where the run recorded them: data.json's
    `class_names`, else summary.json's per-class accuracy (keyed by class name, in class order).
    A model with more outputs than the dataset had classes names the rest by their index."""
    import json

    from toolkit.rundir import DATA, SUMMARY

    names: Optional[List[str]] = None
    for file, key in ((DATA, "class_names"), (SUMMARY, "per_class_acc")):
        try:
            found = json.loads((run_dir / file).read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(found, (list, dict)) and found:
            names = [str(n) for n in found]
            break
    if names is None:
        raise ConfigError(f"run {run_dir}: no class names recorded (data.json class_names or summary.json "
                          "per_class_acc): not a finished training run")
    if len(names) > num_classes:
        raise ConfigError(f"run {run_dir}: {len(names)} class names recorded but the weights have {num_classes} "
                          "outputs: the weights do not belong to this run")
    return names + [str(i) for i in range(len(names), num_classes)]


class Preprocess:
    """What the run fed its model, for one image: a path, a PIL image or a (3, H, W) uint8 tensor
    -> (C, S, S) float32, normalised. `load(path)` stops before the normalisation ((3, S, S)
    uint8: what --grid draws). Attributes: image_size, channels, mean, std.

        x = preprocess("digit.png")          # (3, 32, 32) float32
        logits = model(x.unsqueeze(0))       # (1, num_classes)"""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float]):
        from toolkit.data.base import Normalize

        self.image_size, self.channels = int(image_size), len(mean)
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
        self.normalize = Normalize(self.mean, self.std)  # uint8 (B, C, H, W) -> float32, on the batch's device

    def load(self, image) -> "torch.Tensor":  # noqa: F821  (torch is imported lazily)
        from toolkit.data.images import load_resized, pil_tensor, resize_crop

        if isinstance(image, (str, Path)):
            return load_resized(str(image), self.image_size)  # (3, S, S) uint8, as image folders train
        if hasattr(image, "convert"):  # a PIL image
            return resize_crop(pil_tensor(image.convert("RGB")), self.image_size)
        if getattr(image, "dtype", None) is not None and str(image.dtype) == "torch.uint8" and image.ndim == 3:
            return resize_crop(image, self.image_size)
        raise TypeError(f"preprocess: expected a path, a PIL image or a (3, H, W) uint8 tensor, got {type(image)}")

    def __call__(self, image) -> "torch.Tensor":  # noqa: F821
        return self.normalize(self.load(image).unsqueeze(0))[0]  # (C, S, S) float32

    def as_dict(self) -> Dict[str, Any]:
        return {"image_size": self.image_size, "channels": self.channels, "mean": self.mean, "std": self.std}


@dataclass
class LoadedRun:
    """A finished run, ready to predict: the model in eval mode (CPU), its preprocessing, the
    class names, the run's config and which weights were loaded."""

    path: Path
    cfg: Any  # toolkit.config.Config
    model: Any  # torch.nn.Module
    preprocess: Preprocess
    classes: List[str]
    weights: str  # "best" | "last"
    weights_path: Path
    weights_chosen: bool  # True: --weights was given; False: chosen by the default rule


def open_run(run: PathLike, weights: Optional[str] = None) -> LoadedRun:
    """Check RUN and load what predicting needs, or one ConfigError line (nothing written).

    The model gets one blank image of the run's size before anything else happens, so a size it
    cannot take (a LeNet whose data.json says 64 px) is a line here, not a traceback later."""
    from toolkit.config import load_config
    from toolkit.features.extractor import load_run_weights, run_preprocess
    from toolkit.rundir import CONFIG

    run_dir = Path(run).absolute()
    if not (run_dir / CONFIG).is_file():
        raise ConfigError(f"run {run_dir}: not a training run (no {CONFIG})")
    cfg = load_config(str(run_dir / CONFIG))
    choice, path = weights_file(run_dir, weights)
    model = load_run_weights(cfg.model.name, path, key=f"run {run_dir}")
    recorded = run_preprocess(run_dir, key=f"run {run_dir}")
    pre = Preprocess(recorded["image_size"], recorded["mean"], recorded["std"])
    classes = class_names(run_dir, int(_probe(model, pre, run_dir).shape[1]))
    return LoadedRun(run_dir, cfg, model, pre, classes, choice, path, weights is not None)


def _probe(model, pre: Preprocess, run_dir: Path):
    """One forward pass of a blank (1, C, S, S) image -> its logits (1, num_classes)."""
    import torch

    try:
        with torch.inference_mode():
            return model(torch.zeros(1, pre.channels, pre.image_size, pre.image_size))
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"run {run_dir}: the model cannot take the {pre.image_size} px, {pre.channels}-channel "
                          f"images its data.json records ({msg})") from None


def load_run(run: PathLike, weights: Optional[str] = None):
    """-> (model, preprocess, classes): the run's network with its weights, in eval mode on the
    CPU; the function that turns an image (path, PIL image or uint8 tensor) into the model's
    input; the class names, in output order. `weights`: "best", "last" or None (best where the
    run has it, else last)."""
    r = open_run(run, weights)
    return r.model, r.preprocess, r.classes


# ------------------------------------------------------------------------------------------
# inputs: image files and folders, or a split of the run's dataset


class ImageFiles:
    """Image files in the extraction collection's item format: `(x | None, label, index,
    reason | None)`, x (3, S, S) uint8 from the training pipeline of image folders. A file that
    does not decode comes back with x None and the reason, rather than stopping the run."""

    def __init__(self, paths: List[str], labels: List[int], pre: Preprocess, class_names: List[str]):
        import torch

        from toolkit.data.images import load_codecs

        self.paths, self.pre, self.class_names = paths, pre, class_names
        self.labels = torch.as_tensor(labels, dtype=torch.int64)  # (N,), -1: unknown
        self.normalize = pre.normalize
        load_codecs()  # before DataLoader workers fork: each would import torchvision again

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, i: int) -> str:
        return self.paths[i]

    def __getitem__(self, i: int):
        import warnings

        from PIL import Image, UnidentifiedImageError

        path = self.paths[i]
        try:
            if os.path.getsize(path) == 0:
                return None, self.labels[i], i, "empty file"
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                x = self.pre.load(path)  # (3, S, S) uint8
        except UnidentifiedImageError:
            return None, self.labels[i], i, "not an image Pillow can read"
        except Exception as e:  # truncated, corrupt, bomb, unreadable: listed, not raised
            msg = str(e).splitlines()[0] if str(e) else ""
            return None, self.labels[i], i, f"{type(e).__name__}: {msg}" if msg else type(e).__name__
        return x, self.labels[i], i, None


def find_images(inputs: Sequence[PathLike], classes: List[str]) -> Tuple[List[str], List[int], List[str]]:
    """INPUT... -> paths, labels (-1: unknown), notes. Files are taken as given; folders are
    searched recursively (toolkit.data.collection.scan_collection: sorted, hidden entries
    skipped, image extensions only). A folder whose class folders all are class names of the run
    labels its images; one whose top-level folders are not, gets a note and no labels."""
    from toolkit.data.collection import scan_collection
    from toolkit.data.images import EXTENSIONS

    index = {c: i for i, c in enumerate(classes)}
    paths: List[str] = []
    labels: List[int] = []
    notes: List[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found, folder_labels, folder_classes = scan_collection(p)
            if not found:
                raise ConfigError(f"INPUT: no images under {p} (extensions: {' '.join(EXTENSIONS)})")
            unknown = [c for c in folder_classes if c not in index]
            if unknown:
                notes.append(f"{p}: folder(s) {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''} are not "
                             "class names of the run: its images have no true labels")
                folder_labels = [-1] * len(found)
            else:
                folder_labels = [index[folder_classes[y]] if y >= 0 else -1 for y in folder_labels]
            paths += found
            labels += folder_labels
        elif p.is_file():
            paths.append(str(p))
            labels.append(-1)
        else:
            raise ConfigError(f"INPUT: no such file or folder: {p}")
    return paths, labels, notes


def split_source(cfg, split: str, classes: List[str], pre: Preprocess):
    """The run's split rebuilt from its config (dataset, root, split_seed, limit, image size), in
    the collection's item format, normalised as the engine normalises it (the dataset's own
    formula: digits' float items as stored, uint8 sets by their Normalize)."""
    from toolkit.data import DATASETS
    from toolkit.data.collection import SplitAsCollection

    if split not in ("train", "val", "test"):
        raise ConfigError(f"--split: {split!r}; choose one of: train, val, test")
    d = cfg.data
    splits = DATASETS.build(d.name, root=d.root, split_seed=d.split_seed, limit=d.limit, download=False,
                            image_size=d.image_size, train_splits=list(d.train_splits))
    if list(splits.class_names) != classes[:len(splits.class_names)]:
        raise ConfigError(f"--split: {d.name} now has other classes than the run was trained on")
    same = (splits.meta.get("image_size") == pre.image_size
            and all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(splits.meta.get("mean", []), pre.mean))
            and all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(splits.meta.get("std", []), pre.std)))
    if not same:
        raise ConfigError(f"--split: {d.name} now gives other images (size or statistics) than the run's data.json "
                          "records; the data changed since training")
    preprocess = {"kind": "dataset", "dataset": d.name, "split": split, **pre.as_dict()}
    return SplitAsCollection(getattr(splits, split), d.name, split, splits.class_names, preprocess)


def display_image(source, i: int, pre: Preprocess):
    """Input i as (3, S, S) uint8 for the grid, or None where it does not decode."""
    import torch

    x = source[i][0]
    if x is None or x.dtype == torch.uint8:
        return x
    mean = torch.as_tensor(pre.mean).view(-1, 1, 1)
    std = torch.as_tensor(pre.std).view(-1, 1, 1)
    return ((x.float() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)  # undo the normalisation


# ------------------------------------------------------------------------------------------
# the loop


def batches_for(n: int, batch_size: int, rank: int, world: int) -> List[List[int]]:
    """Batch j of the inputs [j*B, (j+1)*B) goes to rank j % world: the same images in each
    batch whatever the world size (so the logits do not depend on it), every input once."""
    return [list(range(s, min(s + batch_size, n))) for j, s in enumerate(range(0, n, batch_size))
            if j % world == rank]


def autocast_for(device, precision: str):
    """The autocast context for `precision` on `device` (what Accelerate's autocast enters)."""
    import torch

    if precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def predict_batches(model, loader, device, normalize, topk: int, precision: str = "no",
                    channels_last: bool = False, tta: str = "none") -> Dict[str, Any]:
    """Run the model over the loader's (x, labels, indices, bad) batches -> {"index": [i],
    "top": [[class]] (k per row), "prob": [[p]], "bad": [(i, reason)], "images", "seconds"}.

    Logits as the engine's evaluation computes them (autocast at `precision`, channels_last,
    tta="flip": the mean of the image's and its mirror's logits), then float32 softmax. Classes
    are ranked by a stable sort of the logits, so the first is the arg-max the engine's accuracy
    counts (the first among equal maxima)."""
    import torch

    out: Dict[str, Any] = {"index": [], "top": [], "prob": [], "bad": [], "images": 0}
    t0 = time.perf_counter()
    with torch.inference_mode():
        for x, _y, idx, bad in loader:
            out["bad"] += bad
            if x is None:
                continue
            x = normalize(x.to(device, non_blocking=True))  # uint8 -> float32 where the batch lands
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast_for(device, precision):
                mirrored = model(x.flip(3)) if tta == "flip" else None
                logits = model(x)  # (B, C)
            logits = logits.float() if mirrored is None else (logits.float() + mirrored.float()) / 2
            order = torch.sort(logits, dim=1, descending=True, stable=True).indices[:, :topk]  # (B, k)
            prob = logits.softmax(dim=1).gather(1, order)  # (B, k)
            out["index"] += idx.tolist()
            out["top"] += order.cpu().tolist()
            out["prob"] += prob.cpu().tolist()
            out["images"] += len(idx)
    out["seconds"] = time.perf_counter() - t0
    return out


def make_loader(source, batches: List[List[int]], num_workers: int):
    import torch
    from torch.utils.data import DataLoader

    from toolkit.data.collection import collate_items

    return DataLoader(source, batch_sampler=batches, collate_fn=collate_items, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available())


def to_rows(parts: List[Dict[str, Any]], source, classes: List[str]) -> List[Dict[str, Any]]:
    """Every rank's results -> one row per input, in input order:
    {"index", "input", "label" (true class or None), "pred", "prob", "topk": [(class, p)], "error"}."""
    got: Dict[int, Tuple[List[int], List[float]]] = {}
    bad: Dict[int, str] = {}
    for part in parts:
        got.update({i: (t, p) for i, t, p in zip(part["index"], part["top"], part["prob"])})
        bad.update(dict(part["bad"]))
    rows = []
    for i in range(len(source)):
        y = int(source.labels[i])
        top, prob = got.get(i, ([], []))
        topk = [(classes[c], float(p)) for c, p in zip(top, prob)]
        rows.append({"index": i, "input": source.path(i), "label": classes[y] if y >= 0 else None,
                     "pred": topk[0][0] if topk else None, "prob": topk[0][1] if topk else None,
                     "topk": topk, "error": bad.get(i) if not topk else None})
    return rows


def accuracy(rows: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """Top-1 and top-k accuracy over the labelled rows that were predicted, None without any.
    float32 divisions of the counts, as toolkit.metrics (the run's summary.json) computes them."""
    import torch

    done = [r for r in rows if r["label"] is not None and r["topk"]]
    if not done:
        return None
    n = torch.tensor(len(done))
    top1 = torch.tensor(sum(r["pred"] == r["label"] for r in done))
    topk = torch.tensor(sum(any(c == r["label"] for c, _ in r["topk"]) for r in done))
    return {"labelled": len(done), "acc": (top1.float() / n.float()).item(),
            "topk_acc": (topk.float() / n.float()).item(), "k": len(done[0]["topk"])}


# ------------------------------------------------------------------------------------------
# outputs


def csv_text(rows: List[Dict[str, Any]], topk: int) -> str:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["index", "input", "label", *[f"{k}_{j}" for j in range(1, topk + 1) for k in ("pred", "prob")],
                "error"])
    for r in rows:
        cells = [c for name, p in r["topk"] for c in (name, f"{p:.6f}")]
        cells += [""] * (2 * topk - len(cells))
        w.writerow([r["index"], r["input"], r["label"] or "", *cells, r["error"] or ""])
    return buf.getvalue()


def grid_layout(n: int) -> Tuple[int, int, int, int]:
    """-> (rows, cols, width px, height px) of the --grid PNG for n tiles."""
    cols = max(1, min(n, GRID_COLS))
    rows = max(1, math.ceil(n / cols))
    return rows, cols, cols * GRID_TILE_PX[0], rows * GRID_TILE_PX[1]


def write_grid(path: Path, rows: List[Dict[str, Any]], images: List[Any]) -> None:
    """The --grid PNG (grid_figure), written atomically."""
    from toolkit.rundir import write_atomic

    fig = grid_figure(rows, images)  # (selects matplotlib's Agg backend before pyplot is imported here)
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=GRID_DPI))
    plt.close(fig)


def grid_figure(rows: List[Dict[str, Any]], images: List[Any]):
    """One tile per row: the image the model saw, titled with the predicted class and its
    probability; green when it is the true class, red when not, black when no label is known.
    Also what a run's TensorBoard shows as test/predictions (toolkit.tracking.prediction_grid)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows, n_cols, width, height = grid_layout(len(rows))
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(width / GRID_DPI, height / GRID_DPI), dpi=GRID_DPI,
                             squeeze=False)
    # Fixed margins (no tight_layout): the PNG's size is exactly grid_layout's.
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.33 / n_rows, wspace=0.08, hspace=0.45)
    for ax in axes.flat:
        ax.axis("off")
    for ax, row, x in zip(axes.flat, rows, images):
        if x is None:
            ax.text(0.5, 0.5, "unreadable", ha="center", va="center", fontsize=8, color="tab:red")
            ax.set_title("bad image", fontsize=8, color="tab:red")
            continue
        ax.imshow(x.permute(1, 2, 0).numpy(), interpolation="nearest")
        title = f"{row['pred']} {row['prob']:.0%}"
        colour = "black"
        if row["label"] is not None:
            right = row["pred"] == row["label"]
            colour = "tab:green" if right else "tab:red"
            title += "" if right else f"\ntrue {row['label']}"
        ax.set_title(title, fontsize=8, color=colour)
    return fig


def check_output(path: Optional[Path], default: Optional[Path], force: bool, flag: str) -> Optional[Path]:
    """The file to write for `flag`: the user's path, refused where a file is there already
    (unless --force), or the default, which is ours to replace."""
    if path is None:
        return default
    path = path.absolute()
    if path.is_dir():
        raise ConfigError(f"{flag}: {path} is a folder; name a file")
    if path.exists() and not force and path != default:
        raise ConfigError(f"{flag}: {path} exists; pass --force to overwrite it")
    return path


# ------------------------------------------------------------------------------------------
# one job: the API and the CLI both run it


@dataclass
class Job:
    """What to predict and how; the CLI's flags and the API's keywords."""

    inputs: Sequence[PathLike] = ()
    split: Optional[str] = None
    topk: int = 5
    batch_size: Optional[int] = None  # None: the run's data.eval_batch_size
    precision: Optional[str] = None  # None: the run's train.precision
    num_workers: Optional[int] = None  # None: some for image files, none for an in-memory split


def check_job(job: Job, num_classes: int) -> None:
    if not job.inputs and job.split is None:
        raise ConfigError("INPUT: nothing to predict; give image files or folders, or --split train|val|test")
    if job.inputs and job.split is not None:
        raise ConfigError("INPUT: give image files and folders, or --split, not both")
    if job.topk < 1 or job.topk > num_classes:
        raise ConfigError(f"--topk: {job.topk}, but the run has {num_classes} classes; choose 1..{num_classes}")
    if job.batch_size is not None and job.batch_size < 1:
        raise ConfigError(f"--batch-size: {job.batch_size}; must be >= 1")
    if job.precision not in (None, "no", "bf16", "fp16"):
        raise ConfigError(f"--precision: {job.precision!r}; choose one of: no, bf16, fp16")
    if job.num_workers is not None and job.num_workers < 0:
        raise ConfigError(f"--num-workers: {job.num_workers}; must be >= 0")


def build_source(run: LoadedRun, job: Job) -> Tuple[Any, List[str]]:
    """-> (the collection to predict, notes for the console)."""
    if job.split is not None:
        return split_source(run.cfg, job.split, run.classes, run.preprocess), []
    if run.preprocess.channels != 3:
        raise ConfigError(f"run {run.path}: trained on {run.preprocess.channels}-channel images; image files are "
                          "read as 3-channel RGB")
    paths, labels, notes = find_images(job.inputs, run.classes)
    if not paths:
        raise ConfigError("INPUT: no images given")
    return ImageFiles(paths, labels, run.preprocess, run.classes), notes


def run_precision(run: LoadedRun, asked: Optional[str], has_cuda: bool) -> Tuple[str, Optional[str]]:
    """-> (precision, a note or None): the run's own unless asked; fp16 needs CUDA."""
    precision = asked or runs_own_precision(run)
    if precision == "fp16" and not has_cuda:
        if asked:
            raise ConfigError("--precision: fp16 needs a CUDA GPU; use bf16 on CPU")
        return "no", "the run used fp16, which needs a CUDA GPU: predicting in float32"
    return precision, None


def runs_own_precision(run: LoadedRun) -> str:
    """The precision the run evaluated with: its config's, or for `auto` the value it resolved to
    (summary.json's `precision`), so that predict's logits are the engine's. A run without a
    summary (stopped before its test) resolves `auto` for this device (toolkit/fast.py)."""
    import json

    from toolkit.fast import resolve_precision
    from toolkit.rundir import SUMMARY

    asked = str(run.cfg.train.precision)
    if asked != "auto":
        return asked
    try:
        ran = json.loads((run.path / SUMMARY).read_text()).get("precision")
    except (OSError, ValueError, AttributeError):
        ran = None
    return ran if ran in ("no", "bf16", "fp16") else resolve_precision(asked).value


def run_channels_last(run: LoadedRun) -> bool:
    """The run's train.channels_last, `auto` resolved for this device and model: a memory format
    is a speed choice of the device at hand (on a CPU, off), not a part of what the run learnt."""
    from toolkit.fast import resolve_channels_last

    return bool(resolve_channels_last(run.cfg.train.channels_last, run.model).value)


def workers_for(job: Job, source, world: int) -> int:
    """Image files decode in DataLoader workers (a few per process); an in-memory split needs none."""
    if job.num_workers is not None:
        return job.num_workers
    if not isinstance(source, ImageFiles):
        return 0
    return max(0, min(4, (os.cpu_count() or 1) // world - 1))


def predict(run: PathLike, inputs: Sequence[PathLike] = (), *, split: Optional[str] = None, topk: int = 5,
            weights: Optional[str] = None, batch_size: Optional[int] = None, precision: Optional[str] = None,
            num_workers: int = 0) -> List[Dict[str, Any]]:
    """Predict in this process (the Python API) -> one dict per input, in input order:
    {"index", "input", "label" (true class or None), "pred", "prob", "topk": [(class, p), ...],
    "error" (why the image did not decode, else None)}. On a CUDA GPU where there is one."""
    import torch

    loaded = open_run(run, weights)
    job = Job(list(inputs), split, topk, batch_size, precision, num_workers)
    check_job(job, len(loaded.classes))
    source, _notes = build_source(loaded, job)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prec, _note = run_precision(loaded, precision, device.type == "cuda")
    part = _run_part(loaded, source, job, device, prec, rank=0, world=1, num_workers=num_workers)
    return to_rows([part], source, loaded.classes)


def _run_part(loaded: LoadedRun, source, job: Job, device, precision: str, rank: int, world: int,
              num_workers: int) -> Dict[str, Any]:
    """This rank's share of the inputs through the model."""
    import torch

    t = loaded.cfg.train
    channels_last = run_channels_last(loaded)
    model = loaded.model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    batch = job.batch_size or loaded.cfg.data.eval_batch_size
    loader = make_loader(source, batches_for(len(source), batch, rank, world), num_workers)
    return predict_batches(model, loader, device, source.normalize, job.topk, precision, channels_last, str(t.tta))


# ------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="toolkit.predict", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=epilog(examples="\n".join(__doc__.split("\n")[2:6])))
    p.add_argument("run", type=Path, help="a finished training run's directory")
    p.add_argument("inputs", nargs="*", type=Path, help="image files and folders (searched recursively)")
    p.add_argument("--split", choices=["train", "val", "test"], help="predict a split of the run's own dataset")
    p.add_argument("--topk", type=int, default=5, help="classes per image in the CSV (default 5)")
    p.add_argument("--weights", choices=WEIGHT_CHOICES,
                   help="best (model_best.safetensors) or last (model.safetensors); default: best where it exists")
    p.add_argument("--out", type=Path, help="the CSV (default RUN/predictions.csv)")
    p.add_argument("--grid", type=Path, help="also write a PNG of the images titled with their predictions")
    p.add_argument("--grid-max", type=int, default=64, help="images on the grid: the first N inputs (default 64)")
    p.add_argument("--batch-size", type=int, help="images per forward pass (default: the run's data.eval_batch_size)")
    p.add_argument("--precision", choices=["no", "bf16", "fp16"], help="autocast (default: the run's)")
    p.add_argument("--num-workers", type=int, help="DataLoader workers per process for image files")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out or --grid file")
    return p.parse_args(argv)


def cli(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    """Every check first (on every rank: they read the same files), then the work; rank 0
    writes and returns the summary, the other ranks None."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    from toolkit.rundir import write_atomic_text

    loaded = open_run(args.run, args.weights)
    job = Job(args.inputs, args.split, args.topk, args.batch_size, args.precision, args.num_workers)
    check_job(job, len(loaded.classes))
    if args.grid_max < 1:
        raise ConfigError(f"--grid-max: {args.grid_max}; must be >= 1")
    out = check_output(args.out, loaded.path / PREDICTIONS, args.force, "--out")
    grid = check_output(args.grid, None, args.force, "--grid")
    source, notes = build_source(loaded, job)

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    rank, world = accelerator.process_index, accelerator.num_processes
    precision, note = run_precision(loaded, args.precision, torch.cuda.is_available())
    main = accelerator.is_main_process
    if main:
        for line in notes + ([note] if note else []):
            print(f"predict: note: {line}", flush=True)
    part = _run_part(loaded, source, job, accelerator.device, precision, rank, world,
                     workers_for(job, source, world))
    parts = gather_object([part]) if world > 1 else [part]
    summary = None
    if main:
        rows = to_rows(parts, source, loaded.classes)
        write_atomic_text(out, csv_text(rows, job.topk))
        if grid is not None:
            shown = rows[:args.grid_max]
            write_grid(grid, shown, [display_image(source, r["index"], loaded.preprocess) for r in shown])
        seconds = max(p["seconds"] for p in parts)
        images = sum(p["images"] for p in parts)
        summary = {"images": len(rows), "predicted": images, "bad": [(r["input"], r["error"]) for r in rows
                                                                      if r["error"]],
                   "seconds": seconds, "images_per_s": images / seconds if seconds > 0 else 0.0,
                   "accuracy": accuracy(rows), "weights": loaded.weights, "weights_path": str(loaded.weights_path),
                   "weights_chosen": loaded.weights_chosen, "world_size": world, "out": str(out),
                   "grid": str(grid) if grid else None, "precision": precision}
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def summary_lines(s: Dict[str, Any]) -> List[str]:
    """The console's report of a finished prediction."""
    lines = [f"predict: bad image {p} ({why})" for p, why in s["bad"][:5]]
    if len(s["bad"]) > 5:
        lines.append(f"predict: ... and {len(s['bad']) - 5} more bad image(s), all in the CSV's error column")
    why = "" if s["weights_chosen"] else (
        " (default: the run kept model_best.safetensors)" if s["weights"] == "best" else
        " (default: the run has no model_best.safetensors)")
    line = (f"predict: {s['images']} image(s), {len(s['bad'])} bad, {s['images_per_s']:,.0f} images/s on "
            f"{s['world_size']} process(es), weights {s['weights']}{why}")
    a = s["accuracy"]
    if a is not None:
        line += f"; accuracy {a['acc']:.2%}, top-{a['k']} {a['topk_acc']:.2%} on {a['labelled']} labelled"
    lines += [line, f"wrote {s['out']}"] + ([f"wrote {s['grid']}"] if s["grid"] else [])
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    from toolkit.errors import run_cli

    code, summary = run_cli(lambda: cli(args))
    if code:
        return code
    if summary is not None:
        print("\n".join(summary_lines(summary)), flush=True)
    return 0


class _CallableModule(types.ModuleType):
    """`from toolkit import predict` must give a function, but importing this module (the CLI,
    `import toolkit.predict`) makes Python bind the package's attribute `predict` to the module,
    replacing the function toolkit/__init__.py defines. A module that calls `predict` when called
    keeps `predict(RUN, paths)` working whichever was imported first."""

    def __call__(self, *args, **kwargs):
        return predict(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    from toolkit.errors import leave  # sys.exit, minus the teardown of every module

    leave(main())
