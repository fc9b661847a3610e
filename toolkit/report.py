"""Plots and an HTML page from one run directory, or a comparison of several runs.

    python -m toolkit.report RUN                      # RUN/curves.png, confusion_*.png, embedding_pca.png, report.html
    python -m toolkit.report RUN --tsne --classes 0,1,2,3,4
    python -m toolkit.report RUN_A RUN_B ... --out DIR   # DIR/compare.png, compare.csv, compare.md, report.html
    python -m toolkit.report SWEEP_DIR                # every run below it, compared
    python -m toolkit.report RUN/features --tsne      # PCA / t-SNE of extracted features, by class
    toolkit-report RUN                                # the console command, from any directory

Reads only the run-directory contract (summary.json, metrics.jsonl, config.yaml,
confusion_*.csv, embeddings.safetensors), so it works on runs from any machine, finished or
not. A file it cannot read (a corrupt summary.json, confusion_*.csv, embeddings) is skipped with
one `warning:` line naming it, and everything else is still drawn. Every image is written to a
temporary name and renamed, so a crash never leaves half a PNG. `fit` calls `run_report` at the
end of every run (log.plots).

Curves are drawn against epochs, also the per-step training loss (fractional epochs: the
epoch a row was logged in plus the share of that epoch's updates done), so runs with different
batch sizes line up. Accuracies are shown in %, as the console prints them.
"""

from __future__ import annotations

import argparse
import csv
import html
import io
import inspect
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter  # noqa: E402

from toolkit.clihelp import epilog  # noqa: E402
from toolkit.errors import ConfigError, ToolkitError  # noqa: E402
from toolkit.rundir import METRICS, REPORT, RunDir, write_atomic_bytes, write_atomic_text  # noqa: E402

MAX_LEGEND_CLASSES = 10  # embedding plots colour at most this many classes unless told which
MAX_LR_MARKS = 6  # curves.png marks each lr change up to this many (step schedules; a cosine changes every epoch)
LR_MARK = "lr-change"  # the gid of those lines and their labels


def warn(msg: str) -> None:
    """One line on stderr for what the report skipped; it goes on with the rest."""
    print(f"warning: report: {msg}", file=sys.stderr, flush=True)


def _why(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


@dataclass
class Run:
    path: Path
    name: str
    summary: Dict[str, Any] = field(default_factory=dict)
    config: Dict[str, Any] = field(default_factory=dict)
    config_text: str = ""  # config.yaml as written, for report.html
    epochs: List[Dict[str, Any]] = field(default_factory=list)  # kind == "epoch" rows
    steps: List[Dict[str, Any]] = field(default_factory=list)  # kind == "train" rows


def load_run(path: Path) -> Run:
    """The run's files; a corrupt summary.json or config.yaml is skipped with a warning."""
    path = Path(path)
    files = RunDir(path)
    metrics = files.metrics
    if not metrics.is_file():
        raise ConfigError(f"report: {path} is not a run directory (no {METRICS})")
    run = Run(path=path, name=path.name)
    try:
        lines = metrics.read_text(errors="replace").splitlines()
    except OSError as e:
        raise ConfigError(f"report: cannot read {metrics}: {e.strerror}") from None
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:  # a line torn by a crash
            continue
        if not isinstance(row, dict) or not isinstance(row.get("step"), (int, float)):
            continue
        if row.get("kind") == "epoch" and isinstance(row.get("epoch"), (int, float)):
            run.epochs.append(row)
        elif row.get("kind") == "train" and isinstance(row.get("loss"), (int, float)):
            run.steps.append(row)
    if files.summary.is_file():
        try:
            summary = json.loads(files.summary.read_text())
            if not isinstance(summary, dict):
                raise ValueError("not a JSON object")
            run.summary = summary
        except (OSError, ValueError) as e:
            warn(f"skipped {files.summary}: {_why(e)}")
    if files.config.is_file():
        try:
            run.config_text = files.config.read_text()
            config = yaml.safe_load(run.config_text) or {}
            if not isinstance(config, dict):
                raise ValueError("not a YAML mapping")
            run.config = config
            name = (config.get("run") or {}).get("name") if isinstance(config.get("run"), dict) else None
            run.name = str(name) if name else run.name
        except (OSError, ValueError, yaml.YAMLError) as e:
            run.config_text = ""
            warn(f"skipped {files.config}: {_why(e)}")
    return run


def _save(fig, out: Path) -> Path:
    """PNG to a temporary name, then renamed into place."""
    buf = io.BytesIO()
    # tight_layout, not savefig(bbox_inches="tight"): the latter draws every figure twice, and
    # drawing is most of the ~1 s the plots add to the end of each run.
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return write_atomic_bytes(out, buf.getvalue())


def _stage_bounds(run: Run) -> List[float]:
    """Epoch numbers after which a new stage begins (for vertical lines)."""
    out = []
    for prev, row in zip(run.epochs, run.epochs[1:]):
        if row.get("stage") != prev.get("stage"):
            out.append(prev["epoch"] + 0.5)
    return out


def lr_changes(run: Run) -> List[Tuple[float, float]]:
    """(epoch, new lr) for every epoch boundary where the logged lr changes.

    An epoch row's `lr` is the rate its epoch trained with, and row `epoch` e (counted from 1)
    covers epochs e-1..e on the x axis; so a rate first seen in row e began at x = e-1: a drop
    at milestone 5 is marked at 5."""
    out = []
    for prev, row in zip(run.epochs, run.epochs[1:]):
        a, b = prev.get("lr"), row.get("lr")
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not math.isclose(a, b, rel_tol=1e-6):
            out.append((float(prev["epoch"]), float(b)))
    return out


def step_epochs(run: Run) -> Optional[List[float]]:
    """Each train row's place in (fractional) epochs: the epoch it was logged in (`epoch`,
    counted from 0) plus the share of that epoch's updates done by its `step`. An epoch's
    updates are read from the epoch rows (the step each epoch ended at), so stages with other
    batch sizes and gradient accumulation are placed right. The last, unfinished epoch is taken
    as long as the one before it. None when the rows carry no `epoch` (older runs)."""
    if not run.steps or not all(isinstance(r.get("epoch"), (int, float)) for r in run.steps):
        return None
    ends = {0: 0}  # epoch k (from 0) starts at ends[k] updates
    for r in run.epochs:
        ends[int(r["epoch"])] = r["step"]
    lengths = {k: ends[k + 1] - ends[k] for k in ends if k + 1 in ends and ends[k + 1] > ends[k]}
    xs = []
    for r in run.steps:
        k = int(r["epoch"])
        length = lengths.get(k) or lengths.get(max((j for j in lengths if j < k), default=-1))
        if not length:  # no finished epoch to measure: the updates logged so far
            length = max(s["step"] for s in run.steps if int(s["epoch"]) == k) - ends.get(k, 0) or 1
        start = ends[k] if k in ends else ends[k + 1] - length if k + 1 in ends else k * length
        xs.append(k + min(max((r["step"] - start) / length, 0.0), 1.0))
    return xs


def _mark_lr_changes(ax, run: Run, label: bool) -> None:
    changes = lr_changes(run)
    if len(changes) > MAX_LR_MARKS:
        return
    for x, lr in changes:
        ax.axvline(x, color="tab:red", ls="--", lw=0.9, gid=LR_MARK)
        if label:
            ax.text(x, 0.98, f" lr {lr:.3g}", transform=ax.get_xaxis_transform(), rotation=90, va="top",
                    ha="right", fontsize=7, color="tab:red", gid=LR_MARK)


def curves_figure(run: Run):
    """E2's figure: loss and accuracy per epoch, train / val (/ test when logged per epoch);
    dashed red lines where the learning rate changed (E1), labelled with the new rate."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ep = [r["epoch"] for r in run.epochs]
    for split, style in (("train", "-o"), ("val", "-s"), ("test", "-^")):
        pts = [(r["epoch"], r[f"{split}_loss"], r.get(f"{split}_acc")) for r in run.epochs
               if isinstance(r.get(f"{split}_loss"), (int, float))]
        if pts:
            ax_loss.plot([p[0] for p in pts], [p[1] for p in pts], style, ms=3, label=split)
        acc = [(p[0], p[2]) for p in pts if isinstance(p[2], (int, float))]
        if acc:
            ax_acc.plot([p[0] for p in acc], [100 * p[1] for p in acc], style, ms=3, label=split)
    test_acc = run.summary.get("test_acc")
    if isinstance(test_acc, (int, float)) and not any("test_acc" in r for r in run.epochs):
        ax_acc.plot([ep[-1] if ep else 0], [100 * test_acc], "k*", ms=10, label=f"test (final) {100 * test_acc:.1f}%")
    for ax, label in ((ax_loss, "loss"), (ax_acc, "accuracy (%)")):
        for x in _stage_bounds(run):
            ax.axvline(x, color="grey", ls="--", lw=0.8)
        _mark_lr_changes(ax, run, label=True)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle(run.name)
    return fig


def plot_curves(run: Run, out: Path) -> Path:
    return _save(curves_figure(run), out)


def read_confusion(path: Path):
    """confusion_<split>.csv -> (class names, rows of counts). ValueError, saying what is wrong,
    when the file is not a square matrix of counts under a header of class names."""
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    if not rows:
        raise ValueError("empty")
    names = rows[0][1:]
    if not names or len(rows) - 1 != len(names):
        raise ValueError(f"expected a header and one row per class, got {len(names)} class name(s) "
                         f"and {len(rows) - 1} row(s)")
    counts = []
    for i, r in enumerate(rows[1:], start=2):
        if len(r) != len(names) + 1:
            raise ValueError(f"line {i}: expected {len(names) + 1} cells, got {len(r)}")
        try:
            counts.append([int(v) for v in r[1:]])
        except ValueError:
            raise ValueError(f"line {i}: not integer counts") from None
        if any(c < 0 for c in counts[-1]):
            raise ValueError(f"line {i}: negative counts")
    return names, counts


def plot_confusion(path: Path, out: Path, title: str) -> Path:
    """Row-normalised colours (recall per true class), counts written in each cell when small."""
    import numpy as np

    names, counts = read_confusion(path)
    m = np.array(counts, dtype=float)
    norm = m / np.maximum(m.sum(1, keepdims=True), 1)
    n = len(names)
    size = max(4.0, min(0.32 * n + 2, 16.0))
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    ticks = range(n)
    ax.set_xticks(ticks, names if n <= 40 else [""] * n, rotation=90, fontsize=7)
    ax.set_yticks(ticks, names if n <= 40 else [""] * n, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    acc = np.trace(m) / max(m.sum(), 1)
    ax.set_title(f"{title}: {100 * acc:.1f}% of {int(m.sum())}")
    return _save(fig, out)


def plot_embeddings(path, out: Path, method: str, classes: Optional[Sequence[int]] = None,
                    names: Optional[Sequence[str]] = None, seed: int = 0, title: str = "penultimate features") -> Path:
    """PCA or t-SNE of features, one panel per split: `path` is a run's embeddings.safetensors,
    or a dict {"<split>/features": (N, D), "<split>/labels": (N,)} of numpy arrays."""
    import numpy as np
    from safetensors.numpy import load_file

    data = path if isinstance(path, dict) else load_file(str(path))
    splits = sorted({k.split("/")[0] for k in data}, key=lambda s: ("train", "val", "test").index(s)
                    if s in ("train", "val", "test") else 9)
    fig, axes = plt.subplots(1, len(splits), figsize=(5.5 * len(splits), 5), squeeze=False)
    for ax, split in zip(axes[0], splits):
        feats, labels = data[f"{split}/features"], data[f"{split}/labels"]
        chosen = list(classes) if classes else sorted(set(labels.tolist()))[:MAX_LEGEND_CLASSES]
        keep = np.isin(labels, chosen)
        f, y = feats[keep].astype(np.float64), labels[keep]
        if len(f) < 3:
            ax.set_title(f"{split}: too few samples of classes {chosen}")
            continue
        if method == "pca":
            xy = pca_2d(f)
        else:
            from sklearn.manifold import TSNE

            xy = TSNE(n_components=2, init="pca", random_state=seed,
                      perplexity=float(min(30, len(f) - 1))).fit_transform(f)
        for c in chosen:
            sel = y == c
            label = names[c] if names is not None and c < len(names) else str(c)
            ax.scatter(xy[sel, 0], xy[sel, 1], s=8, alpha=0.7, label=label)
        ax.set_title(f"{split} ({len(f)} images)")
        ax.legend(markerscale=2, fontsize=7)
    fig.suptitle(f"{method.upper()} of {title}")
    return _save(fig, out)


def pca_2d(f):
    """(N, D) float64 -> (N, 2): the projections on the two leading principal axes (SVD of the
    centred features). Each axis's sign is fixed (its largest loading positive), so reruns plot
    alike. NumPy, not scikit-learn: its import would add ~1.2 s to the end of every run."""
    import numpy as np

    centred = f - f.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    axes = vt[:2]  # (2, D)
    signs = np.sign(axes[np.arange(len(axes)), np.abs(axes).argmax(axis=1)])
    return centred @ (axes * signs[:, None]).T  # (N, 2)


def _is_acc(key: str) -> bool:
    """Columns holding a fraction of images (accuracy, top-5): shown in %, as the console does."""
    return key.endswith(("_acc", "_top5")) or key in ("acc", "top5")


def _fmt(v: Any, key: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and _is_acc(key):
        return f"{100 * v:.2f}%"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _config_html(configs: Sequence[Tuple[str, str]]) -> str:
    """Each run's config.yaml, collapsed."""
    return "".join(f"<details><summary>{html.escape(title)}</summary><pre>{html.escape(text)}</pre></details>"
                   for title, text in configs if text)


def _html(title: str, table: List[Dict[str, Any]], images: List[Path], root: Path,
          configs: Sequence[Tuple[str, str]] = ()) -> str:
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in (table[0] if table else {}))
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v, k))}</td>" for k, v in row.items()) + "</tr>"
                   for row in table)
    imgs = "".join(f'<p><img src="{html.escape(str(p.relative_to(root)))}" style="max-width:100%"></p>'
                   for p in images)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 8px;border-bottom:1px solid #ddd}"
            "pre{background:#f6f6f6;padding:0.5em}"
            f"</style></head><body><h1>{html.escape(title)}</h1><table><tr>{head}</tr>{body}</table>"
            f"{imgs}{_config_html(configs)}</body></html>\n")


def _try_plot(what: Path, draw) -> Optional[Path]:
    """One plot from one file; a file it cannot read or draw costs a warning line, not the report."""
    try:
        return draw()
    except Exception as e:  # noqa: BLE001 (a corrupt file in a run directory: skip it, draw the rest)
        plt.close("all")
        warn(f"skipped {what}: {_why(e)}")
        return None


def run_report(run_dir: Path, out: Optional[Path] = None, tsne: bool = False,
               classes: Optional[Sequence[int]] = None) -> List[Path]:
    """Every plot one run's files allow, and report.html. Returns the images written; a file
    that cannot be read is skipped with one warning line."""
    run = load_run(run_dir)
    out = Path(out or run_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = [plot_curves(run, out / "curves.png")]
    names, files = None, RunDir(run.path)
    for split in ("train", "test"):
        csv_path = files.confusion(split)
        if csv_path.is_file():
            png = _try_plot(csv_path, lambda: plot_confusion(csv_path, out / f"confusion_{split}.png",
                                                              f"{split} confusion"))
            if png is not None:
                images.append(png)
                names = read_confusion(csv_path)[0]
    emb = files.embeddings
    if emb.is_file():
        run_cfg = run.config.get("run") if isinstance(run.config.get("run"), dict) else {}
        seed = int(run_cfg.get("seed") or 0)
        for method in ("pca", "tsne") if tsne else ("pca",):
            png = _try_plot(emb, lambda: plot_embeddings(emb, out / f"embedding_{method}.png", method, classes,
                                                         names, seed))
            if png is None:
                break  # the same file: one warning is enough
            images.append(png)
    keys = ("test_acc", "test_top5", "best_val_acc", "best_epoch", "epochs", "steps", "images_per_s", "wall_s",
            "world_size", "precision")
    table = [{"run": run.name, **{k: run.summary[k] for k in keys if k in run.summary}}]
    write_atomic_text(out / REPORT, _html(f"run {run.name}", table, images, out,
                                          [(f"config ({files.config.name})", run.config_text)]))
    return images


def features_report(features_dir: Path, out: Optional[Path] = None, tsne: bool = False,
                    classes: Optional[Sequence[int]] = None, max_points: int = 5000) -> List[Path]:
    """PCA (and t-SNE) of an extracted features directory, coloured by class (E4's plots).

    At most `max_points` rows, a seeded random sample, so t-SNE stays within minutes."""
    import numpy as np

    from toolkit.features import load_features

    feats = load_features(features_dir)
    labelled = (feats.labels >= 0).nonzero().flatten().numpy()
    if len(labelled) < 3:
        raise ConfigError(f"report: {features_dir} has fewer than 3 labelled images; nothing to colour by class")
    if len(labelled) > max_points:
        labelled = np.sort(np.random.default_rng(0).choice(labelled, max_points, replace=False))
    data = {"features/features": feats.features.numpy()[labelled], "features/labels": feats.labels.numpy()[labelled]}
    out = Path(out or features_dir)
    out.mkdir(parents=True, exist_ok=True)
    layer = f"{feats.meta.get('model', {}).get('name')} {feats.meta.get('layer')} features"
    images = [plot_embeddings(data, out / f"features_{m}.png", m, classes, feats.class_names, 0, layer)
              for m in (("pca", "tsne") if tsne else ("pca",))]
    table = [{"features": str(features_dir), "rows": feats.meta["rows"], "dim": feats.meta["dim"],
              "bad_images": feats.meta["bad_images"], "layer": feats.meta["layer"]}]
    write_atomic_text(out / REPORT, _html(f"features {features_dir}", table, images, out))
    return images


# --- comparisons -----------------------------------------------------------------------------

def _used_keys(section: str, sec: Dict[str, Any]) -> Optional[set]:
    """The keys of an optim/sched section that its chosen entry reads (the builder's keyword
    arguments), plus `name`; None for other sections or an unknown name (keep every key).
    Adam takes no momentum and a cosine schedule no milestones, so neither labels a run."""
    if section not in ("optim", "sched") or not isinstance(sec.get("name"), str):
        return None
    from toolkit.optim import OPTIMIZERS, SCHEDULERS  # (torch: only when comparing runs)

    registry = OPTIMIZERS if section == "optim" else SCHEDULERS
    if sec["name"] not in registry:
        return None
    params = inspect.signature(registry.get(sec["name"])).parameters.values()
    used = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    # every optimizer gets its parameter groups from these (engine/stage.py: param_groups)
    return used | {"name"} | ({"no_decay_norm_bias"} if section == "optim" else set())


def _settings(run: Run) -> Dict[str, Any]:
    """The run's config as flat `section.key` settings, without what does not change training
    (run.*, paths, resume) and without keys the chosen optimizer or schedule does not read."""
    flat = {}
    for s, sec in run.config.items():
        if not isinstance(sec, dict) or s == "run":
            continue
        used = _used_keys(s, sec)
        flat.update({f"{s}.{k}": v for k, v in sec.items()
                     if k not in ("dir", "root", "resume") and (used is None or k in used)})
    return flat


def _label_runs(runs: List[Run]) -> List[str]:
    """A short label per run: the settings that differ between them and that its optimizer and
    schedule use (else the directory name)."""
    flat = [_settings(r) for r in runs]
    keys = sorted({k for f in flat for k in f})
    # differ among the runs that use the key (Adam's betas, unused by SGD, label nobody when all equal)
    differ = [k for k in keys if len({json.dumps(f[k], sort_keys=True, default=str) for f in flat if k in f}) > 1]
    labels = [", ".join(f"{k}={f[k]:.4g}" if isinstance(f[k], float) else f"{k}={f[k]}" for k in differ if k in f)
              for f in flat]
    if len(set(labels)) < len(runs) or not all(labels):
        labels = [r.path.name for r in runs]
    return labels


def _readable_log_axis(ax, values: Sequence[float]) -> None:
    """A log scale only when the values span more than a decade, with ticks at 1, 2 and 5 of
    each decade written as plain numbers (0.05, 0.1, 0.2 ...), not 10^-1 or 2x10^-1."""
    pos = [v for v in values if v > 0 and math.isfinite(v)]
    if not pos or max(pos) / min(pos) < 10:
        return
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _run_status(run: Run, given: Optional[str]) -> str:
    if given:
        return given
    return "done" if "test_acc" in run.summary else "unfinished"


def compare_figure(runs: List[Run], labels: List[str], statuses: List[str]):
    """E6's figure: training loss per logged step (at fractional epochs) and val accuracy per
    epoch for every run. A run that did not finish (ASHA stopped it, it failed) ends in a
    large X and says so in the legend."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    xs = [step_epochs(r) for r in runs]
    by_epoch = all(x is not None for r, x in zip(runs, xs) if r.steps)
    losses: List[float] = []
    for i, (run, label, status, x) in enumerate(zip(runs, labels, statuses, xs)):
        stopped = status != "done"
        if stopped:
            label = f"{label} ({status} after epoch {run.epochs[-1]['epoch'] if run.epochs else 0})"
        color = f"C{i % 10}"  # the same colour in both panels
        if run.steps:
            y = [r["loss"] for r in run.steps]
            x = x if by_epoch else [r["step"] for r in run.steps]
            ax_loss.plot(x, y, lw=1, ls="--" if stopped else "-", color=color, label=label)
            losses += y
            if stopped:
                ax_loss.plot(x[-1:], y[-1:], "X", ms=9, color=color)
        acc = [(r["epoch"], r["val_acc"]) for r in run.epochs if isinstance(r.get("val_acc"), (int, float))]
        if acc:
            ax_acc.plot([a[0] for a in acc], [100 * a[1] for a in acc], "--o" if stopped else "-o", ms=4,
                        color=color, label=label)
            if stopped:
                ax_acc.plot([acc[-1][0]], [100 * acc[-1][1]], "X", ms=10, color=color)
    ax_loss.set(xlabel="epoch" if by_epoch else "step", ylabel="training loss")
    _readable_log_axis(ax_loss, losses)
    ax_acc.set(xlabel="epoch", ylabel="val accuracy (%)")
    ax_acc.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return fig


def compare(run_dirs: Sequence[Path], out: Path, status: Optional[Dict[str, str]] = None) -> List[Path]:
    """E6's figure (compare.png) plus the table (compare.csv, compare.md) and report.html.

    `status`: run directory -> done / stopped / error / unfinished (a sweep passes its trials');
    by default a run with a test result is done and any other unfinished. Runs that did not
    finish show their last values (val_acc, best so far) marked by their status."""
    runs = [load_run(p) for p in run_dirs]
    status = {str(Path(k)): v for k, v in (status or {}).items()}
    statuses = [_run_status(r, status.get(str(r.path))) for r in runs]
    labels = _label_runs(runs)
    out.mkdir(parents=True, exist_ok=True)
    images = [_save(compare_figure(runs, labels, statuses), out / "compare.png")]
    table = []
    for run, label, st in zip(runs, labels, statuses):
        s = run.summary
        vals = [r["val_acc"] for r in run.epochs if isinstance(r.get("val_acc"), (int, float))]
        table.append({"run": label, "status": st, "epochs": len(run.epochs),
                      "val_acc": vals[-1] if vals else None,
                      "best_val_acc": s.get("best_val_acc", max(vals) if vals else None),
                      "test_acc": s.get("test_acc"),
                      "final_train_loss": run.epochs[-1].get("train_loss") if run.epochs else None,
                      "wall_s": s.get("wall_s"), "dir": str(run.path)})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(table[0]))
    writer.writeheader()
    writer.writerows(table)
    write_atomic_text(out / "compare.csv", buf.getvalue())
    cols = ["run", "status", "val_acc", "best_val_acc", "test_acc", "final_train_loss", "epochs"]
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in table:
        md.append("| " + " | ".join(_fmt(row[c], c) for c in cols) + " |")
    write_atomic_text(out / "compare.md", "\n".join(md) + "\n")
    configs = [(f"config of {label} ({run.path})", run.config_text) for run, label in zip(runs, labels)]
    write_atomic_text(out / REPORT, _html("comparison", table, images, out, configs))
    return images


def find_runs(path: Path) -> List[Path]:
    """PATH itself if it is a run, else every run directory below it (a sweep), sorted."""
    if RunDir(path).metrics.is_file():
        return [path]
    return sorted(p.parent for p in path.rglob(METRICS))


def _parse_classes(text: Optional[str]) -> Optional[List[int]]:
    if not text:
        return None
    try:
        return [int(c) for c in text.split(",")]
    except ValueError:
        raise ConfigError(f"report: --classes: expected comma-separated integers, got {text!r}") from None


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m toolkit.report", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=epilog(examples="\n".join(__doc__.split("\n")[2:8])))
    ap.add_argument("paths", nargs="+", type=Path, help="run directories, a directory of runs, or a features directory")
    ap.add_argument("--out", type=Path, help="where to write (default: the run, or PATH/compare)")
    ap.add_argument("--tsne", action="store_true", help="also t-SNE of the features (slower)")
    ap.add_argument("--classes", help="comma-separated class indices for the embedding plots")
    args = ap.parse_args(argv)
    try:
        for p in args.paths:
            if not p.is_dir():
                raise ConfigError(f"report: no such directory: {p}")
        classes = _parse_classes(args.classes)
        if len(args.paths) == 1 and (args.paths[0] / "meta.json").is_file():  # an extracted features directory
            images = features_report(args.paths[0], args.out, args.tsne, classes)
            print(f"wrote {len(images)} image(s) and {REPORT} to {args.out or args.paths[0]}")
            return 0
        runs = [r for p in args.paths for r in find_runs(p)]
        if not runs:
            raise ConfigError(f"report: no run directories (with {METRICS}) under {', '.join(map(str, args.paths))}")
        if len(runs) == 1:
            images = run_report(runs[0], args.out, args.tsne, classes)
            where = args.out or runs[0]
        else:
            where = args.out or (args.paths[0] / "compare")
            images = compare(runs, where)
    except ToolkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"wrote {len(images)} image(s) and {REPORT} to {where}")
    return 0


if __name__ == "__main__":
    from toolkit.errors import leave  # sys.exit, minus the teardown of every module

    leave(main())
