"""toolkit.clean's K fold runs one after another vs side by side (--parallel, Ray Tune), wall time.

    .venv/bin/python benchmarks/clean_parallel.py [--folds 5] [--epochs 20] [--repeats 1] [--num-cpus 2]

The same job both ways (LeNet on digits, configs/digits_lenet.yaml, data.label_noise=0.3,
log.plots=false), each in a fresh directory, alternating when repeated: the whole command's wall
time (start-up, K fold runs, the ranking), the sum of the fold runs' own wall times (summary.json),
and parallel / sequential. Every fold trains with one thread either way (--cpus-per-trial 1: the
sequential runs set it too, so that both ways compute alike); with 2 cores --parallel trains two
folds at once. It also checks that both ways wrote the same label_issues.csv. Results: docs/benchmarks.md, "toolkit.clean".
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_clean(out: Path, folds: int, epochs: int, parallel: bool, num_cpus: int) -> dict:
    cmd = [sys.executable, "-m", "toolkit.clean", "--config", "configs/digits_lenet.yaml", "--folds", str(folds),
           "--dir", str(out), f"train.epochs={epochs}", "data.label_noise=0.3", "log.plots=false"]
    if parallel:
        cmd += ["--parallel", "--num-cpus", str(num_cpus)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    runs = sorted((out / "runs").iterdir())
    folds_sum = sum(json.loads((r / "summary.json").read_text())["wall_s"] for r in runs)
    return {"wall_s": wall, "fold_wall_sum_s": folds_sum, "csv": (out / "label_issues.csv").read_text()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--num-cpus", type=int, default=2)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="clean-bench-"))
    got = {False: [], True: []}
    for r in range(args.repeats):
        for parallel in ((False, True) if r % 2 == 0 else (True, False)):
            name = f"{'parallel' if parallel else 'sequential'}-{r}"
            got[parallel].append(run_clean(tmp / name, args.folds, args.epochs, parallel, args.num_cpus))
            print(f"{name}: {got[parallel][-1]['wall_s']:.1f} s", flush=True)
    same = all(a["csv"] == got[False][0]["csv"] for a in got[True] + got[False])
    seq = statistics.median(x["wall_s"] for x in got[False])
    par = statistics.median(x["wall_s"] for x in got[True])
    result = {"folds": args.folds, "epochs": args.epochs, "repeats": args.repeats, "num_cpus": args.num_cpus,
              "sequential_wall_s": seq, "parallel_wall_s": par, "parallel_over_sequential": par / seq,
              "sequential_fold_wall_sum_s": statistics.median(x["fold_wall_sum_s"] for x in got[False]),
              "parallel_fold_wall_sum_s": statistics.median(x["fold_wall_sum_s"] for x in got[True]),
              "same_csv": same}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
