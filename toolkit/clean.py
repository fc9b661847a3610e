"""Find the training samples whose labels are most likely wrong: K fold runs, then confident learning.

    python -m toolkit.clean --config configs/digits_lenet.yaml --folds 5 data.label_noise=0.3 --dir runs/clean/d30
    python -m toolkit.clean --config configs/digits_lenet.yaml --folds 5 --parallel --dir runs/clean/d30
    python -m toolkit.clean --config configs/digits_lenet.yaml --folds 5 data.label_noise=0.3 --dir runs/clean/d30
    toolkit-train --config digits_lenet data.label_noise=0.3 data.exclude=runs/clean/d30/label_issues.csv

Every training sample needs a probability vector from a model that did not train on it: the
training split is cut into K folds (stratified by the given labels, seeded by data.split_seed),
and fold run k (CLEAN/runs/fold_k, an ordinary run with data.holdout_folds=K
data.holdout_fold=k) trains on the other K-1 folds and writes fold k's softmax
(RUN/holdout_probs.safetensors). The folds run one after another, or side by side as a Ray Tune
grid (--parallel, toolkit.tune's machinery). cleanlab's `find_label_issues` then flags the
samples whose given label disagrees with the out-of-fold probabilities (confident learning,
--filter-by, default prune_by_noise_rate), ranked by self-confidence (the out-of-fold probability
of the given label, lowest first). CLEAN gets label_issues.csv (rank, index, path, given,
suggested, score), label_issues.png (the top --top suspects with both labels), oof_probs.safetensors
and summary.json (with data.label_noise: precision and recall against RUN/label_noise.json).

Running the same command again with the same --dir resumes: finished folds are kept, an
unfinished one continues from its last checkpoint (train.resume=auto), and the ranking is redone
(another --filter-by re-ranks without training). Exit codes: 0 done, 1 a fold run failed,
2 bad input (one line; nothing trained). See docs/clean.md.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional

from toolkit import rundir
from toolkit.clihelp import TRAIN_SECTIONS, config_help, epilog
from toolkit.errors import ConfigError, ToolkitError

FILTERS = ("prune_by_noise_rate", "prune_by_class", "both", "confident_learning", "predicted_neq_given")
OWN_KEYS = ("run.", "train.resume=", "data.holdout_folds=", "data.holdout_fold=", "data.exclude=", "data.exclude_top=")


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    usage, notes = __doc__.split("\n", 2)[2].split("\n\n", 1)
    p = argparse.ArgumentParser(prog="python -m toolkit.clean", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=epilog(TRAIN_SECTIONS, usage, "docs/clean.md", notes))
    p.add_argument("overrides", nargs="*", help="section.key=value, applied to every fold run")
    p.add_argument("--config", "-c", help="the fold runs' config: " + config_help("digits_lenet"))
    p.add_argument("--folds", type=int, default=5,
                   help="K: fold runs, each predicting the fold it left out (default 5)")
    p.add_argument("--parallel", action="store_true", help="run the folds side by side as Ray Tune trials")
    p.add_argument("--dir", help="the clean directory CLEAN (default runs/clean/CONFIG-TIMESTAMP); "
                                 "an existing one of the same job resumes")
    p.add_argument("--top", type=int, default=64, help="suspects shown in label_issues.png (default 64)")
    p.add_argument("--filter-by", choices=FILTERS, default="prune_by_noise_rate",
                   help="cleanlab's rule for flagging (default prune_by_noise_rate)")
    p.add_argument("--num-cpus", type=int, help="--parallel, local Ray: CPUs to offer (default: all)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="--parallel: CPUs per fold run (default 1)")
    p.add_argument("--gpus-per-trial", type=float, default=0.0, help="--parallel: GPUs per fold run (default 0)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------
# the job: its settings, checked before anything trains


class NoAccelerator:
    """What load_data asks of an Accelerator when the data is only being checked."""

    main_process_first = staticmethod(contextlib.nullcontext)


def make_sweep(args: argparse.Namespace):
    """The fold runs as a toolkit.tune Sweep (sequential runs use its trial_config too, so both
    modes train exactly the same configs), after every check that needs no training."""
    from toolkit.config import find_config, load_config
    from toolkit.tune import Sweep, absolute_overrides, absolute_path

    if args.folds < 2:
        raise ConfigError(f"--folds: must be >= 2 (each fold is predicted by a model trained on the others), "
                          f"got {args.folds}")
    if args.top < 0:
        raise ConfigError(f"--top: must be >= 0, got {args.top}")
    overrides = absolute_overrides(list(args.overrides))
    for o in overrides:
        if o.startswith(OWN_KEYS):
            raise ConfigError(f"override {o!r}: toolkit.clean sets run.*, train.resume, data.holdout_* itself, and "
                              "judges the whole training split (no data.exclude)")
    config = absolute_path(find_config(args.config)) if args.config else None
    overrides.append(f"data.holdout_folds={args.folds}")
    cfg = load_config(config, overrides)  # the config's own checks (data.holdout_folds among them)
    if args.dir:
        clean_dir = Path(args.dir).absolute()
    else:
        stem = Path(config).stem if config else "default"
        clean_dir = Path("runs", "clean", f"{stem}-{datetime.now().strftime('%Y%m%d-%H%M%S')}").absolute()
    return Sweep(name=clean_dir.name, dir=str(clean_dir), config=config, overrides=overrides,
                 space=str(clean_dir / rundir.CLEAN_SPACE), num_samples=None, scheduler="fifo", metric="val_acc",
                 mode="max", max_concurrent=None, cpus_per_trial=args.cpus_per_trial,
                 gpus_per_trial=args.gpus_per_trial, workers_per_trial=1, max_failures=2, grace_period=1,
                 perturbation_interval=1, seed=0,
                 run_name=rundir.CLEAN_FOLD.replace("{fold}", "{data.holdout_fold}")), cfg


def training_split(cfg):
    """(splits, labels the folds train with, the label-noise record or None) of the whole training
    split, with every data check a fold run makes first (empty val or test split, label noise),
    and K against the smallest class."""
    from toolkit.config import with_flat
    from toolkit.engine.fit import load_data
    from toolkit.engine.holdout import check_folds

    whole = with_flat(cfg, {"data.holdout_folds": 0})
    splits, _num_classes, noise, _selection = load_data(whole.data, cfg.model.num_classes, NoAccelerator())
    check_folds(splits.train.labels, cfg.data.holdout_folds, list(splits.class_names))
    return splits, splits.train.labels, noise


def job_record(sweep) -> Dict[str, Any]:
    return {"config": sweep.config, "overrides": sweep.overrides}


def open_clean_dir(sweep) -> Path:
    """CLEAN: created with its clean.json, or an existing one of the same job (a resume).
    Anything else that is not empty is refused: it is not ours to write into."""
    path = Path(sweep.dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--dir: {path} exists and is not a directory")
    job = job_record(sweep)
    if path.is_dir() and any(path.iterdir()):
        try:
            found = json.loads((path / rundir.CLEAN_JOB).read_text())
        except (OSError, ValueError):
            raise ConfigError(f"--dir: {path} is not empty and not a toolkit.clean directory (no readable "
                              f"{rundir.CLEAN_JOB}); choose an empty or new --dir") from None
        if found != job:
            raise ConfigError(f"--dir: {path} holds a clean job of other settings (config {found.get('config')}, "
                              f"overrides {found.get('overrides')}); rerun that job as it was, or choose another --dir")
        return path
    rundir.ensure_writable(path)
    rundir.write_atomic_json(path / rundir.CLEAN_JOB, job)
    return path


def fold_dir(sweep, k: int) -> Path:
    return Path(sweep.dir) / rundir.CLEAN_RUNS / rundir.CLEAN_FOLD.format(fold=k)


def fold_done(run_dir: Path) -> bool:
    run = rundir.RunDir(run_dir)
    return run.summary.is_file() and (run_dir / rundir.HOLDOUT_PROBS).is_file()


# ------------------------------------------------------------------------------------------
# the fold runs


def run_folds(sweep, folds: int, parallel: bool, num_cpus: Optional[int]) -> None:
    todo = [k for k in range(folds) if not fold_done(fold_dir(sweep, k))]
    for k in sorted(set(range(folds)) - set(todo)):
        print(f"fold {k + 1}/{folds}: finished, kept ({fold_dir(sweep, k)})", flush=True)
    if not todo:
        return
    if parallel:
        _run_parallel(sweep, todo, num_cpus)
    else:
        _run_sequential(sweep, todo, folds)
    missing = [k for k in range(folds) if not fold_done(fold_dir(sweep, k))]
    if missing:
        raise ToolkitError(f"fold run(s) {', '.join(map(str, missing))} did not finish; run the same command "
                           "again to resume them")


def _run_sequential(sweep, todo: List[int], folds: int) -> None:
    """The unfinished folds in this process, one after another. Each trains with the threads a
    --parallel trial gets (--cpus-per-trial; Ray sets OMP_NUM_THREADS so): CPU kernels sum in a
    thread-count-dependent order, and over 20 epochs that rounding moved a few samples across
    cleanlab's threshold (7 of 350 at r=0.3), so both modes must compute alike to agree."""
    import torch

    from toolkit.engine.fit import fit
    from toolkit.tune import trial_config

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(sweep.cpus_per_trial)))
    try:
        for k in todo:
            run_dir = fold_dir(sweep, k)
            print(f"fold {k + 1}/{folds}: training -> {run_dir}", flush=True)
            summary = fit(trial_config(sweep, {"data.holdout_fold": k}, run_dir, "auto"))
            print(f"fold {k + 1}/{folds}: test accuracy {summary['test_acc']:.2%}", flush=True)
    finally:
        torch.set_num_threads(threads)


def _run_parallel(sweep, todo: List[int], num_cpus: Optional[int]) -> None:
    """The unfinished folds as one Ray Tune grid over data.holdout_fold, through toolkit.tune."""
    from toolkit.tune import run_sweep

    clean_dir = Path(sweep.dir)
    rundir.write_atomic_text(Path(sweep.space), "grid:\n  data.holdout_fold: [" + ", ".join(map(str, todo)) + "]\n")
    # Tune's state of an earlier pass is not needed: each fold's run directory is its state.
    shutil.rmtree(clean_dir / "tune", ignore_errors=True)
    if run_sweep(sweep, False, None, num_cpus) != 0:
        raise ToolkitError("a fold run failed (see the error lines above); run the same command again to resume")


# ------------------------------------------------------------------------------------------
# the ranking


def gather_oof(sweep, folds: int, labels):
    """(N, C) out-of-fold probabilities in training-index order, checked: every training index
    predicted exactly once, by the fold run that left it out, with the labels it is judged by."""
    import torch
    from safetensors.torch import load_file

    n = len(labels)
    probs = None
    seen = torch.zeros(n, dtype=torch.int64)
    for k in range(folds):
        path = fold_dir(sweep, k) / rundir.HOLDOUT_PROBS
        part = load_file(str(path))
        index = part["index"]
        if probs is None:
            probs = torch.zeros(n, part["probs"].shape[1])
        if len(index) and (int(index.min()) < 0 or int(index.max()) >= n):
            raise ToolkitError(f"{path}: training indices outside 0..{n - 1}: the data changed since the fold ran")
        if not torch.equal(part["labels"], labels[index]):
            raise ToolkitError(f"{path}: its labels differ from the training split's: the data changed since "
                               "the fold ran")
        probs[index] = part["probs"]
        seen[index] += 1
    if not bool((seen == 1).all()):
        raise ToolkitError(f"the fold runs predicted {int((seen == 0).sum())} training samples never and "
                           f"{int((seen > 1).sum())} more than once; the folds do not cover the split")
    return probs


def rank_issues(labels, probs, num_classes: int, filter_by: str):
    """-> (flagged training indices, most likely wrong first; suggested labels (N,); scores (N,)).
    Scores are self-confidence, the out-of-fold probability of the given label."""
    import numpy as np
    from cleanlab.filter import find_label_issues

    p = probs[:, :num_classes].double()  # a head wider than the data's classes: its extra outputs dropped
    p = (p / p.sum(dim=1, keepdim=True).clamp_min(1e-12)).numpy()
    given = labels.numpy()
    flagged = find_label_issues(given, p, filter_by=filter_by, return_indices_ranked_by="self_confidence")
    return np.asarray(flagged, dtype=np.int64), p.argmax(axis=1), p[np.arange(len(given)), given]


def issues_csv(flagged, given, suggested, scores, class_names: List[str], paths) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["rank", "index", "path", "given", "given_name", "suggested", "suggested_name", "score"])
    for r, i in enumerate(flagged.tolist(), start=1):
        g, s = int(given[i]), int(suggested[i])
        w.writerow([r, i, str(paths[i]) if paths is not None else "", g, class_names[g], s, class_names[s],
                    f"{scores[i]:.6f}"])
    return buf.getvalue()


def noise_scores(flagged, noise: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """Precision and recall of the flagged set against the corrupted indices (RUN/label_noise.json)."""
    if noise is None:
        return None
    truth, found = set(noise["index"]), set(flagged.tolist())
    hit = len(truth & found)
    precision = hit / len(found) if found else None
    recall = hit / len(truth) if truth else None
    return {"rate": noise["rate"], "num_noisy": len(truth), "num_flagged": len(found), "num_correct": hit,
            "precision": precision, "recall": recall}


def write_grid(path: Path, splits, flagged, given, suggested, scores, pre) -> None:
    """label_issues.png: the top suspects, each titled `given -> suggested` and its score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from toolkit.data.collection import SplitAsCollection
    from toolkit.predict import GRID_DPI, display_image, grid_layout

    names = splits.class_names
    source = SplitAsCollection(splits.train, "train", "train", names, {})
    n_rows, n_cols, width, height = grid_layout(max(1, len(flagged)))
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(width / GRID_DPI, height / GRID_DPI), dpi=GRID_DPI,
                             squeeze=False)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.33 / n_rows, wspace=0.08, hspace=0.45)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, flagged.tolist()):
        ax.imshow(display_image(source, i, pre).permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(f"#{i} given {names[int(given[i])]}\nlikely {names[int(suggested[i])]} ({scores[i]:.2f})",
                     fontsize=8, color="tab:red")
    rundir.write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=GRID_DPI))
    plt.close(fig)


def rank(sweep, args, splits, labels, noise, wall_s: float) -> Dict[str, Any]:
    """label_issues.csv, label_issues.png, oof_probs.safetensors and summary.json in CLEAN."""
    import torch
    from safetensors.torch import save_file

    from toolkit.features.extractor import run_preprocess
    from toolkit.predict import Preprocess

    clean_dir = Path(sweep.dir)
    probs = gather_oof(sweep, args.folds, labels)
    rundir.write_atomic(clean_dir / rundir.OOF_PROBS, lambda tmp: save_file(
        {"index": torch.arange(len(labels)), "labels": labels.contiguous(), "probs": probs.contiguous()}, str(tmp)))
    names = list(splits.class_names)
    flagged, suggested, scores = rank_issues(labels, probs, len(names), args.filter_by)
    given = labels.numpy()
    text = issues_csv(flagged, given, suggested, scores, names, getattr(splits.train, "paths", None))
    rundir.write_atomic_text(clean_dir / rundir.LABEL_ISSUES, text)
    recorded = run_preprocess(fold_dir(sweep, 0), key=f"run {fold_dir(sweep, 0)}")
    pre = Preprocess(recorded["image_size"], recorded["mean"], recorded["std"])
    write_grid(clean_dir / rundir.LABEL_ISSUES_GRID, splits, flagged[:args.top], given, suggested, scores, pre)
    folds = [json.loads(rundir.RunDir(fold_dir(sweep, k)).summary.read_text()) for k in range(args.folds)]
    summary = {
        "folds": args.folds, "num_train": len(labels), "num_flagged": len(flagged), "filter_by": args.filter_by,
        "ranked_by": "self_confidence", "oof_acc": float((suggested == given).mean()),
        "fold_test_acc": [f["test_acc"] for f in folds], "label_noise": noise_scores(flagged, noise),
        "parallel": args.parallel, "wall_s": wall_s, "config": sweep.config, "overrides": sweep.overrides[:-1],
    }
    rundir.write_atomic_json(clean_dir / rundir.SUMMARY, summary)
    return summary


def report_lines(sweep, summary: Dict[str, Any]) -> List[str]:
    clean_dir = Path(sweep.dir)
    lines = [f"flagged {summary['num_flagged']} of {summary['num_train']} training labels "
             f"({summary['filter_by']}, out-of-fold accuracy {summary['oof_acc']:.2%}): "
             f"{clean_dir / rundir.LABEL_ISSUES}; top suspects: {clean_dir / rundir.LABEL_ISSUES_GRID}"]
    ln = summary["label_noise"]
    if ln is not None:
        fmt = lambda v: "-" if v is None else f"{v:.2%}"  # noqa: E731
        lines.append(f"against the {ln['num_noisy']} corrupted labels (data.label_noise={ln['rate']}): "
                     f"precision {fmt(ln['precision'])}, recall {fmt(ln['recall'])}")
    cmd = ["toolkit-train"] + (["--config", sweep.config] if sweep.config else []) + sweep.overrides[:-1]
    lines.append(f"train without them: {' '.join(cmd)} data.exclude={clean_dir / rundir.LABEL_ISSUES}")
    return lines


def clean(args: argparse.Namespace) -> Dict[str, Any]:
    t0 = time.perf_counter()
    sweep, cfg = make_sweep(args)
    splits, labels, noise = training_split(cfg)
    clean_dir = open_clean_dir(sweep)
    with rundir.run_lock(clean_dir):
        run_folds(sweep, args.folds, args.parallel, args.num_cpus)
        summary = rank(sweep, args, splits, labels, noise, time.perf_counter() - t0)
    for line in report_lines(sweep, summary):
        print(line, flush=True)
    return summary


def main(argv: Optional[List[str]] = None) -> int:
    """One `error:` line and exit 2 on bad input, 1 when a fold run failed (toolkit.errors.run_cli);
    a killed or interrupted job resumes when the same command runs again."""
    from toolkit.errors import run_cli

    args = parse_args(argv)
    code, _summary = run_cli(lambda: clean(args))
    return code

if __name__ == "__main__":
    sys.exit(main())  # as toolkit.tune: --parallel starts Ray, whose teardown is left to a normal exit
