"""Engine vs a plain hand-written PyTorch loop: training images/s, side by side in one run.

    python benchmarks/engine_vs_plain.py                      # LeNet and ResNet-18 (CIFAR), CPU
    python benchmarks/engine_vs_plain.py --models lenet --batches 300 --repeats 5
    python benchmarks/engine_vs_plain.py --models linear --batch 16 --batches 1000 --threads 1 --repeats 5

`linear` is one Linear layer on the flattened image: its step is so short that the difference
between the two loops is the engine's own cost per step, printed in microseconds.

Both loops train the same model (same init), on the same in-memory 32x32 batches, with the same
batch size, optimizer and device. The engine side is `toolkit.engine.train_epoch` behind a real
Accelerator, exactly as `fit` runs it (non-finite check, running sums, periodic logging
included), twice: fed by the device-resident loader, which `fit` picks for in-memory data
(`data.loader=auto`), and by a prepared DataLoader (`data.loader=dataloader`). The plain side is the loop users write by hand, without a per-step
`.item()`. Runs alternate (plain, engine, plain, engine, ...) so that drift in the machine's
speed hits both; the ratio uses the median of each. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from torch.utils.data import DataLoader

from toolkit.data import TensorImageDataset, collate_batch
from toolkit.data.device_loader import DeviceLoader
from toolkit.data.samplers import EpochSampler
from toolkit.engine import TrainState, TrainStep, train_epoch
from toolkit.models import MODELS
from toolkit.tracking import Tracker


def dataset(n: int, num_classes: int = 10) -> TensorImageDataset:
    g = torch.Generator().manual_seed(0)
    return TensorImageDataset(torch.randn(n, 3, 32, 32, generator=g),
                              torch.randint(0, num_classes, (n,), generator=g))


def make_model(name: str, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "linear":  # (B, 3, 32, 32) -> (B, 10): next to no compute, so the loops' own cost shows
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10)).to(device)
    return MODELS.build(name, num_classes=10).to(device)


def plain(name: str, data: TensorImageDataset, batch: int, device: torch.device) -> float:
    model = make_model(name, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    loader = DataLoader(data, batch_size=batch, sampler=EpochSampler(len(data), 0), drop_last=True,
                        collate_fn=collate_batch)
    model.train()
    n = 0
    t0 = time.perf_counter()
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n += x.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def engine(name: str, data: TensorImageDataset, batch: int, accelerator: Accelerator, run_dir: Path,
           loader_kind: str = "device") -> float:
    model = make_model(name, accelerator.device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    if loader_kind == "device":
        model, opt = accelerator.prepare(model, opt)
        loader = DeviceLoader(data, EpochSampler(len(data), 0), batch, True, accelerator.device,
                              accelerator.process_index, accelerator.num_processes, accelerator.gradient_state)
    else:
        loader = DataLoader(data, batch_size=batch, sampler=EpochSampler(len(data), 0), drop_last=True,
                            collate_fn=collate_batch)
        model, opt, loader = accelerator.prepare(model, opt, loader)
    sched = accelerator.prepare(torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0))
    state = TrainState()
    tracker = Tracker(accelerator, run_dir, progress="none")
    t0 = time.perf_counter()
    train_epoch(TrainStep(model, torch.nn.CrossEntropyLoss(), opt, sched), loader, accelerator, state, tracker,
                log_every=20)
    if accelerator.device.type == "cuda":
        torch.cuda.synchronize()
    return state.images / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="lenet,resnet18_cifar")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=0, help="batches per timed run (0: per-model default)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              dataloader_config=DataLoaderConfiguration(split_batches=True))
    device = accelerator.device
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            batches = args.batches or {"lenet": 400, "linear": 1000}.get(name, 12 if device.type == "cpu" else 400)
            data = dataset(batches * args.batch)
            plain(name, data, args.batch, device)  # warm-up every path
            engine(name, data, args.batch, accelerator, Path(tmp), "device")
            engine(name, data, args.batch, accelerator, Path(tmp), "dataloader")
            runs = {"plain": [], "engine": [], "engine_dataloader": []}
            for _ in range(args.repeats):
                runs["plain"].append(plain(name, data, args.batch, device))
                runs["engine"].append(engine(name, data, args.batch, accelerator, Path(tmp), "device"))
                runs["engine_dataloader"].append(engine(name, data, args.batch, accelerator, Path(tmp), "dataloader"))
            med = {k: statistics.median(v) for k, v in runs.items()}
            ratio = med["engine"] / med["plain"]
            ratio_dl = med["engine_dataloader"] / med["plain"]
            results[name] = {"plain_images_per_s": med["plain"], "engine_images_per_s": med["engine"],
                             "engine_dataloader_images_per_s": med["engine_dataloader"],
                             "ratio": ratio, "ratio_dataloader": ratio_dl, "batches": batches,
                             "repeats": args.repeats, "spread": {k: [min(v), max(v)] for k, v in runs.items()}}
            overhead_us = 1e6 * args.batch * (1 / med["engine"] - 1 / med["plain"])  # per step
            results[name]["engine_overhead_us_per_step"] = overhead_us
            print(f"{name:16s} plain {med['plain']:9,.0f} img/s   engine {med['engine']:9,.0f} img/s "
                  f"(engine/plain {ratio:.3f})   engine+DataLoader {med['engine_dataloader']:9,.0f} img/s "
                  f"({ratio_dl:.3f})   engine cost {overhead_us:,.0f} us/step   "
                  f"(median of {args.repeats}, {batches} batches each; spread "
                  + ", ".join(f"{k} {min(v):,.0f}-{max(v):,.0f}" for k, v in runs.items()) + ")")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
