"""Two checks of "fast by default" (issue 21): extraction against its forward-only ceiling, and the
`auto` precision/channels_last defaults against the old fp32 ones.

    python benchmarks/fast_defaults.py extract-ceiling --json ceiling.json       # one CUDA GPU, ~1 min
    python benchmarks/fast_defaults.py auto-defaults --json auto.json            # one CUDA GPU, ~2 min
    python benchmarks/fast_defaults.py PART --device cpu --tiny --json /tmp/x.json   # the CPU smoke modes
    bash benchmarks/gpu.sh extract-ceiling auto-defaults                        # on the lent GPU machine

extract-ceiling  The real `toolkit.extract.extract` with its defaults (precision and channels_last
                 `auto`: bf16 + channels_last on a GPU with bf16) over an in-memory uint8 set of
                 synthetic 224 px images (gpu_throughput.synthetic_collection; loader `auto`: on the
                 device, streamed batch by batch), ResNet-50, batch 256; its images/s is extract's own
                 (images over the wall time of its loop: batches, copies and shard writes included).
                 Against it, the Extractor's forward alone on a batch already on the device, at the
                 precision and memory format extract resolved, timed between two syncs: the ceiling.
                 The ratio extract/forward is how close the data path comes to the model's own rate.
auto-defaults    `python -m toolkit.train --config configs/cifar10_resnet18.yaml` on `synthetic` data
                 at CIFAR's shape (5,000 uint8 32 px images: CIFAR-10 cannot be downloaded here), once
                 with the old defaults stated (train.precision=no train.channels_last=false) and once
                 with the config as it is (both `auto`). images/s is summary.json's (the steady rate
                 from the second epoch on); each run is its own process (Accelerate's precision is
                 fixed per process).

Both alternate their two contenders over --repeats and report medians and the ratio, in the
console and as JSON. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_throughput, beside this file

from gpu_throughput import reset, synthetic_collection  # noqa: E402

R18_CONFIG = str(ROOT / "configs" / "cifar10_resnet18.yaml")
SETTINGS = {"before": ["train.precision=no", "train.channels_last=false"], "after": []}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------
# extract-ceiling


def extract_once(args, source, work: Path, name: str, device: torch.device) -> Dict[str, Any]:
    """One extract() over `source` with the toolkit's defaults -> its summary plus the resolved settings."""
    import toolkit.extract as X

    run_dir = work / name
    overrides = [f"run.dir={run_dir}", "data.name=synthetic", "data.split=train", f"data.image_size={args.size}",
                 f"data.batch_size={args.batch}", f"model.name={args.model}", f"extract.shard_size={args.shard}"]
    cfg = X.load_extract_config(None, overrides)
    with mock.patch.object(X, "build_source", lambda _cfg, _pre=None: source), \
            contextlib.redirect_stdout(io.StringIO()):
        summary = X.extract(cfg)
    meta = json.loads((run_dir / "features" / "meta.json").read_text())
    shutil.rmtree(run_dir, ignore_errors=True)
    reset(device)
    return {**summary, "precision": meta["precision"], "channels_last": meta["channels_last"]}


def forward_once(args, device: torch.device, precision: str, channels_last: bool) -> float:
    """images/s of the Extractor's forward on a float batch already on the device."""
    from toolkit.config import ExtractModelConfig
    from toolkit.features import Extractor, build_model

    model, _ = build_model(ExtractModelConfig(name=args.model))
    extractor = Extractor(model).to(device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    if channels_last:
        extractor = extractor.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    with torch.inference_mode(), autocast:
        for _ in range(args.warmup):
            extractor(x)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.iters):
            extractor(x)
        sync(device)
        seconds = time.perf_counter() - t0
    del extractor, model, x
    reset(device)
    return args.batch * args.iters / seconds


def extract_ceiling(args, device: torch.device) -> Dict[str, Any]:
    source = synthetic_collection(args.images, args.size)
    warm = synthetic_collection(2 * args.batch, args.size)
    runs: Dict[str, List[float]] = {"extract": [], "forward": []}
    with tempfile.TemporaryDirectory() as tmp:
        first = extract_once(args, warm, Path(tmp), "warmup", device)  # cuDNN, allocator, first-call costs
        precision, channels_last = first["precision"], first["channels_last"]
        print(f"extract resolved precision {precision}, channels_last {channels_last} (the defaults: auto)",
              flush=True)
        for r in range(args.repeats):
            runs["extract"].append(extract_once(args, source, Path(tmp), f"run{r}", device)["images_per_s"])
            runs["forward"].append(forward_once(args, device, precision, channels_last))
            print(f"  repeat {r + 1}: extract {runs['extract'][-1]:10,.1f} img/s   forward only "
                  f"{runs['forward'][-1]:10,.1f} img/s", flush=True)
    results = {k: {"images_per_s": statistics.median(v), "runs_images_per_s": v} for k, v in runs.items()}
    results["extract"].update(precision=precision, channels_last=channels_last, images_per_run=args.images)
    ratio = results["extract"]["images_per_s"] / results["forward"]["images_per_s"]
    print(f"extract {results['extract']['images_per_s']:,.1f} img/s, forward only "
          f"{results['forward']['images_per_s']:,.1f} img/s: extract/forward {ratio:.3f}")
    return {"results": results, "ratios": {"extract/forward": ratio}}


# ------------------------------------------------------------------------------------------
# auto-defaults


def train_once(args, setting: str, work: Path, r: int) -> Dict[str, Any]:
    run_dir = work / f"{setting}_{r}"
    overrides = [f"run.dir={run_dir}", "data.name=synthetic", "data.root=null", "data.image_size=32",
                 f"data.limit={args.limit}", f"data.batch_size={args.batch}", f"data.eval_batch_size={args.limit}",
                 f"train.epochs={args.epochs}", "train.keep_last=1", "log.plots=false", "log.tensorboard=false",
                 "log.progress=none", *SETTINGS[setting]]
    if getattr(args, "tiny_model", None):
        overrides.append(f"model.name={args.tiny_model}")
    proc = subprocess.run([sys.executable, "-m", "toolkit.train", "--config", R18_CONFIG, *overrides], cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"auto-defaults: {setting}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    s = json.loads((run_dir / "summary.json").read_text())
    shutil.rmtree(run_dir, ignore_errors=True)
    return s


def auto_defaults(args, device: torch.device) -> Dict[str, Any]:
    runs: Dict[str, List[float]] = {k: [] for k in SETTINGS}
    seen: Dict[str, Dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for setting in (list(SETTINGS) if r % 2 == 0 else list(SETTINGS)[::-1]):
                s = train_once(args, setting, Path(tmp), r)
                runs[setting].append(s["images_per_s"])
                seen[setting] = {k: s[k] for k in ("precision", "precision_asked", "channels_last",
                                                    "channels_last_asked", "loader")}
                print(f"  repeat {r + 1}: {setting:6s} {s['images_per_s']:10,.1f} img/s   precision {s['precision']}, "
                      f"channels_last {s['channels_last']}", flush=True)
    results = {k: {"images_per_s": statistics.median(v), "runs_images_per_s": v, **seen[k]} for k, v in runs.items()}
    ratio = results["after"]["images_per_s"] / results["before"]["images_per_s"]
    print(f"before (no, contiguous) {results['before']['images_per_s']:,.1f} img/s, after (auto: "
          f"{results['after']['precision']}, channels_last {results['after']['channels_last']}) "
          f"{results['after']['images_per_s']:,.1f} img/s: after/before {ratio:.3f}")
    return {"results": results, "ratios": {"after/before": ratio}}


# ------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("part", choices=("extract-ceiling", "auto-defaults"))
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny sizes on the CPU: the smoke mode")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="write the results here")
    g = p.add_argument_group("extract-ceiling")
    g.add_argument("--model", default="resnet50")
    g.add_argument("--size", type=int, default=224)
    g.add_argument("--batch", type=int, default=None, help="extract-ceiling: 256; auto-defaults: the config's 128")
    g.add_argument("--images", type=int, default=24576, help="images per timed extraction")
    g.add_argument("--shard", type=int, default=1024, help="extract.shard_size")
    g.add_argument("--iters", type=int, default=30, help="timed forward passes")
    g.add_argument("--warmup", type=int, default=5, help="untimed forward passes first")
    g = p.add_argument_group("auto-defaults")
    g.add_argument("--limit", type=int, default=5000, help="training images (synthetic has at most 5,000)")
    g.add_argument("--epochs", type=int, default=4, help="the first is left out of the rate")
    args = p.parse_args(argv)
    if args.batch is None:
        args.batch = 256 if args.part == "extract-ceiling" else 128
    if args.tiny:
        args.model, args.size, args.batch, args.images, args.shard, args.iters, args.warmup = (
            "lenet", 32, 16, 256, 64, 3, 1)
        args.limit, args.epochs, args.repeats = 64, 2, 1
        args.tiny_model = "lenet"  # the config's ResNet-18 costs a minute of CPU for a smoke test
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("fast_defaults: --device cuda, but no CUDA GPU is visible; use --device cpu --tiny", file=sys.stderr)
        return 2
    if device.type == "cpu" and torch.cuda.is_available():
        print("fast_defaults: --device cpu with a GPU visible: hide it (CUDA_VISIBLE_DEVICES=) so that `auto` "
              "resolves for the CPU", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name() if device.type == "cuda" else (platform.processor() or "cpu")
    print(f"{args.part}: device {name}, torch {torch.__version__}, {args.repeats} repeat(s)", flush=True)
    out = extract_ceiling(args, device) if args.part == "extract-ceiling" else auto_defaults(args, device)
    if args.json:
        res = {"part": args.part, "device": {"type": device.type, "name": name, "torch": torch.__version__},
               "tiny": args.tiny, "repeats": args.repeats,
               "settings": {k: v for k, v in vars(args).items() if k != "json"}, **out}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
