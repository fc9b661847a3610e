"""Plots and an HTML page from one run directory, or a comparison of several runs.

    python -m toolkit.report RUN                      # RUN/curves.png, confusion_*.png, embedding_pca.png, report.html
    python -m toolkit.report RUN --tsne --classes 0,1,2,3,4
    python -m toolkit.report RUN_A RUN_B ... --out DIR   # DIR/compare.png, compare.csv, compare.md, report.html
    python -m toolkit.report SWEEP_DIR                # every run below it, compared
    python -m toolkit.report RUN/features --tsne      # PCA / t-SNE of extracted features, by class

Reads only the run-directory contract (summary.json, metrics.jsonl, config.yaml,
confusion_*.csv, embeddings.safetensors), so it works on runs from any machine, finished or
not. Every image is written to a temporary name and renamed, so a crash never leaves half a
PNG. `fit` calls `run_report` at the end of every run (log.plots).
"""

from __future__ import annotations

import argparse
import csv
import html
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from toolkit.errors import ConfigError, ToolkitError  # noqa: E402
from toolkit.rundir import METRICS, REPORT, RunDir, write_atomic_bytes, write_atomic_text  # noqa: E402

MAX_LEGEND_CLASSES = 10  # embedding plots colour at most this many classes unless told which


@dataclass
class Run:
    path: Path
    name: str
    summary: Dict[str, Any] = field(default_factory=dict)
    config: Dict[str, Any] = field(default_factory=dict)
    epochs: List[Dict[str, Any]] = field(default_factory=list)  # kind == "epoch" rows
    steps: List[Dict[str, Any]] = field(default_factory=list)  # kind == "train" rows


def load_run(path: Path) -> Run:
    path = Path(path)
    files = RunDir(path)
    metrics = files.metrics
    if not metrics.is_file():
        raise ConfigError(f"report: {path} is not a run directory (no {METRICS})")
    run = Run(path=path, name=path.name)
    for line in metrics.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line torn by a crash
            continue
        if row.get("kind") == "epoch":
            run.epochs.append(row)
        elif row.get("kind") == "train":
            run.steps.append(row)
    if files.summary.is_file():
        run.summary = json.loads(files.summary.read_text())
    if files.config.is_file():
        run.config = yaml.safe_load(files.config.read_text()) or {}
        run.name = run.config.get("run", {}).get("name", run.name)
    return run


def _save(fig, out: Path) -> Path:
    """PNG to a temporary name, then renamed into place."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return write_atomic_bytes(out, buf.getvalue())


def _stage_bounds(run: Run) -> List[float]:
    """Epoch numbers after which a new stage begins (for vertical lines)."""
    out = []
    for prev, row in zip(run.epochs, run.epochs[1:]):
        if row.get("stage") != prev.get("stage"):
            out.append(prev["epoch"] + 0.5)
    return out


def plot_curves(run: Run, out: Path) -> Path:
    """E2's figure: loss and accuracy per epoch, train / val (/ test when logged per epoch)."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ep = [r["epoch"] for r in run.epochs]
    for split, style in (("train", "-o"), ("val", "-s"), ("test", "-^")):
        if run.epochs and f"{split}_loss" in run.epochs[0]:
            ax_loss.plot(ep, [r[f"{split}_loss"] for r in run.epochs], style, ms=3, label=split)
            ax_acc.plot(ep, [100 * r[f"{split}_acc"] for r in run.epochs], style, ms=3, label=split)
    if "test_acc" in run.summary and not (run.epochs and "test_acc" in run.epochs[0]):
        ax_acc.plot([ep[-1] if ep else 0], [100 * run.summary["test_acc"]], "k*", ms=10,
                    label=f"test (final) {100 * run.summary['test_acc']:.1f}%")
    for ax, label in ((ax_loss, "loss"), (ax_acc, "accuracy (%)")):
        for x in _stage_bounds(run):
            ax.axvline(x, color="grey", ls="--", lw=0.8)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(run.name)
    return _save(fig, out)


def read_confusion(path: Path):
    """confusion_<split>.csv -> (class names, rows of counts)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    names = rows[0][1:]
    return names, [[int(v) for v in r[1:]] for r in rows[1:]]


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


def _html(title: str, table: List[Dict[str, Any]], images: List[Path], root: Path) -> str:
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in (table[0] if table else {}))
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row.values()) + "</tr>"
                   for row in table)
    imgs = "".join(f'<p><img src="{html.escape(str(p.relative_to(root)))}" style="max-width:100%"></p>'
                   for p in images)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 8px;border-bottom:1px solid #ddd}"
            f"</style></head><body><h1>{html.escape(title)}</h1><table><tr>{head}</tr>{body}</table>"
            f"{imgs}</body></html>\n")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def run_report(run_dir: Path, out: Optional[Path] = None, tsne: bool = False,
               classes: Optional[Sequence[int]] = None) -> List[Path]:
    """Every plot one run's files allow, and report.html. Returns the images written."""
    run = load_run(run_dir)
    out = Path(out or run_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = [plot_curves(run, out / "curves.png")]
    names, files = None, RunDir(run.path)
    for split in ("train", "test"):
        csv_path = files.confusion(split)
        if csv_path.is_file():
            images.append(plot_confusion(csv_path, out / f"confusion_{split}.png", f"{split} confusion"))
            names = read_confusion(csv_path)[0]
    emb = files.embeddings
    if emb.is_file():
        seed = int(run.config.get("run", {}).get("seed", 0))
        for method in ("pca", "tsne") if tsne else ("pca",):
            images.append(plot_embeddings(emb, out / f"embedding_{method}.png", method, classes, names, seed))
    keys = ("test_acc", "test_top5", "best_val_acc", "best_epoch", "epochs", "steps", "images_per_s", "wall_s",
            "world_size", "precision")
    table = [{"run": run.name, **{k: run.summary[k] for k in keys if k in run.summary}}]
    write_atomic_text(out / REPORT, _html(f"run {run.name}", table, images, out))
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


def _label_runs(runs: List[Run]) -> List[str]:
    """A short label per run: the settings that differ between them (else the directory name)."""
    flat = [{f"{s}.{k}": v for s, sec in r.config.items() if isinstance(sec, dict) for k, v in sec.items()
             if s != "run" and k not in ("dir", "root", "resume")} for r in runs]
    keys = sorted({k for f in flat for k in f})
    differ = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1]
    labels = [", ".join(f"{k}={f.get(k)}" for k in differ) for f in flat]
    if len(set(labels)) < len(runs) or not all(labels):
        labels = [r.path.name for r in runs]
    return labels


def compare(run_dirs: Sequence[Path], out: Path) -> List[Path]:
    """E6's figure: training loss per logged step and val accuracy per epoch for every run, in
    one PNG, plus the table (compare.csv, compare.md) and report.html."""
    runs = [load_run(p) for p in run_dirs]
    labels = _label_runs(runs)
    out.mkdir(parents=True, exist_ok=True)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run, label in zip(runs, labels):
        if run.steps:
            ax_loss.plot([r["step"] for r in run.steps], [r["loss"] for r in run.steps], lw=1, label=label)
        if run.epochs:
            ax_acc.plot([r["epoch"] for r in run.epochs], [100 * r["val_acc"] for r in run.epochs], "-o", ms=3,
                        label=label)
    ax_loss.set(xlabel="step", ylabel="training loss", yscale="log")
    ax_acc.set(xlabel="epoch", ylabel="val accuracy (%)")
    ax_acc.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    images = [_save(fig, out / "compare.png")]
    table = []
    for run, label in zip(runs, labels):
        s = run.summary
        table.append({"run": label, "test_acc": s.get("test_acc"), "best_val_acc": s.get("best_val_acc"),
                      "final_train_loss": run.epochs[-1]["train_loss"] if run.epochs else None,
                      "epochs": len(run.epochs), "wall_s": s.get("wall_s"), "dir": str(run.path)})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(table[0]))
    writer.writeheader()
    writer.writerows(table)
    write_atomic_text(out / "compare.csv", buf.getvalue())
    cols = ["run", "test_acc", "best_val_acc", "final_train_loss", "epochs"]
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in table:
        cells = [row["run"]] + [("-" if row[c] is None else f"{100 * row[c]:.2f}%" if c.endswith("acc")
                                 else _fmt(row[c])) for c in cols[1:]]
        md.append("| " + " | ".join(cells) + " |")
    write_atomic_text(out / "compare.md", "\n".join(md) + "\n")
    write_atomic_text(out / REPORT, _html("comparison", table, images, out))
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
    ap = argparse.ArgumentParser(prog="python -m toolkit.report", description=__doc__.splitlines()[0])
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
    sys.exit(main())
