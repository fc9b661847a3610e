"""Whole-process wall time of a short job: the toolkit's CLI vs a bare PyTorch script vs Lightning.

    python benchmarks/startup.py                  # 5 alternating rounds, medians and ratios
    python benchmarks/startup.py --rounds 9 --epochs 10

The job is the demo's, cut to what every side can do alike: LeNet-5 on the embedded digits
(1,257 training images at 32x32), SGD lr 0.01 momentum 0.9, batch 64, 10 epochs, no
augmentation, validation after each epoch, test accuracy at the end. Each side is a fresh
`python` process timed from spawn to exit, so start-up (imports, set-up) counts as the user
meets it: every CLI call, every sweep trial and every short experiment pays it.

- bare: the script users write by hand (scikit-learn's loader and split, a TensorDataset
  DataLoader, a for loop); it writes nothing.
- toolkit: `python -m toolkit.train` with its defaults (it also writes metrics, TensorBoard,
  a checkpoint per epoch, the final weights, the summary and the plots).
- lightning: a LightningModule with Trainer defaults (a checkpoint and a logger), CPU; skipped
  with a note when `lightning` is not installed (`pip install lightning`).

Also timed: `python -m toolkit.train --help` and a config error (both should answer in < 0.5 s).
Rounds alternate the sides so that drift in the machine's speed hits all of them; the ratios use
the medians. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_COMMON = '''
import sys
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

EPOCHS = int(sys.argv[1])
torch.manual_seed(0)
raw = load_digits()
x = torch.from_numpy(raw.data.astype(np.float32)).view(-1, 1, 8, 8) / 16.0
x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
y = torch.from_numpy(raw.target.astype(np.int64))
idx = np.arange(len(y))
train_val, test = train_test_split(idx, test_size=0.2, stratify=raw.target, random_state=0)
train, val = train_test_split(train_val, test_size=0.125, stratify=raw.target[train_val], random_state=0)
mean, std = x[train].mean(dim=(0, 2, 3)), x[train].std(dim=(0, 2, 3))
x = ((x - mean[:, None, None]) / std[:, None, None]).contiguous()
loaders = [DataLoader(TensorDataset(x[i], y[i]), batch_size=64, shuffle=s) for i, s in
           ((train, True), (val, False), (test, False))]


def lenet():
    return nn.Sequential(
        nn.Conv2d(3, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))
'''

BARE = _COMMON + '''

def accuracy(model, loader):
    model.eval()
    with torch.no_grad():
        hits = sum((model(xb).argmax(1) == yb).sum().item() for xb, yb in loader)
    model.train()
    return hits / len(loader.dataset)


model = lenet()
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
for epoch in range(EPOCHS):
    for xb, yb in loaders[0]:
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    print(f"epoch {epoch} val {accuracy(model, loaders[1]):.4f}")
print(f"test {accuracy(model, loaders[2]):.4f}")
'''

LIGHTNING = _COMMON + '''
import lightning as L


class Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = lenet()

    def training_step(self, batch, _):
        xb, yb = batch
        loss = F.cross_entropy(self.net(xb), yb)
        self.log("train_loss", loss)
        return loss

    def _eval(self, batch, name):
        xb, yb = batch
        self.log(name, (self.net(xb).argmax(1) == yb).float().mean())

    def validation_step(self, batch, _):
        self._eval(batch, "val_acc")

    def test_step(self, batch, _):
        self._eval(batch, "test_acc")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


trainer = L.Trainer(max_epochs=EPOCHS, accelerator="cpu", devices=1, default_root_dir=sys.argv[2],
                    enable_progress_bar=False)
model = Classifier()
trainer.fit(model, loaders[0], loaders[1])
trainer.test(model, loaders[2])
'''


def timed(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    expected = 2 if "model.name=nosuch" in cmd else 0
    if done.returncode != expected:
        raise SystemExit(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return wall


def sides(work: Path, epochs: int) -> dict[str, callable]:
    (work / "bare.py").write_text(BARE)
    (work / "lightning_job.py").write_text(LIGHTNING)
    py = sys.executable
    counter = iter(range(10 ** 6))
    train = [py, "-m", "toolkit.train", "--config", "configs/digits_lenet.yaml",
             f"train.epochs={epochs}", "data.batch_size=64", "data.augment=none", "sched.milestones=[]"]
    out = {
        "bare": lambda: timed([py, str(work / "bare.py"), str(epochs)], ROOT),
        "toolkit": lambda: timed(train + [f"run.dir={work}/run{next(counter)}"], ROOT),
        "toolkit --help": lambda: timed([py, "-m", "toolkit.train", "--help"], ROOT),
        "toolkit config error": lambda: timed([py, "-m", "toolkit.train", "--config",
                                               "configs/digits_lenet.yaml", "model.name=nosuch"], ROOT),
    }
    if importlib.util.find_spec("lightning") is not None:
        out["lightning"] = lambda: timed([py, str(work / "lightning_job.py"), str(epochs),
                                          str(work / f"pl{next(counter)}")], ROOT)
    else:
        print("lightning: not installed here (pip install lightning); its column is skipped")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=10)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = sides(Path(tmp), args.epochs)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for r in range(args.rounds):
            for name, run in runs.items():
                times[name].append(run())
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()),
                  flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nmedians of {args.rounds} rounds ({args.epochs} epochs):")
    for k, v in med.items():
        ratio = f"  {v / med['bare']:.2f}x bare" if k in ("toolkit", "lightning") else ""
        print(f"  {k:22s} {v:6.2f} s{ratio}")
    if "lightning" in med:
        print(f"  toolkit / lightning     {med['toolkit'] / med['lightning']:.2f}x")


if __name__ == "__main__":
    main()
