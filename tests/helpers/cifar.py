"""CIFAR-10/100 in torchvision's on-disk format (pickled dicts of bytes keys), written small,
since CIFAR itself cannot be downloaded on these machines.

    folder = make_cifar10(tmp_path)   # tmp_path/cifar-10-batches-py; data.root=tmp_path
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

CIFAR10_CLASSES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]


def cifar_batch(n: int, num_classes: int, label_key: bytes, seed: int) -> dict:
    """One batch: N random 32x32 RGB images as (N, 3072) uint8 rows, label i % NUM_CLASSES."""
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"fake", label_key: [int(i % num_classes) for i in range(n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"img{i}.png".encode() for i in range(n)]}


def dump_pickle(path: Path, obj) -> None:
    """Pickle OBJ as CIFAR's files are (protocol 2)."""
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def make_cifar10(root: Path, per_batch: int = 40, test: int = 50) -> Path:
    """root/cifar-10-batches-py: data_batch_1..5 (PER_BATCH images each), test_batch, batches.meta."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 6):
        dump_pickle(folder / f"data_batch_{i}", cifar_batch(per_batch, 10, b"labels", i))
    dump_pickle(folder / "test_batch", cifar_batch(test, 10, b"labels", 99))
    dump_pickle(folder / "batches.meta", {b"label_names": CIFAR10_CLASSES})
    return folder


def make_cifar100(root: Path, train: int = 1000, test: int = 100) -> Path:
    """root/cifar-100-python: train, test (fine labels i % 100) and meta (names c0..c99)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    dump_pickle(folder / "train", cifar_batch(train, 100, b"fine_labels", 1))
    dump_pickle(folder / "test", cifar_batch(test, 100, b"fine_labels", 2))
    dump_pickle(folder / "meta", {b"fine_label_names": [f"c{i}".encode() for i in range(100)]})
    return folder
