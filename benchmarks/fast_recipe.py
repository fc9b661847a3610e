"""configs/cifar10_fast.yaml's training speed vs the same model trained the plain way, side by side.

    python benchmarks/fast_recipe.py --out fast_recipe.json            # on a GPU: ~3 min
    python benchmarks/fast_recipe.py --smoke --out /tmp/smoke.json     # tiny, on the CPU

CIFAR-10 cannot be downloaded where this toolkit is built, so the data is `synthetic` at CIFAR's
shape (5,000 uint8 3x32x32 training images): images/s is what this measures, not accuracy.
Every setting runs the real `toolkit.engine.fit` on configs/cifar10_fast.yaml (ResNet-9, batch
512, flip-crop, label smoothing, one-cycle, EMA, flip TTA) with one change each:
- recipe:          the config as shipped (device-resident loader, bf16, channels_last, compile);
- no compile:      train.compile=false;
- plain:           fp32 eager with a DataLoader (data.loader=dataloader, precision no,
                   channels_last false, compile false), the way the reports trained.
Each setting runs in its own process (`python -m toolkit.train`: Accelerate's precision is
fixed per process). images/s is the median of the per-step rates in RUN/metrics.jsonl after the
first epoch (which holds compilation); "50k epoch" is 50,000 / that rate. Results:
docs/benchmarks.md.
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

import torch

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "cifar10_fast.yaml")
SETTINGS = {
    "recipe": [],
    "no compile": ["train.compile=false"],
    "plain": ["data.loader=dataloader", "train.precision=no", "train.channels_last=false", "train.compile=false"],
}


def run(setting: str, work: Path, epochs: int, limit: int, batch: int, smoke: bool) -> dict:
    run_dir = work / setting.replace(" ", "_")
    overrides = [f"run.dir={run_dir}", "data.name=synthetic", "data.root=null", "data.image_size=32",
                 f"data.limit={limit}", f"data.batch_size={batch}", f"data.eval_batch_size={min(limit, 1000)}",
                 f"train.epochs={epochs}", "train.keep_last=1", "log.every_n_steps=1", "log.plots=false",
                 "log.tensorboard=false", "log.progress=none", *SETTINGS[setting]]
    if smoke:
        overrides += ["train.compile=false", "train.precision=no"]
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "toolkit.train", "--config", CONFIG, *overrides],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{setting}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in rows if r.get("kind") == "train" and r["epoch"] >= 1]
    rate = statistics.median(rates)
    return {"images_per_s": rate, "epoch_50k_s": 50_000 / rate, "fit_wall_s": wall, "steps_measured": len(rates),
            "loader": summary["loader"], "precision": summary["precision"], "overrides": overrides}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--epochs", type=int, default=6)
    args = p.parse_args()
    limit, batch, epochs = (256, 64, 2) if args.smoke else (5000, 512, args.epochs)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device {device}, torch {torch.__version__}, {limit} images/epoch, batch {batch}, {epochs} epochs")
    res = {"device": device, "torch": torch.__version__, "settings": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for setting in SETTINGS:
            res["settings"][setting] = r = run(setting, Path(tmp), epochs, limit, batch, args.smoke)
            Path(args.out).write_text(json.dumps(res, indent=1))
            print(f"{setting:12s} {r['images_per_s']:10,.0f} img/s   50k epoch {r['epoch_50k_s']:6.2f} s   "
                  f"fit wall {r['fit_wall_s']:6.1f} s   loader {r['loader']}")
    base = res["settings"]["plain"]["images_per_s"]
    for setting, r in res["settings"].items():
        print(f"{setting:12s} {r['images_per_s'] / base:6.2f}x plain")


if __name__ == "__main__":
    main()
