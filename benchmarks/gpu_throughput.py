"""GPU throughput of the engine and the extractor: fp32 eager vs bf16 + channels_last + compile, side by side.

    python benchmarks/gpu_throughput.py --out gpu_throughput.json     # one CUDA GPU (H100: ~5-6 min)
    python benchmarks/gpu_throughput.py --smoke --out /tmp/smoke.json # tiny sizes on the CPU, < 2 min
    bash benchmarks/gpu.sh extract r50-train r18-train                # the lent GPU machine

Three workloads, each under two settings, in one process (state reset between configs):

  resnet18_cifar train  32 px   the real `toolkit.engine.fit` on `synthetic`, batch 512
  resnet50 train        224 px  the real `toolkit.engine.fit` on `synthetic`, batch 256
  resnet50 extract      224 px  the real `toolkit.extract.extract` (its DataLoader, inner loop under
                                inference_mode, shard writes with checksums, finalize), batch 256

  fp32     train.precision=no, channels_last=false, compile=false, and TF32 OFF for both cuDNN
           convolutions and cuBLAS matmuls (torch.backends.cudnn.allow_tf32 = False,
           torch.backends.cuda.matmul.allow_tf32 = False): true IEEE fp32.
  fast     train.precision=bf16 train.channels_last=true train.compile=true, TF32 flags back at
           PyTorch's defaults (cuDNN on, matmul off; irrelevant under bf16 autocast). Extraction
           has no compile key: its fast setting is extract.precision=bf16 extract.channels_last=true.

Training images/s: `fit` with log.every_n_steps=1 writes one "train" row per optimizer step to
RUN/metrics.jsonl; its images_per_s is that step's batch over the wall time since the previous
step (the log's reduce waits for the device at every logged step, so each interval holds one
step's GPU work). The first epoch (compile, cuDNN warm-up) is dropped; the table shows the
median of the remaining steps (harmonic mean and spread in the JSON). Validation, checkpoints
and the test pass fall between steps and are not counted, as in the engine's own figure.
train.deterministic=false (no deterministic kernels), data.eval_batch_size = the val split (one
eval shape, so compile adds one eval graph, not two). The synthetic dataset holds at most 5,000
training images, so length comes from epochs. Extraction images/s: extract's own summary (images
over the wall time of its loop, DataLoader start and shard writes included), median of
--extract-repeats runs after one warm-up run; the synthetic split is replaced by a larger one of
the same kind (uint8 in memory, normalised per image by the dataset, SplitAsCollection) so a run
lasts seconds. An extra row times the extractor's forward alone on a batch already on the GPU
(CUDA events): the ceiling the data path is measured against.

FLOPs per image: torch.utils.flop_counter.FlopCounterMode on the meta device (convolutions and
matmuls): forward + backward of the loss for training, the Extractor's forward for extraction.
MFU = FLOPs/image x images/s / peak; peak = H100 SXM dense bf16, 989.4e12 FLOP/s, and the bf16
rate this GPU reaches on an 8192^3 matmul timed with CUDA events.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import io
import json
import math
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional
from unittest import mock

import torch
from torch.utils.flop_counter import FlopCounterMode

from toolkit.config import DataConfig, load_config

H100_SXM_BF16_DENSE = 989.4e12  # FLOP/s, NVIDIA H100 SXM5 datasheet, dense (no sparsity)
REFERENCES = {
    "nvidia_a100_resnet50_amp_train_images_per_s": 2470,  # NVIDIA's published ResNet-50 AMP training, 1x A100
    "target_h100_train_images_per_s": 3000,
    "target_h100_extract_images_per_s": 10000,
}
HAS_LOADER = "loader" in {f.name for f in dataclasses.fields(DataConfig)}
SETTINGS = ("fp32", "fast")
# Rough H100 seconds per config (compile included), used only with --budget-s to skip what would not fit.
EST_S = {("resnet50_train", "fp32"): 50, ("resnet50_train", "fast"): 200, ("resnet50_extract", "fp32"): 45,
         ("resnet50_extract", "fast"): 25, ("resnet18_train", "fp32"): 25, ("resnet18_train", "fast"): 100}
T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


# ------------------------------------------------------------------------------------------
# environment


def set_tf32(setting: str) -> Dict[str, bool]:
    """fp32: TF32 off everywhere; fast: PyTorch's defaults (cuDNN TF32 on, matmul TF32 off)."""
    torch.backends.cudnn.allow_tf32 = setting != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = False
    return {"cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
            "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32)}


def reset(device: torch.device) -> None:
    """Between configs: a fresh Accelerate state (fit makes an Accelerator with another precision
    and compile backend), no compiled graphs of earlier models (dynamo caches per code object)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, iters: int) -> float:
    """FLOP/s of an n x n x n matmul: CUDA events on a GPU, perf_counter on the CPU."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    c = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b, out=c)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(iters):
            torch.mm(a, b, out=c)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        t = time.perf_counter()
        for _ in range(iters):
            torch.mm(a, b, out=c)
        seconds = time.perf_counter() - t
    return 2 * n ** 3 * iters / seconds


# ------------------------------------------------------------------------------------------
# FLOPs


def flops_per_image(model_name: str, size: int, train: bool) -> float:
    """Counted on the meta device (shapes only): convolutions, matmuls, and their backward."""
    import torch.nn.functional as F

    from toolkit.features import Extractor
    from toolkit.models import MODELS

    batch = 2
    with torch.device("meta"):
        model = MODELS.build(model_name, num_classes=10 if train else 1000)
        x = torch.randn(batch, 3, size, size)
        y = torch.randint(0, 10, (batch,))
    counter = FlopCounterMode(display=False)
    if train:
        model.train()
        with counter:
            F.cross_entropy(model(x), y).backward()
    else:
        extractor = Extractor(model.eval())
        with counter, torch.inference_mode():
            extractor(x)
    return counter.get_total_flops() / batch


# ------------------------------------------------------------------------------------------
# training through fit


def steady_rates(run_dir: Path, drop_epochs: int) -> List[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("kind") == "train"]
    kept = [r["images_per_s"] for r in steps if r["epoch"] >= drop_epochs]
    return kept or [r["images_per_s"] for r in steps[1:]]


def train_config(bench: Dict[str, Any], setting: str, args, device: torch.device, work: Path) -> Dict[str, Any]:
    from toolkit.engine import fit

    run_dir = work / f"{bench['key']}_{setting}"
    fast = setting == "fast"
    compile_ = fast and device.type == "cuda"  # on the CPU (smoke) compile is skipped
    limit = bench["limit"]
    overrides = [f"run.dir={run_dir}", "run.name=gpu_throughput", "data.name=synthetic",
                 f"data.image_size={bench['size']}", f"data.limit={limit}", f"data.batch_size={bench['batch']}",
                 f"data.eval_batch_size={min(limit, 1000)}", f"data.num_workers={args.workers}",
                 f"model.name={bench['model']}", f"train.epochs={bench['epochs']}", "train.deterministic=false",
                 "train.keep_last=1", f"train.channels_last={str(fast).lower()}", f"train.compile={str(compile_).lower()}",
                 "sched.name=constant", "log.every_n_steps=1", "log.plots=false", "log.tensorboard=false",
                 "log.progress=none"]
    overrides.append(f"train.precision={'bf16' if fast else 'no'}")  # stated: the default, auto, is bf16 on a GPU
    if HAS_LOADER and args.loader:
        overrides.append(f"data.loader={args.loader}")
    cfg = load_config(None, overrides)
    assert cfg.train.precision == ("bf16" if fast else "no"), cfg.train.precision
    tf32 = set_tf32(setting)
    t = time.perf_counter()
    summary = fit(cfg)
    sync(device)
    wall = time.perf_counter() - t
    rates = steady_rates(run_dir, drop_epochs=1)
    out = {"images_per_s": statistics.median(rates),
           "harmonic_mean_images_per_s": len(rates) / sum(1 / r for r in rates),
           "min_images_per_s": min(rates), "max_images_per_s": max(rates), "steps_measured": len(rates),
           "fit_images_per_s_incl_first_epoch": summary["images_per_s"], "fit_wall_s": wall,
           "loader": summary.get("loader", "dataloader"), "tf32": tf32, "compile": compile_,
           "precision": cfg.train.precision, "channels_last": cfg.train.channels_last,
           "batch": bench["batch"], "image_size": bench["size"], "epochs": bench["epochs"],
           "train_images_per_epoch": min(limit, 5000), "overrides": overrides}
    if fast and not compile_:
        out["note"] = "compile skipped on the CPU"
    return out


# ------------------------------------------------------------------------------------------
# extraction through extract


def synthetic_collection(n: int, size: int, unique: int = 1024):
    """`synthetic`'s train split, larger: uint8 images (the first `unique` random, then repeated;
    the speed does not depend on the pixels) with the synthetic dataset's mean/std, wrapped as
    extract wraps a training dataset."""
    from toolkit.data.base import TensorImageDataset
    from toolkit.data.collection import SplitAsCollection
    from toolkit.data.synthetic import NUM_CLASSES

    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 256, (min(unique, n), 3, size, size), dtype=torch.uint8, generator=g)
    images = base.repeat(math.ceil(n / len(base)), 1, 1, 1)[:n].contiguous()
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    mean, std = torch.full((3,), 0.5), torch.full((3,), 0.2887)
    ds = TensorImageDataset(images, labels, mean=mean, std=std)
    preprocess = {"kind": "dataset", "dataset": "synthetic", "split": "train", "image_size": size,
                  "mean": mean.tolist(), "std": std.tolist()}
    return SplitAsCollection(ds, "synthetic", "train", [str(i) for i in range(NUM_CLASSES)], preprocess)


def extract_config(bench: Dict[str, Any], setting: str, args, device: torch.device, work: Path,
                   source, warm_source) -> Dict[str, Any]:
    import toolkit.extract as X

    fast = setting == "fast"
    tf32 = set_tf32(setting)

    def run(name: str, src) -> Dict[str, Any]:
        overrides = [f"run.dir={work / name}", "data.name=synthetic", "data.split=train",
                     f"data.image_size={bench['size']}", f"data.batch_size={bench['batch']}",
                     f"data.num_workers={args.workers}", f"model.name={bench['model']}",
                     f"extract.channels_last={str(fast).lower()}", f"extract.precision={'bf16' if fast else 'no'}"]
        cfg = X.load_extract_config(None, overrides)
        assert cfg.extract.precision == ("bf16" if fast else "no"), cfg.extract.precision
        quiet = contextlib.nullcontext() if args.verbose else contextlib.redirect_stdout(io.StringIO())
        with mock.patch.object(X, "build_source", lambda _cfg, _size=None: src), quiet:
            summary = X.extract(cfg)
        shutil.rmtree(work / name, ignore_errors=True)
        reset(device)
        return summary

    run(f"extract_{setting}_warmup", warm_source)
    runs = [run(f"extract_{setting}_{i}", source) for i in range(args.extract_repeats)]
    rates = [r["images_per_s"] for r in runs]
    out = {"images_per_s": statistics.median(rates), "runs_images_per_s": rates,
           "images_per_run": len(source), "wall_s_per_run": [r["wall_s"] for r in runs], "tf32": tf32,
           "precision": "bf16" if fast else "no", "channels_last": fast, "compile": False,
           "batch": bench["batch"], "image_size": bench["size"], "num_workers": args.workers}
    if fast:
        out["note"] = "extract has no compile option: bf16 + channels_last only"
    return out


def forward_ceiling(bench: Dict[str, Any], setting: str, device: torch.device, iters: int) -> Dict[str, Any]:
    """The Extractor's forward on a batch already on the device: no DataLoader, no copies, no writes."""
    from toolkit.config import ExtractModelConfig
    from toolkit.features import Extractor, build_model

    fast = setting == "fast"
    tf32 = set_tf32(setting)
    model, _ = build_model(ExtractModelConfig(name=bench["model"]))
    extractor = Extractor(model).to(device)
    x = torch.randn(bench["batch"], 3, bench["size"], bench["size"], device=device)
    if fast:
        extractor = extractor.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if fast else contextlib.nullcontext()
    with torch.inference_mode(), autocast:
        for _ in range(3):
            extractor(x)
        sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                extractor(x)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t = time.perf_counter()
            for _ in range(iters):
                extractor(x)
            seconds = time.perf_counter() - t
    del extractor, model, x
    reset(device)
    return {"images_per_s": bench["batch"] * iters / seconds, "iters": iters, "tf32": tf32,
            "precision": "bf16" if fast else "no", "channels_last": fast, "compile": False,
            "batch": bench["batch"], "image_size": bench["size"]}


# ------------------------------------------------------------------------------------------
# report


def fmt_rate(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def table(res: Dict[str, Any]) -> str:
    peak, measured = res["peak"]["spec_bf16_dense_flops"], res["peak"]["measured_bf16_matmul_flops"]
    head = (f"{'workload':34s} {'setting':26s} {'img/s':>9s} {'fast/fp32':>9s} {'GFLOP/img':>9s} "
            f"{'TFLOP/s':>8s} {'MFU spec':>8s} {'MFU meas':>8s}  note")
    lines = [head, "-" * len(head)]
    label = {"fp32": "fp32 eager (TF32 off)", "fast": "bf16+channels_last+compile"}
    for row in res["rows"]:
        r = row.get("result")
        setting = label[row["setting"]]
        if row["kind"] in ("extract", "forward") and row["setting"] == "fast":
            setting = "bf16+channels_last"
        if r is None:
            lines.append(f"{row['title']:34s} {setting:26s} {'-':>9s}  {row.get('skipped') or row.get('error')}")
            continue
        ratio = row.get("ratio")
        tflops = row["flops_per_image"] * r["images_per_s"]
        mfu_spec = f"{tflops / peak:.1%}" if peak else "n/a"
        lines.append(f"{row['title']:34s} {setting:26s} {fmt_rate(r['images_per_s']):>9s} "
                     f"{'' if ratio is None else f'{ratio:.2f}x':>9s} {row['flops_per_image'] / 1e9:9.2f} "
                     f"{tflops / 1e12:8.3g} {mfu_spec:>8s} {tflops / measured:8.1%}  {r.get('note', '')}")
    return "\n".join(lines)


def verdicts(res: Dict[str, Any]) -> List[str]:
    def get(key, setting):
        for row in res["rows"]:
            if row["key"] == key and row["setting"] == setting and row.get("result"):
                return row["result"]["images_per_s"]
        return None

    on_gpu = res["device"]["type"] == "cuda"
    ref = REFERENCES
    out = [f"reference: NVIDIA's published ResNet-50 AMP training on one A100: ~{ref['nvidia_a100_resnet50_amp_train_images_per_s']:,} images/s",
           f"peak used for 'MFU spec': 989.4 TFLOP/s (H100 SXM dense bf16{'' if on_gpu else '; not applied on the CPU'}); "
           f"'MFU meas': measured bf16 {res['peak']['matmul_n']}^3 matmul {res['peak']['measured_bf16_matmul_flops'] / 1e12:.1f} TFLOP/s "
           f"(fp32 matmul, TF32 off: {res['peak']['measured_fp32_matmul_flops'] / 1e12:.1f} TFLOP/s)"]
    for key, setting, target, what in (("resnet50_train", "fast", ref["target_h100_train_images_per_s"], "ResNet-50 training"),
                                       ("resnet50_extract", "fast", ref["target_h100_extract_images_per_s"], "ResNet-50 extraction")):
        got = get(key, setting)
        status = ("n/a (not a GPU run)" if not on_gpu else "not measured" if got is None
                  else "MET" if got >= target else "MISSED")
        out.append(f"target on one H100: {what} >= {target:,} images/s: {fmt_rate(got)} -> {status}")
    return out


# ------------------------------------------------------------------------------------------


def benches(args, smoke: bool) -> List[Dict[str, Any]]:
    if smoke:
        return [
            # bf16 backward on a CPU without bf16 units takes seconds a step: one step an epoch
            {"key": "resnet50_train", "kind": "train", "title": "resnet50 train 16px (smoke)", "model": "resnet50",
             "size": 16, "batch": 2, "epochs": 2, "limit": 2},
            {"key": "resnet50_extract", "kind": "extract", "title": "resnet50 extract 16px (smoke)",
             "model": "resnet50", "size": 16, "batch": 4, "images": 16},
            {"key": "resnet18_train", "kind": "train", "title": "resnet18_cifar train 8px (smoke)",
             "model": "resnet18_cifar", "size": 8, "batch": 4, "epochs": 2, "limit": 4},
        ]
    return [
        {"key": "resnet50_train", "kind": "train", "title": f"resnet50 train {args.r50_size}px", "model": "resnet50",
         "size": args.r50_size, "batch": args.r50_batch, "epochs": args.r50_epochs, "limit": args.limit},
        {"key": "resnet50_extract", "kind": "extract", "title": f"resnet50 extract {args.r50_size}px",
         "model": "resnet50", "size": args.r50_size, "batch": args.extract_batch, "images": args.extract_images},
        {"key": "resnet18_train", "kind": "train", "title": "resnet18_cifar train 32px", "model": "resnet18_cifar",
         "size": 32, "batch": args.r18_batch, "epochs": args.r18_epochs, "limit": args.limit},
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="write the results here as JSON (rewritten after every config)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, to check the script end to end")
    p.add_argument("--only", default="resnet50_train,resnet50_extract,resnet18_train",
                   help="comma-separated workloads to run")
    p.add_argument("--r18-batch", type=int, default=512)
    p.add_argument("--r18-epochs", type=int, default=12)
    p.add_argument("--r50-batch", type=int, default=256)
    p.add_argument("--r50-epochs", type=int, default=4)
    p.add_argument("--r50-size", type=int, default=224)
    p.add_argument("--limit", type=int, default=5000, help="data.limit (synthetic has at most 5,000 training images)")
    p.add_argument("--extract-batch", type=int, default=256)
    p.add_argument("--extract-images", type=int, default=24576, help="images per timed extraction run")
    p.add_argument("--extract-repeats", type=int, default=2)
    p.add_argument("--workers", type=int, default=None, help="data.num_workers (default: 8 on a GPU, 0 on the CPU)")
    if HAS_LOADER:
        p.add_argument("--loader", choices=("auto", "device", "dataloader"), default=None,
                       help="data.loader for training (default: the config's default)")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="set torch.backends.cudnn.benchmark for extraction (training runs use "
                        "train.deterministic=false, with which the engine turns it on itself)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="skip a config that would likely end after this many seconds (rough H100 estimates)")
    p.add_argument("--workdir", help="run directories go here (default: a temporary directory, deleted)")
    p.add_argument("--verbose", action="store_true", help="show extract's own progress lines")
    args = p.parse_args()
    if not HAS_LOADER:
        args.loader = None

    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    if args.smoke and torch.cuda.is_available():
        sys.exit("--smoke runs on the CPU; hide the GPU (CUDA_VISIBLE_DEVICES=) to smoke-test")
    if not cuda and not args.smoke:
        sys.exit("no CUDA GPU: run with --smoke for the CPU check")
    if args.workers is None:
        args.workers = 8 if cuda else 0
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if args.smoke:
        args.extract_repeats = 2

    dev = {"type": device.type, "name": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
           "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "cudnn_benchmark_extract": args.cudnn_benchmark, "threads": torch.get_num_threads()}
    say(f"device {dev['name']} ({device.type}), torch {dev['torch']}, CUDA {dev['cuda']}, "
        f"cudnn.benchmark for extraction {dev['cudnn_benchmark_extract']}, workers {args.workers}"
        + (f", data.loader {args.loader or 'default'}" if HAS_LOADER else ", (no data.loader key)"))
    if cuda and "H100" not in dev["name"]:
        say(f"warning: MFU 'spec' uses the H100 SXM peak; this GPU is {dev['name']}")

    n, iters = (8192, 20) if cuda else (256, 3)
    set_tf32("fp32")
    fp32_rate = matmul_rate(device, torch.float32, n, max(iters // 2, 2))
    set_tf32("fast")
    bf16_rate = matmul_rate(device, torch.bfloat16, n, iters)
    say(f"matmul {n}^3: bf16 {bf16_rate / 1e12:.1f} TFLOP/s, fp32 (TF32 off) {fp32_rate / 1e12:.1f} TFLOP/s")
    res: Dict[str, Any] = {
        "device": dev, "smoke": args.smoke, "args": vars(args), "references": REFERENCES,
        "peak": {"spec_bf16_dense_flops": H100_SXM_BF16_DENSE if cuda else None,
                 "spec_note": "H100 SXM dense bf16 (989.4 TFLOP/s); MFU against it only on a GPU",
                 "measured_bf16_matmul_flops": bf16_rate, "measured_fp32_matmul_flops": fp32_rate,
                 "matmul_n": n},
        "settings": {"fp32": "precision=no, channels_last=false, compile=false, cudnn+matmul TF32 off",
                     "fast": "precision=bf16, channels_last=true, compile=true (training; skipped on the CPU), "
                             "TF32 at PyTorch defaults; extraction: bf16 + channels_last (extract has no compile)"},
        "rows": [],
    }
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out_path.write_text(json.dumps(res, indent=1, default=str) + "\n")

    save()
    wanted = set(args.only.split(","))
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gpu_throughput_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        for bench in benches(args, args.smoke):
            if bench["key"] not in wanted:
                continue
            flops = flops_per_image(bench["model"], bench["size"], train=bench["kind"] == "train")
            source = warm = None
            if bench["kind"] == "extract":
                source = synthetic_collection(bench["images"], bench["size"])
                warm = synthetic_collection((1 if args.smoke else 4) * bench["batch"], bench["size"])
            by_setting = {}
            for setting in SETTINGS:
                row = {"key": bench["key"], "kind": bench["kind"], "title": bench["title"], "setting": setting,
                       "flops_per_image": flops, "result": None}
                res["rows"].append(row)
                elapsed = time.perf_counter() - T0
                if args.budget_s is not None and not args.smoke and elapsed + EST_S[(bench["key"], setting)] > args.budget_s:
                    row["skipped"] = f"skipped: {elapsed:.0f} s gone of --budget-s {args.budget_s:.0f}"
                    say(f"{bench['title']} {setting}: {row['skipped']}")
                    save()
                    continue
                say(f"{bench['title']} {setting}: running")
                reset(device)
                torch.backends.cudnn.benchmark = args.cudnn_benchmark  # fit sets it again for training
                try:
                    if bench["kind"] == "train":
                        row["result"] = train_config(bench, setting, args, device, work)
                    else:
                        row["result"] = extract_config(bench, setting, args, device, work, source, warm)
                    row["result"]["cudnn_benchmark"] = torch.backends.cudnn.benchmark  # as the run left it
                    if device.type == "cuda":
                        row["result"]["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
                    by_setting[setting] = row
                    r = row["result"]
                    mem = f", peak {r['peak_memory_gib']:.1f} GiB" if "peak_memory_gib" in r else ""
                    say(f"{bench['title']} {setting}: {fmt_rate(r['images_per_s'])} img/s "
                        f"({flops * r['images_per_s'] / 1e12:.3g} TFLOP/s{mem})")
                except Exception as e:  # noqa: BLE001 (one failing config must not lose the others)
                    traceback.print_exc()
                    row["error"] = f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    say(f"{bench['title']} {setting}: {row['error']}")
                shutil.rmtree(work / f"{bench['key']}_{setting}", ignore_errors=True)
                reset(device)
                save()
            if "fp32" in by_setting and "fast" in by_setting:
                by_setting["fast"]["ratio"] = (by_setting["fast"]["result"]["images_per_s"]
                                               / by_setting["fp32"]["result"]["images_per_s"])
            if bench["kind"] == "extract":
                del source, warm
                gc.collect()
                for setting in SETTINGS:  # the ceiling the extract path is measured against
                    row = {"key": bench["key"] + "_forward_only", "kind": "forward", "setting": setting,
                           "title": "  resnet50 forward only (ceiling)", "flops_per_image": flops, "result": None}
                    res["rows"].append(row)
                    try:
                        row["result"] = forward_ceiling(bench, setting, device, iters=20 if cuda else 2)
                        row["result"]["note"] = "batch on device, no loader/writes"
                    except Exception as e:  # noqa: BLE001
                        traceback.print_exc()
                        row["error"] = f"error: {type(e).__name__}: {e}"
                    save()
                rows = [r for r in res["rows"] if r["key"] == bench["key"] + "_forward_only" and r["result"]]
                if len(rows) == 2:
                    rows[1]["ratio"] = rows[1]["result"]["images_per_s"] / rows[0]["result"]["images_per_s"]
            save()
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    order = {"resnet18_train": 0, "resnet50_train": 1, "resnet50_extract": 2, "resnet50_extract_forward_only": 3}
    res["rows"].sort(key=lambda r: (order.get(r["key"], 9), SETTINGS.index(r["setting"])))
    res["table"] = table(res)
    res["verdicts"] = verdicts(res)
    res["wall_s"] = time.perf_counter() - T0
    save()
    print()
    print(res["table"])
    print()
    print("\n".join(res["verdicts"]))
    print(f"images/s: training = median per-step rate after the first epoch (the engine's metrics.jsonl); "
          f"extraction = median of {args.extract_repeats} extract() runs after a warm-up run; "
          f"forward only = the Extractor on a device-resident batch. JSON: {out_path}")

if __name__ == "__main__":
    main()
