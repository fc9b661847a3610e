"""`digits`: the 1,797 real 8x8 handwritten digits that scikit-learn ships, as 32x32 RGB.

No download: the data is inside the scikit-learn package. The split is stratified and seeded
with `data.split_seed` (not `run.seed`), so every run and every sweep trial sees the same
train/val/test images: 70% / 10% / 20% -> 1257 / 180 / 360.

Start-up: importing scikit-learn takes ~1.2 s of a ~6 s demo run, so the default path does
without it. The pixels are read from scikit-learn's own file the way `load_digits` reads them,
and the split of the default `split_seed` 0 ships beside this module (digits_split_seed0.txt,
one letter per image: t train, v val, s test), the output of `split_indices(labels, 0)`; a test
recomputes it with scikit-learn. Any other seed computes its split with scikit-learn.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from toolkit.catalog import DATASETS
from toolkit.data.base import Splits, TensorImageDataset

IMAGE_SIZE = 32
SHIPPED_SPLIT = Path(__file__).with_name("digits_split_seed0.txt")  # split_indices(labels, seed=0)


def load_raw() -> tuple[np.ndarray, np.ndarray]:
    """(1797, 64) float64 grey levels 0..16, (1797,) int64 labels: what scikit-learn's
    `load_digits()` returns as `data` and `target`, read from its file without importing it."""
    spec = importlib.util.find_spec("sklearn")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the digits dataset ships with scikit-learn: pip install scikit-learn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        data = np.loadtxt(f, delimiter=",")  # (1797, 65): 64 pixels, then the label
    return data[:, :-1], data[:, -1].astype(np.int64)


def _to_images(flat: np.ndarray) -> torch.Tensor:
    """(N, 64) grey levels 0..16 -> (N, 3, 32, 32) uint8 0..255, bilinear upsampling."""
    x = torch.from_numpy(flat.astype(np.float32)).view(-1, 1, 8, 8) / 16.0
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1).contiguous()  # (N, 3, 32, 32)


def split_indices(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted (train, val, test) indices of a stratified 70/10/20 split seeded by `seed`."""
    if seed == 0:
        return shipped_split(len(labels))
    return computed_split(labels, seed)


def shipped_split(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    code = np.frombuffer(SHIPPED_SPLIT.read_bytes().strip(), dtype=np.uint8)
    if len(code) != n:
        raise ValueError(f"{SHIPPED_SPLIT.name} holds {len(code)} images' split, the data {n}")
    return tuple(np.flatnonzero(code == ord(c)) for c in "tvs")


def computed_split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split  # scikit-learn: ~1.2 s, only when used

    idx = np.arange(len(labels))
    train_val, test = train_test_split(idx, test_size=0.2, stratify=labels, random_state=seed)
    train, val = train_test_split(train_val, test_size=0.125, stratify=labels[train_val],
                                  random_state=seed)
    return np.sort(train), np.sort(val), np.sort(test)


@DATASETS.register("digits")
def digits(root: str | None = None, split_seed: int = 0, limit: int | None = None, **_) -> Splits:
    """The 1,797 8x8 handwritten digits that ship with scikit-learn, as 32x32 RGB; no download."""
    flat, target = load_raw()
    images = _to_images(flat)  # (1797, 3, 32, 32) uint8
    labels = torch.from_numpy(target)
    parts = split_indices(target, split_seed)
    if limit is not None:
        parts = tuple(p[:limit] for p in parts)
    train_idx = torch.from_numpy(parts[0])
    # Normalisation statistics from the training split only.
    train_f = images[train_idx].float() / 255.0
    mean = train_f.mean(dim=(0, 2, 3))
    std = train_f.std(dim=(0, 2, 3))

    def make(ix: np.ndarray) -> TensorImageDataset:
        ix_t = torch.from_numpy(ix)
        x = (images[ix_t].float() / 255.0 - mean[:, None, None]) / std[:, None, None]
        return TensorImageDataset(x.contiguous(), labels[ix_t].clone())

    train, val, test = (make(p) for p in parts)
    return Splits(
        train=train, val=val, test=test, num_classes=10,
        class_names=[str(i) for i in range(10)],
        meta={"image_size": IMAGE_SIZE, "mean": mean.tolist(), "std": std.tolist(),
              "sizes": {"train": len(train), "val": len(val), "test": len(test)}},
    )
