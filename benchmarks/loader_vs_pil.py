"""Device-resident loader vs torchvision's per-sample PIL pipeline: training images/s, side by side.

    python benchmarks/loader_vs_pil.py                          # LeNet and ResNet-18 (CIFAR), 32 px
    python benchmarks/loader_vs_pil.py --models lenet --images 8192 --repeats 3

The data is CIFAR-shaped (uint8, 3x32x32, 10 classes, random pixels) and the augmentation is
CIFAR's standard one (pad 4 + random crop + horizontal flip, then normalise) on both sides:
- "pil": what the reports ran, torchvision's CIFAR10 recipe: a Dataset that makes a PIL image
  per sample (`Image.fromarray`, as torchvision.datasets.CIFAR10 does) and applies
  RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize, in a DataLoader with
  2 worker processes (shuffle, the same batch size);
- "device": toolkit.data.device_loader.DeviceLoader over the uint8 tensor held on the device,
  with the `flip_crop` augmentation applied to whole batches on the device.
Both feed the same training step, `toolkit.engine.train_epoch` behind a real Accelerator, so the
difference is the input pipeline alone. A third column, "loader only", times each pipeline with
no model (batches per second x batch size). Runs alternate (pil, device, pil, device, ...) and
the ratio uses the medians. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from toolkit.data import TensorImageDataset
from toolkit.data.augment import AUGMENTS
from toolkit.data.device_loader import DeviceLoader
from toolkit.data.samplers import EpochSampler
from toolkit.engine import BatchPrep, TrainState, TrainStep, train_epoch
from toolkit.models import MODELS
from toolkit.tracking import Tracker

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # CIFAR-10's


class PILCifar(Dataset):
    """torchvision.datasets.CIFAR10's __getitem__: HWC uint8 array -> PIL image -> transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.data, self.targets, self.transform = images, labels, transform  # (N, H, W, 3) uint8

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.data[i])), int(self.targets[i])


def make_data(n: int):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)  # (N, C, H, W)
    labels = torch.randint(0, 10, (n,), generator=g)
    return images, labels


def pil_loader(images, labels, batch: int, workers: int) -> DataLoader:
    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
    ds = PILCifar(images.permute(0, 2, 3, 1).numpy(), labels.numpy(), tf)
    return DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                      persistent_workers=False, pin_memory=torch.cuda.is_available())


def device_loader(images, labels, batch: int, accelerator: Accelerator) -> DeviceLoader:
    ds = TensorImageDataset(images, labels, mean=torch.tensor(MEAN), std=torch.tensor(STD))
    return DeviceLoader(ds, EpochSampler(len(ds), 0), batch, True, accelerator.device, 0, 1,
                        accelerator.gradient_state)


def train_rate(name: str, kind: str, images, labels, batch: int, workers: int, accelerator: Accelerator,
               run_dir: Path) -> float:
    torch.manual_seed(0)
    model = MODELS.build(name, num_classes=10).to(accelerator.device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    model, opt = accelerator.prepare(model, opt)
    sched = accelerator.prepare(torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0))
    if kind == "pil":
        loader, augment = accelerator.prepare(pil_loader(images, labels, batch, workers)), None
    else:
        loader, augment = device_loader(images, labels, batch, accelerator), AUGMENTS.build("flip_crop", image_size=32)
    state = TrainState()
    tracker = Tracker(accelerator, run_dir, progress="none")
    t0 = time.perf_counter()  # worker start-up counts: it is paid every epoch without persistent workers
    step = TrainStep(model, torch.nn.CrossEntropyLoss(), opt, sched, BatchPrep(augment=augment))
    train_epoch(step, loader, accelerator, state, tracker, log_every=20)
    if accelerator.device.type == "cuda":
        torch.cuda.synchronize()
    return state.images / (time.perf_counter() - t0)


def loader_rate(kind: str, images, labels, batch: int, workers: int, accelerator: Accelerator) -> float:
    if kind == "pil":
        loader, augment = pil_loader(images, labels, batch, workers), None
    else:
        loader, augment = device_loader(images, labels, batch, accelerator), AUGMENTS.build("flip_crop", image_size=32)
    n = 0
    t0 = time.perf_counter()
    for x, y in loader:
        x = x.to(accelerator.device, non_blocking=True)
        if augment is not None:
            x = augment(x)
        n += x.shape[0]
    if accelerator.device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="lenet,resnet18_cifar")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--images", type=int, default=0, help="images per timed epoch (0: per-model default)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              dataloader_config=DataLoaderConfiguration(split_batches=True))
    cpu = accelerator.device.type == "cpu"
    print(f"device {accelerator.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"batch {args.batch}, pil workers {args.workers}")
    results = {}
    images, labels = make_data(args.images or 8192)
    runs = {"pil": [], "device": []}
    for _ in range(args.repeats):
        for kind in runs:
            runs[kind].append(loader_rate(kind, images, labels, args.batch, args.workers, accelerator))
    med = {k: statistics.median(v) for k, v in runs.items()}
    results["loader_only"] = {**{f"{k}_images_per_s": v for k, v in med.items()}, "ratio": med["device"] / med["pil"]}
    print(f"{'loader only':16s} pil {med['pil']:9,.0f} img/s   device {med['device']:9,.0f} img/s   "
          f"device/pil {med['device'] / med['pil']:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            n = args.images or ({"lenet": 8192}.get(name, 1024 if cpu else 16384))
            images, labels = make_data(n)
            for kind in ("pil", "device"):  # warm-up
                train_rate(name, kind, images[: 4 * args.batch], labels[: 4 * args.batch], args.batch,
                           args.workers, accelerator, Path(tmp))
            runs = {"pil": [], "device": []}
            for _ in range(args.repeats):
                for kind in runs:
                    runs[kind].append(train_rate(name, kind, images, labels, args.batch, args.workers,
                                                 accelerator, Path(tmp)))
            med = {k: statistics.median(v) for k, v in runs.items()}
            ratio = med["device"] / med["pil"]
            results[name] = {"pil_images_per_s": med["pil"], "device_images_per_s": med["device"], "ratio": ratio,
                             "images": n, "repeats": args.repeats,
                             "spread": {k: [min(v), max(v)] for k, v in runs.items()}}
            print(f"{name:16s} pil {med['pil']:9,.0f} img/s   device {med['device']:9,.0f} img/s   "
                  f"device/pil {ratio:.2f}   (median of {args.repeats}, {n} images each; spread "
                  f"pil {min(runs['pil']):,.0f}-{max(runs['pil']):,.0f}, "
                  f"device {min(runs['device']):,.0f}-{max(runs['device']):,.0f})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
