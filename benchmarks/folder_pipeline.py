"""Image-folder input pipeline: Pillow decode vs the torchvision decode vs a prepared folder, images/s.

    python benchmarks/folder_pipeline.py                          # 2,000 256x256 JPEGs at 112 px, 2 workers
    python benchmarks/folder_pipeline.py --images 500 --repeats 2 --keep /tmp/fp   # quicker; reuse the folder

On one generated folder of JPEGs with photo-like content (waves, discs, noise; quality 90), one
run measures, side by side, a full pass of a DataLoader (batch 64, `collate_batch`, the
engine's settings) over:
  a) `imagefolder` as it was: Pillow decode + Pillow resize/crop per image (`--workers` workers)
  b0) Pillow decode + resize/crop on the uint8 tensor (torchvision's decoders switched off)
  b) `imagefolder` now: torchvision (libjpeg-turbo) decode + tensor resize/crop
  c) `prepared`: the arrays `python -m toolkit.prepare` wrote, no workers (whole batches by
     indexing, normalised per batch)
  d) `data.decode=device`: the workers hand out JPEG bytes; each batch is decoded (one batched
     `decode_jpeg`), resized and normalised where it lands (`DeviceDecode`: nvJPEG and the GPU on
     a GPU machine, libjpeg-turbo in the main process on a CPU one)
Each pass includes starting the workers (fork). Contenders alternate over `--repeats` rounds
and the medians are compared, so drift in the machine's speed hits all of them. The one-off
costs of (c) are reported too: `prepare` (check + decode + write) and loading the arrays.
`--per-image` first times the per-image functions alone, in one thread, on 100 files each of
256x256 JPEG, 500x375 JPEG and 500x375 PNG: Pillow decode + Pillow resize, Pillow decode +
tensor resize, torchvision decode + tensor resize (ms per image, median of `--repeats`).
`--sweep-workers 2,8,14 --sweep-prefetch 2,4,8` adds a table for (b) under the engine's loader
settings (persistent workers, pinned memory and a copy to the GPU when there is one): images/s of
the second epoch, so worker start is excluded, for each number of workers and prefetch_factor.
Results: docs/benchmarks.md, "Folder pipeline".
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from toolkit.data import DATASETS, collate_batch
from toolkit.data.base import collate_for
from toolkit.data import imagefolder as imf
from toolkit.data import images
from toolkit.prepare import prepare


def natural(h: int, w: int, seed: int) -> np.ndarray:
    """(h, w, 3) uint8 with smooth gradients, edges and a little noise, like a photo's."""
    r = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([0.5 + 0.5 * np.sin(r.uniform(1, 6) * 6.28 * xx + r.uniform(1, 6) * 6.28 * yy + r.uniform(0, 6))
                    for _ in range(3)], axis=-1)
    for _ in range(6):
        cy, cx, rad = r.uniform(0, 1, 2).tolist() + [r.uniform(0.05, 0.3)]
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < rad ** 2] = r.uniform(0, 1, 3)
    img += r.normal(0, 0.04, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def make_folder(root: Path, n: int, side: int, classes: int = 10) -> None:
    """root/train/<class>/<i>.jpg (n images), and 2 images per class in val/ and test/."""
    if (root / ".complete").exists():
        return
    counts = {"train": n, "val": 2 * classes, "test": 2 * classes}
    seed = 0
    for split, total in counts.items():
        for i in range(total):
            d = root / split / f"c{i % classes}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(natural(side, side, seed)).save(d / f"{i:05d}.jpg", quality=90)
            seed += 1
    (root / ".complete").touch()


class PillowFolder(imf.ImageFolderDataset):
    """`imagefolder`'s per-sample path before the switch: Pillow decode, Pillow resize/crop."""

    def __init__(self, paths, labels, image_size):
        super().__init__(paths, labels, image_size)
        self.transform = v2.Compose([v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size),
                                     v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
                                     v2.Normalize(images.IMAGENET_MEAN, images.IMAGENET_STD)])

    def __getitem__(self, i):
        return self.transform(images.load_rgb(str(self.paths[i]))), self.labels[i]


def one_pass(ds, batch: int, workers: int, fast_decode: bool = True) -> float:
    """Images/s of one full pass, worker start included."""
    saved = images.decoders()
    images._DECODERS = saved if fast_decode else {}  # forked workers inherit the switch
    try:
        loader = DataLoader(ds, batch_size=batch, shuffle=False, num_workers=workers, collate_fn=collate_batch,
                            pin_memory=False, persistent_workers=False)
        n = 0
        t0 = time.perf_counter()
        for x, _ in loader:
            n += len(x)
        return n / (time.perf_counter() - t0)
    finally:
        images._DECODERS = saved


def per_image(base: Path, size: int, repeats: int) -> None:
    """ms per image of the three per-image pipelines, one thread, files in the page cache."""
    sets = {"256x256 JPEG": (256, 256, ".jpg"), "500x375 JPEG": (375, 500, ".jpg"), "500x375 PNG": (375, 500, ".png")}
    pil = v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size), v2.PILToTensor()])
    saved = images.decoders()
    fns = {"Pillow + Pillow resize": lambda p: pil(images.load_rgb(p)),
           "Pillow + tensor resize": lambda p: images.load_resized(p, size),
           "torchvision + tensor resize": lambda p: images.load_resized(p, size)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    print(f"\nper image, 1 thread, {size} px, ms (median of {repeats}); torchvision decoders: {bool(saved)}")
    print(f"{'files':14s} " + " ".join(f"{k:>28s}" for k in fns))
    try:
        for name, (h, w, ext) in sets.items():
            d = base / f"per_image_{h}x{w}{ext}"
            d.mkdir(parents=True, exist_ok=True)
            paths = [str(d / f"{i}{ext}") for i in range(100)]
            for i, path in enumerate(paths):
                if not Path(path).exists():
                    Image.fromarray(natural(h, w, i)).save(path, **({"quality": 90} if ext == ".jpg" else {}))
            times = {k: [] for k in fns}
            for _ in range(repeats + 1):  # the first round warms up
                for k, fn in fns.items():
                    images._DECODERS = saved if k.startswith("torchvision") else {}
                    t0 = time.perf_counter()
                    for path in paths:
                        fn(path)
                    times[k].append(1e3 * (time.perf_counter() - t0) / len(paths))
            images._DECODERS = saved
            print(f"{name:14s} " + " ".join(f"{statistics.median(v[1:]):28.3f}" for v in times.values()), flush=True)
    finally:
        images._DECODERS = saved
        torch.set_num_threads(threads)


def steady_pass(ds, batch: int, workers: int, prefetch: int, non_blocking: bool) -> float:
    """Images/s of the second epoch under the engine's settings (persistent workers, pinned
    memory with CUDA), each batch copied to the device and waited for."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, collate_fn=collate_batch,
                        pin_memory=cuda, persistent_workers=True, prefetch_factor=prefetch)
    for epoch in range(2):
        n = 0
        t0 = time.perf_counter()
        for x, y in loader:
            x = x.to(device, non_blocking=non_blocking)
            n += len(x)
        if cuda:
            torch.cuda.synchronize()
        ips = n / (time.perf_counter() - t0)
    del loader
    return ips


def device_pass(ds, batch: int, workers: int, device: torch.device) -> float:
    """Images/s of one full pass with data.decode=device: the workers hand out JPEG bytes, each
    batch is decoded, resized and normalised by DeviceDecode on `device` (worker start included)."""
    norm = ds.device_decode(device)
    loader = DataLoader(ds, batch_size=batch, shuffle=False, num_workers=workers, collate_fn=collate_for(ds),
                        pin_memory=False, persistent_workers=False)
    n = 0
    t0 = time.perf_counter()
    for x, _ in loader:
        n += len(norm(x))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--side", type=int, default=256, help="generated JPEGs are side x side")
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--keep", help="folder for the generated images and the prepared arrays (reused)")
    p.add_argument("--sweep-workers", default="", help="e.g. 2,8,14: DataLoader settings table for (b)")
    p.add_argument("--sweep-prefetch", default="2,4", help="prefetch_factor values for the table")
    p.add_argument("--skip-compare", action="store_true", help="only the settings table")
    p.add_argument("--per-image", action="store_true", help="also time the per-image functions in one thread")
    args = p.parse_args()

    print("load:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.keep or tmp)
        if args.per_image:
            per_image(base, args.image_size, args.repeats)
        root = base / f"jpeg{args.side}_{args.images}"
        t = time.perf_counter()
        make_folder(root, args.images, args.side)
        print(f"folder: {root} ({time.perf_counter() - t:.1f} s to make or find)", flush=True)

        out = base / f"prepared_{args.side}_{args.images}_{args.image_size}"
        t = time.perf_counter()
        prepare(str(root), args.image_size, str(out), workers=args.workers, force=True)
        prepare_s = time.perf_counter() - t
        t = time.perf_counter()
        prepared = DATASETS.build("prepared", root=str(out), split_seed=0, limit=None, download=False,
                                  image_size=args.image_size, train_splits=["train"])
        load_s = time.perf_counter() - t
        n_all = sum(prepared.meta["sizes"].values())

        paths, labels = imf.scan_split(root / "train", sorted(os.listdir(root / "train")), root / "train")
        y = torch.tensor(labels, dtype=torch.int64)
        old = PillowFolder(paths, y, args.image_size)
        new = imf.ImageFolderDataset(paths, y, args.image_size)
        encoded = imf.ImageFolderDataset(paths, y, args.image_size)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        contenders = {
            "a) imagefolder, Pillow decode + Pillow resize (before)": lambda: one_pass(old, args.batch, args.workers),
            "b0) Pillow decode + tensor resize": lambda: one_pass(new, args.batch, args.workers, fast_decode=False),
            "b) imagefolder now: torchvision decode + tensor resize": lambda: one_pass(new, args.batch, args.workers),
            "c) prepared (uint8 arrays, 0 workers)": lambda: one_pass(prepared.train, args.batch, 0),
            f"d) data.decode=device: JPEG bytes, decode + resize on {device.type}":
                lambda: device_pass(encoded, args.batch, args.workers, device),
        }
        if not args.skip_compare:
            for fn in contenders.values():  # warm-up: page cache, imports in the workers
                fn()
            results = {k: [] for k in contenders}
            for _ in range(args.repeats):
                for k, fn in contenders.items():
                    results[k].append(fn())
            med = {k: statistics.median(v) for k, v in results.items()}
            base_ips = med[next(iter(med))]
            print(f"\n{args.images} JPEGs {args.side}x{args.side} -> {args.image_size} px, batch {args.batch}, "
                  f"{args.workers} workers for a/b0/b, torch {torch.__version__}, {os.cpu_count()} CPUs, "
                  f"median of {args.repeats}")
            print(f"{'pipeline':58s} {'img/s':>10s} {'vs a':>8s}   runs")
            for k, v in med.items():
                runs = ", ".join(f"{r:,.0f}" for r in results[k])
                print(f"{k:58s} {v:10,.0f} {v / base_ips:7.2f}x   {runs}")
        print(f"\nprepare once: {prepare_s:.1f} s for {n_all:,} images ({n_all / prepare_s:,.0f} img/s, "
              f"{args.workers} threads, check + decode + write); loading the arrays: {load_s * 1e3:.0f} ms")
        if args.sweep_workers:
            device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
            print(f"\n(b) second epoch, persistent workers, pin_memory={torch.cuda.is_available()}, "
                  f"to {device}, img/s (median of {args.repeats})")
            prefetches = [int(v) for v in args.sweep_prefetch.split(",")]
            print(f"{'workers':>8s} " + " ".join(f"{f'prefetch {f}':>12s}" for f in prefetches)
                  + f" {'prefetch 2, non_blocking':>26s}")
            for w in [int(v) for v in args.sweep_workers.split(",")]:
                row = [statistics.median(steady_pass(new, args.batch, w, f, False) for _ in range(args.repeats))
                       for f in prefetches]
                nb = statistics.median(steady_pass(new, args.batch, w, 2, True) for _ in range(args.repeats))
                print(f"{w:8d} " + " ".join(f"{v:12,.0f}" for v in row) + f" {nb:26,.0f}", flush=True)
    print("load:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
