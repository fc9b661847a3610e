"""What the per-step non-finite check costs: train.nonfinite=skip vs stop, side by side in one run.

    .venv/bin/python benchmarks/nonfinite_sync.py                                  # CPU: 1 and 2 processes
    .venv/bin/python benchmarks/nonfinite_sync.py --launch launch/single_gpu.yaml   # on a GPU

`skip` (the default) checks every micro-batch's loss before backward: the flag is all-reduced
across ranks and read on the host, one sync per step. `stop` counts non-finite losses on the
device and reads the count only at log steps, checkpoints and epoch ends. Each run is the real
CLI (`accelerate launch toolkit/train.py`) on the `--config`; a run's figure is the median of its
"train" rows' images/s in RUN/metrics.jsonl after the first epoch (each row: the images of one log
window over its training time, the wait for the device at the log step included; the first epoch's
warm-up left out), or summary.json's when the run logged no later rows. The two modes alternate
over `--repeats` rounds and the medians of the runs are compared, so drift in the machine's speed
hits both. Results: docs/benchmarks.md, "The per-step non-finite check".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def images_per_s(launch: str, config: str, mode: str, overrides: list, run_dir: Path) -> float:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", launch]
    if "ddp" in launch or "multi" in launch:
        import socket
        with socket.socket() as s:  # a free port, so runs never collide
            s.bind(("127.0.0.1", 0))
            cmd += ["--main_process_port", str(s.getsockname()[1])]
    cmd += ["toolkit/train.py", "--config", config, f"run.dir={run_dir}", f"train.nonfinite={mode}",
            "log.tensorboard=false", "log.progress=none", "log.plots=false", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in rows if r.get("kind") == "train" and r.get("epoch", 0) >= 1]
    return statistics.median(rates) if rates else json.loads((run_dir / "summary.json").read_text())["images_per_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--launch", default="launch/cpu.yaml,launch/cpu_ddp.yaml",
                   help="comma-separated Accelerate config files, each compared on its own")
    p.add_argument("--config", default="configs/digits_lenet.yaml")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("overrides", nargs="*", default=["train.epochs=4", "sched.milestones=[]"],
                   help="config overrides for every run (default: train.epochs=4 sched.milestones=[])")
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for launch in args.launch.split(","):
            runs = {"skip": [], "stop": []}
            for r in range(args.repeats):
                for mode in runs:
                    runs[mode].append(images_per_s(launch, args.config, mode, args.overrides,
                                                   Path(tmp) / f"{Path(launch).stem}-{mode}-{r}"))
                    print(f"  {launch} {mode} round {r + 1}: {runs[mode][-1]:,.0f} img/s", flush=True)
            med = {m: statistics.median(v) for m, v in runs.items()}
            results[launch] = {"median_images_per_s": med, "runs": runs, "stop_over_skip": med["stop"] / med["skip"]}
            if args.json:  # after each launch config, so a run cut short keeps what it measured
                Path(args.json).write_text(json.dumps(results, indent=2))
            print(f"{launch:24s} skip {med['skip']:9,.0f} img/s   stop {med['stop']:9,.0f} img/s   "
                  f"stop/skip {med['stop'] / med['skip']:.3f}   (median of {args.repeats}; "
                  f"skip {min(runs['skip']):,.0f}-{max(runs['skip']):,.0f}, "
                  f"stop {min(runs['stop']):,.0f}-{max(runs['stop']):,.0f})", flush=True)


if __name__ == "__main__":
    main()
