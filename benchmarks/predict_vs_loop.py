"""`toolkit.predict` vs the reports' per-image loop: labels for the same PNG files, images/s side by side.

    python benchmarks/predict_vs_loop.py                       # trains a demo run first (~20 s)
    python benchmarks/predict_vs_loop.py --run RUN --copies 3 --rounds 3 --workers 0,1

The images: RUN's test split (digits: 360 images, 32x32) written as PNG files, COPIES times over
(folders copy0/, copy1/ ...). Both sides use the same model and weights (toolkit.load_run) and
must give the same label for every file.

- loop: what the reports wrote to "predict the labels of a few sample images": for each file,
  PIL open + convert("RGB"), a torchvision transform (Resize, CenterCrop, ToImage, ToDtype,
  Normalize with the run's mean/std), `model(x.unsqueeze(0))` under torch.no_grad, softmax,
  arg-max. The model is loaded once, outside the timing.
- predict: `toolkit.predict(RUN, [folder], num_workers=W)` in this process, timed whole: the
  run's loading, the folder scan, decoding (in W DataLoader workers), batches of the run's
  eval_batch_size, inference mode, the rows.

Rounds alternate the sides so drift in the machine's speed hits both; medians and the ratio.
Results: docs/benchmarks.md, "Predict vs the per-image loop".
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def demo_run(work: Path) -> Path:
    run = work / "run"
    subprocess.run([sys.executable, "-m", "toolkit.train", "--config", str(ROOT / "configs/digits_lenet.yaml"),
                    "log.plots=false", "log.tensorboard=false", "log.progress=none", f"run.dir={run}"],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return run


def write_pngs(run: Path, folder: Path, copies: int) -> list:
    """The run's test split as PNG files, COPIES times -> their paths in predict's order."""
    from toolkit.predict import display_image, open_run, split_source

    loaded = open_run(run, "last")
    source = split_source(loaded.cfg, "test", loaded.classes, loaded.preprocess)
    images = [display_image(source, i, loaded.preprocess).permute(1, 2, 0).numpy() for i in range(len(source))]
    paths = []
    for c in range(copies):
        d = folder / f"copy{c}"
        d.mkdir(parents=True)
        for i, x in enumerate(images):
            Image.fromarray(x).save(d / f"{i:05d}.png")
            paths.append(str(d / f"{i:05d}.png"))
    return sorted(paths, key=lambda p: Path(p).relative_to(folder).parts)


def loop_side(run: Path, paths: list):
    """The reports' loop -> (labels, seconds)."""
    from torchvision.transforms import v2

    from toolkit import load_run

    model, pre, classes = load_run(run, "last")
    transform = v2.Compose([v2.Resize(pre.image_size, antialias=True), v2.CenterCrop(pre.image_size), v2.ToImage(),
                            v2.ToDtype(torch.float32, scale=True), v2.Normalize(pre.mean, pre.std)])
    labels = []
    start = time.perf_counter()
    with torch.no_grad():
        for p in paths:
            x = transform(Image.open(p).convert("RGB"))
            prob = model(x.unsqueeze(0)).softmax(dim=1)[0]
            labels.append(classes[int(prob.argmax())])
    return labels, time.perf_counter() - start


def predict_side(run: Path, folder: Path, workers: int):
    from toolkit import predict

    start = time.perf_counter()
    rows = predict(run, [folder], weights="last", num_workers=workers)
    return [r["pred"] for r in rows], time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, help="a finished run (default: train the demo config first)")
    p.add_argument("--copies", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", default="0,1", help="DataLoader workers for predict, comma-separated")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    workers = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        run = args.run or demo_run(work)
        paths = write_pngs(run, work / "pngs", args.copies)
        times = {"loop": [], **{f"predict w{w}": [] for w in workers}}
        for _ in range(args.rounds):
            ref, t = loop_side(run, paths)
            times["loop"].append(t)
            for w in workers:
                got, t = predict_side(run, work / "pngs", w)
                times[f"predict w{w}"].append(t)
                same = sum(a == b for a, b in zip(ref, got))
                if same != len(ref):
                    raise SystemExit(f"predict w{w} and the loop disagree on {len(ref) - same} of {len(ref)} labels")
    n = len(paths)
    loop = n / statistics.median(times["loop"])
    print(f"{n} PNG files ({args.copies} x the test split), {args.rounds} rounds, torch threads "
          f"{torch.get_num_threads()}; every label equal on both sides")
    print("| side | median s | images/s | / loop |\n|---|---|---|---|")
    for name, ts in times.items():
        rate = n / statistics.median(ts)
        print(f"| {name} | {statistics.median(ts):.2f} | {rate:,.0f} | {rate / loop:.2f} |")


if __name__ == "__main__":
    main()
