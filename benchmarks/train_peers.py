"""Training images/s: a plain PyTorch loop vs Lightning Fabric vs the toolkit, side by side in one process.

    python benchmarks/train_peers.py --json train_peers.json              # one CUDA GPU: ResNet-50, 224 px, batch 256
    python benchmarks/train_peers.py --device cpu --tiny --json /tmp/t.json   # the CPU smoke mode (seconds)
    bash benchmarks/gpu.sh train-peers                                   # on the lent GPU machine

Same model and init (ResNet-50, seed 0), same SGD (lr 0.01, momentum 0.9, weight decay 5e-4),
same batches, bf16 autocast and channels_last for all three, no compile. The data is on the
device before timing starts (K distinct uint8 batches, cycled; each step normalises its batch
there, as the toolkit's device-resident loader does), so what differs is only the loop:

  plain    the loop one writes by hand: autocast, forward, loss, backward, step, zero_grad
  fabric   lightning.fabric.Fabric(precision="bf16-mixed"): setup(model, optimizer), fabric.backward
  toolkit  toolkit.engine.train_epoch behind a real Accelerator, as `fit` runs it (BatchPrep with
           normalisation and channels_last, the non-finite check, running sums, a log every 20 steps)

Each timed run is W warm-up steps (cuDNN autotuning: torch.backends.cudnn.benchmark on, as the
engine sets it when train.deterministic is false) and then S steps between two device syncs.
Runs alternate (plain, fabric, toolkit, then rotated) so drift in the machine hits all three; the
table shows medians and the ratios to plain. Lightning is optional here (it is installed on the
lent GPU machines): without it the Fabric row says so and the others still run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from toolkit.data.base import Normalize
from toolkit.models import MODELS

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CONTENDERS = ("plain", "fabric", "toolkit")


def device_batches(k: int, batch: int, size: int, classes: int, device: torch.device) -> List[tuple]:
    """K (x uint8 (B, 3, S, S), y (B,)) batches already on the device."""
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g).to(device),
             torch.randint(0, classes, (batch,), generator=g).to(device)) for _ in range(k)]


def build(model_name: str, classes: int, device: torch.device, channels_last: bool):
    torch.manual_seed(0)
    model = MODELS.build(model_name, num_classes=classes).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    return model, opt


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def cycle(batches: List[tuple], steps: int):
    for i in range(steps):
        yield batches[i % len(batches)]


def prepared(batches: List[tuple], steps: int, channels_last: bool):
    """STEPS batches, normalised and in the memory format the model was put in: what both
    hand-written loops feed their model (the toolkit's engine does the same inside)."""
    norm = Normalize(MEAN, STD)
    for x, y in cycle(batches, steps):
        x = norm(x)
        yield (x.contiguous(memory_format=torch.channels_last) if channels_last else x), y


def timed(run_steps: Callable[[int], None], warmup: int, steps: int, batch: int, device: torch.device) -> float:
    """images/s of `steps` steps, after `warmup` steps, between two device syncs."""
    run_steps(warmup)
    sync(device)
    t0 = time.perf_counter()
    run_steps(steps)
    sync(device)
    return steps * batch / (time.perf_counter() - t0)


def plain(args, batches, device: torch.device) -> float:
    model, opt = build(args.model, args.classes, device, args.channels_last)
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    model.train()

    def run_steps(n: int) -> None:
        for x, y in prepared(batches, n, args.channels_last):
            ctx = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
            with ctx:
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    return timed(run_steps, args.warmup, args.steps, args.batch, device)


def fabric_missing() -> Optional[str]:
    try:
        import lightning.fabric  # noqa: F401
    except ImportError as e:
        return f"lightning is not installed ({e}); `pip install lightning` for the Fabric row"
    return None


def fabric(args, batches, device: torch.device) -> float:
    from lightning.fabric import Fabric

    precision = {"bf16": "bf16-mixed", "fp16": "16-mixed", "no": "32-true"}[args.precision]
    fab = Fabric(accelerator="cuda" if device.type == "cuda" else "cpu", devices=1, precision=precision)
    model, opt = build(args.model, args.classes, device, args.channels_last)
    model, opt = fab.setup(model, opt)  # the forward runs under Fabric's autocast
    model.train()

    def run_steps(n: int) -> None:
        for x, y in prepared(batches, n, args.channels_last):
            loss = F.cross_entropy(model(x), y)
            fab.backward(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)

    return timed(run_steps, args.warmup, args.steps, args.batch, device)


def toolkit(args, batches, device: torch.device, run_dir: Path) -> float:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DataLoaderConfiguration

    from toolkit.engine import TrainState, TrainStep, train_epoch
    from toolkit.engine.loop import BatchPrep
    from toolkit.tracking import Tracker

    AcceleratorState._reset_state(True)  # a fresh Accelerator per run (precision is fixed per state)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=args.precision,
                              dataloader_config=DataLoaderConfiguration(split_batches=True), rng_types=[])
    model, opt = build(args.model, args.classes, accelerator.device, args.channels_last)
    model, opt = accelerator.prepare(model, opt)
    sched = accelerator.prepare(torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0))
    step = TrainStep(model, torch.nn.CrossEntropyLoss(), opt, sched,
                     prep=BatchPrep(normalize=Normalize(MEAN, STD), channels_last=args.channels_last))
    tracker = Tracker(accelerator, run_dir, progress="none")
    state = TrainState()

    def run_steps(n: int) -> None:
        train_epoch(step, cycle(batches, n), accelerator, state, tracker, log_every=20)

    return timed(run_steps, args.warmup, args.steps, args.batch, device)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="LeNet, 32 px, batch 8, a few steps: the CPU smoke mode")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--precision", choices=("no", "bf16", "fp16"), default="bf16")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--steps", type=int, default=40, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first in every run (cuDNN autotuning)")
    p.add_argument("--batches", type=int, default=4, help="distinct device batches, cycled")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.tiny:
        args.model, args.size, args.batch, args.classes, args.steps, args.warmup, args.batches, args.repeats = (
            "lenet", 32, 8, 10, 3, 1, 2, 2)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("train_peers: --device cuda, but no CUDA GPU is visible; use --device cpu --tiny", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name() if device.type == "cuda" else (platform.processor() or "cpu")
    print(f"device {name}, torch {torch.__version__}, {args.model} {args.size} px, batch {args.batch}, "
          f"{args.precision}, channels_last {args.channels_last}, {args.steps} steps after {args.warmup} warm-up, "
          f"{args.repeats} repeats", flush=True)
    batches = device_batches(args.batches, args.batch, args.size, args.classes, device)
    missing = fabric_missing()
    if missing:
        print(f"fabric: skipped: {missing}", flush=True)
    runs: Dict[str, List[float]] = {c: [] for c in CONTENDERS if not (c == "fabric" and missing)}
    order = list(runs)
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for c in order[r % len(order):] + order[:r % len(order)]:  # rotated: no contender always first
                if c == "plain":
                    rate = plain(args, batches, device)
                elif c == "fabric":
                    rate = fabric(args, batches, device)
                else:
                    rate = toolkit(args, batches, device, Path(tmp))
                runs[c].append(rate)
                print(f"  repeat {r + 1}: {c:8s} {rate:10,.1f} img/s", flush=True)
    results = {c: {"images_per_s": statistics.median(v), "runs_images_per_s": v} for c, v in runs.items()}
    if missing:
        results["fabric"] = {"skipped": missing}
    base = results["plain"]["images_per_s"]
    ratios = {f"{c}/plain": results[c]["images_per_s"] / base for c in runs if c != "plain"}
    for c, r in results.items():
        shown = f"{r['images_per_s']:10,.1f} img/s" if "images_per_s" in r else f"skipped ({r['skipped']})"
        ratio = f"  {ratios[f'{c}/plain']:.3f}x plain" if f"{c}/plain" in ratios else ""
        print(f"{c:8s} {shown}{ratio}")
    if args.json:
        out = {"device": {"type": device.type, "name": name, "torch": torch.__version__}, "tiny": args.tiny,
               "repeats": args.repeats, "settings": {k: v for k, v in vars(args).items() if k != "json"},
               "results": results, "ratios": ratios}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
