"""What a Ray Tune sweep costs on top of its trials, side by side in one run.

    .venv/bin/python benchmarks/tune_overhead.py [--epochs 10] [--lrs 0.001,0.005,0.01,0.1]

Three ways to run the same learning-rate trials (LeNet on digits, FIFO, no early stopping):
  loop      one `python -m toolkit.train` per lr, one after another (the hand-written loop)
  tune x1   `python -m toolkit.tune --max-concurrent 1` (same one-at-a-time schedule, through Ray)
  tune      `python -m toolkit.tune` with as many trials at once as there are CPUs
For each: wall time, the sum of the trials' own wall times (engine start to summary, from each
run's summary.json), and their ratio. Tune's fixed cost (starting Ray, trial actors, reports)
is wall - sum for the one-at-a-time sweep.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def run(cmd, env=None) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def trial_walls(runs: list) -> float:
    return sum(json.loads((r / "summary.json").read_text())["wall_s"] for r in runs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lrs", default="0.001,0.005,0.01,0.1")
    args = ap.parse_args()
    lrs = [float(x) for x in args.lrs.split(",")]
    common = [f"train.epochs={args.epochs}", "sched.milestones=[]", "log.plots=false"]
    out = Path(tempfile.mkdtemp(prefix="tune-bench-"))
    space = out / "lrs.yaml"
    space.write_text(f"grid:\n  optim.lr: {lrs}\n")
    rows = []

    runs = []
    wall = 0.0
    for i, lr in enumerate(lrs):  # one CPU thread per trial, as Tune gives a 1-CPU trial
        runs.append(out / "loop" / f"lr{i}")
        wall += run([PY, "-m", "toolkit.train", "--config", "configs/digits_lenet.yaml", f"optim.lr={lr}",
                     f"run.dir={runs[-1]}", "log.progress=none", *common], env={"OMP_NUM_THREADS": "1"})
    rows.append(("loop (python -m toolkit.train per lr)", wall, trial_walls(runs)))

    for label, extra in (("tune, one trial at a time", ["--max-concurrent", "1"]),
                         (f"tune, {os.cpu_count()} CPUs", [])):
        name = "x1" if extra else "all"
        wall = run([PY, "-m", "toolkit.tune", "--config", "configs/digits_lenet.yaml", "--space", str(space),
                    "--scheduler", "fifo", "--storage", str(out), "--name", name, *extra, *common])
        rows.append((label, wall, trial_walls(sorted((out / name / "runs").iterdir()))))

    print(f"{len(lrs)} trials of LeNet on digits, {args.epochs} epochs each, {os.cpu_count()} CPUs\n")
    print("| how | wall (s) | sum of trial walls (s) | wall / sum |")
    print("|---|---|---|---|")
    for label, wall, total in rows:
        print(f"| {label} | {wall:.1f} | {total:.1f} | {wall / total:.2f} |")


if __name__ == "__main__":
    main()
