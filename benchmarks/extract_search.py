"""Feature extraction and exact search, each against the reports' approach, side by side in one run.

    python benchmarks/extract_search.py                     # both parts, CPU
    python benchmarks/extract_search.py --part search --gallery 4096 --dim 2048 --queries 32
    python benchmarks/extract_search.py --part extract --images 96 --model resnet50

Extraction: the reports' loop (one image at a time: PIL open, transform, `model(x[None])`, no
batching, no inference mode) against `toolkit.extract.extract` (batched, inference mode, the
images decoded in DataLoader workers, written to shards) on the same model (random weights:
the speed does not depend on them) and the same JPEG files. Alternating repeats; medians.

Search: top-k of Q queries in a gallery of G x D L2-normalised features, three ways, each in a
fresh subprocess so its peak memory (VmHWM, reset once the data is built, minus the RSS then)
is its own: NumPy broadcasting as in the reports (`norm(q[:, None] - g[None], axis=2)`: a Q x G x D
temporary), the toolkit's chunked matrix product with a running top-k, and a FAISS flat
inner-product index (when faiss-cpu is installed). All three must return the same neighbours.
Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def reset_peak() -> None:
    """Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------
# search, one method per subprocess


def _search_child(method: str, q: int, g: int, d: int, k: int, chunk: int) -> dict:
    rng = np.random.default_rng(0)
    gal = rng.standard_normal((g, d), dtype=np.float32)
    gal /= np.linalg.norm(gal, axis=1, keepdims=True)
    qry = gal[rng.choice(g, q, replace=False)] + 0.01 * rng.standard_normal((q, d), dtype=np.float32)
    qry /= np.linalg.norm(qry, axis=1, keepdims=True)
    import torch

    torch.set_num_threads(torch.get_num_threads())
    if method == "faiss":
        import faiss  # noqa: F401  (import cost outside the timing)
    base = rss_mib()
    reset_peak()  # building the data had its own temporaries
    t0 = time.perf_counter()
    if method == "numpy":  # the reports: every pair's difference vector at once
        dist = np.linalg.norm(qry[:, None, :] - gal[None, :, :], axis=2)  # (Q, G) via a (Q, G, D) temporary
        rows = np.argsort(dist, axis=1, kind="stable")[:, :k]
    elif method == "toolkit":
        from toolkit.retrieve import chunks, topk_search

        gt = torch.from_numpy(gal)
        _, idx = topk_search(torch.from_numpy(qry), chunks(gt, chunk), k)
        rows = idx.numpy()
    else:
        from toolkit.retrieve import faiss_topk

        _, idx = faiss_topk(torch.from_numpy(qry), torch.from_numpy(gal), k)
        rows = idx.numpy()
    wall = time.perf_counter() - t0
    return {"method": method, "wall_s": wall, "peak_extra_mib": max(0.0, peak_mib() - base),
            "rows": rows.tolist()}


def bench_search(q: int, g: int, d: int, k: int, chunk: int, methods) -> list:
    out = []
    for m in methods:
        cmd = [sys.executable, __file__, "--child", m, "--queries", str(q), "--gallery", str(g), "--dim", str(d),
               "--topk", str(k), "--chunk", str(chunk)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{m}: failed ({proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode})")
            continue
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    ref = out[0]["rows"]
    for r in out:
        r["same_neighbours_as_" + out[0]["method"]] = r.pop("rows") == ref
    return out


# ------------------------------------------------------------------------------------------
# extraction


def make_images(folder: Path, n: int, size=(500, 375)) -> list:
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = folder / f"c{i % 5}" / f"{i:05d}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(p, quality=90)
        paths.append(p)
    return paths


def per_image_loop(paths, model_name: str) -> float:
    """The reports' loop: one image at a time, features to NumPy."""
    import torch
    import torchvision
    from PIL import Image
    from torchvision import transforms

    torch.manual_seed(0)
    model = torchvision.models.get_model(model_name, weights=None)
    model.fc = torch.nn.Identity()
    model.eval()
    tf = transforms.Compose([transforms.Resize(224), transforms.CenterCrop(224), transforms.ToTensor(),
                             transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    t0 = time.perf_counter()
    feats = []
    with torch.no_grad():
        for p in paths:
            x = tf(Image.open(p).convert("RGB")).unsqueeze(0)
            f = model(x).numpy()[0]
            feats.append(f / np.linalg.norm(f))
    return len(paths) / (time.perf_counter() - t0)


def toolkit_extract(root: Path, out: Path, model_name: str, batch: int, workers: int) -> float:
    from toolkit.config import load_extract_config
    from toolkit.extract import extract

    cfg = load_extract_config(None, [f"data.root={root}", f"model.name={model_name}", f"run.dir={out}",
                                     f"data.batch_size={batch}", f"data.num_workers={workers}",
                                     "extract.shard_size=1024"])
    s = extract(cfg)
    return s["images_per_s"]


def bench_extract(n: int, model_name: str, batch: int, workers: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_images(Path(tmp) / "images", n)
        loop, tk = [], []
        for r in range(repeats):
            loop.append(per_image_loop(paths, model_name))
            tk.append(toolkit_extract(Path(tmp) / "images", Path(tmp) / f"run{r}", model_name, batch, workers))
    return {"model": model_name, "images": n, "batch": batch, "workers": workers,
            "per_image_loop_img_s": statistics.median(loop), "toolkit_img_s": statistics.median(tk),
            "ratio": statistics.median(tk) / statistics.median(loop), "loop_runs": loop, "toolkit_runs": tk}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("all", "extract", "search"), default="all")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--queries", type=int, default=32)
    ap.add_argument("--gallery", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--topk", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--large-gallery", type=int, default=200_000, help="toolkit and FAISS only; 0 skips")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_search_child(args.child, args.queries, args.gallery, args.dim, args.topk, args.chunk)))
        return
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.part in ("all", "search"):
        try:
            import faiss  # noqa: F401
            extra = ["faiss"]
        except ImportError:
            extra = []
        rows = bench_search(args.queries, args.gallery, args.dim, args.topk, args.chunk, ["numpy", "toolkit", *extra])
        print(f"\nsearch: {args.queries} queries, gallery {args.gallery} x {args.dim}, top-{args.topk}")
        for r in rows:
            print(json.dumps(r))
        if args.large_gallery:
            big = bench_search(args.queries, args.large_gallery, args.dim, args.topk, args.chunk * 8,
                               ["toolkit", *extra])
            print(f"\nsearch: {args.queries} queries, gallery {args.large_gallery} x {args.dim} "
                  f"({args.large_gallery * args.dim * 4 / 2**30:.1f} GiB; broadcasting would need "
                  f"{args.queries * args.large_gallery * args.dim * 4 / 2**30:.0f} GiB)")
            for r in big:
                print(json.dumps(r))
    if args.part in ("all", "extract"):
        r = bench_extract(args.images, args.model, args.batch, args.workers, args.repeats)
        print(f"\nextract: {json.dumps(r)}")


if __name__ == "__main__":
    main()
