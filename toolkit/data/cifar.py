"""`cifar10` and `cifar100` from torchvision's on-disk format under `data.root`.

    data.name=cifar10 data.root=/data            # reads /data/cifar-10-batches-py/
    data.name=cifar100 data.root=/data data.download=true

The batches are Python pickles. They are read with an unpickler that only admits what these
files hold (dicts, lists, strings, numpy arrays), so a tampered file cannot run code. The test
split is the official one; validation is a stratified 10% of the official training set, fixed
by `data.split_seed`. Images stay uint8 in memory (150 MB for CIFAR-10) and are normalised
per batch with the training split's per-channel statistics.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch

from toolkit.catalog import DATASETS
from toolkit.data.base import Splits, TensorImageDataset
from toolkit.errors import ConfigError

LAYOUT = {
    "cifar10": {"folder": "cifar-10-batches-py", "train": [f"data_batch_{i}" for i in range(1, 6)],
                "test": ["test_batch"], "labels": b"labels", "meta": ("batches.meta", b"label_names"),
                "tv": "CIFAR10"},
    "cifar100": {"folder": "cifar-100-python", "train": ["train"], "test": ["test"],
                 "labels": b"fine_labels", "meta": ("meta", b"fine_label_names"), "tv": "CIFAR100"},
}

_ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"), ("builtins", "bytearray")}


class _DataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a dataset batch")


def _unpickle(path: Path) -> object:
    try:
        with open(path, "rb") as f:
            return _DataUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise ConfigError(f"config: data.root: {path} is missing") from None
    except Exception as e:  # truncated, not a pickle, or a pickle that wants to run code
        raise ConfigError(f"config: data.root: {path} is not a readable CIFAR batch ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None


def _load_batch(path: Path) -> Dict[bytes, object]:
    batch = _unpickle(path)
    if not isinstance(batch, dict) or b"data" not in batch:
        raise ConfigError(f"config: data.root: {path} is not a CIFAR batch (no b'data' entry)")
    return batch


def read_split(folder: Path, files: List[str], label_key: bytes) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> images (N, 3, 32, 32) uint8, labels (N,) int64."""
    xs, ys = [], []
    for name in files:
        batch = _load_batch(folder / name)
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch.get(label_key, []), dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
            raise ConfigError(f"config: data.root: {folder / name} has data {data.shape} and {len(labels)} labels; "
                              "expected (N, 3072) and N")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels)
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def _class_names(folder: Path, meta: Tuple[str, bytes], n: int) -> List[str]:
    """Names from the meta file; class indices when it is missing or odd."""
    try:
        names = _unpickle(folder / meta[0]).get(meta[1])
        names = [x.decode() if isinstance(x, bytes) else str(x) for x in names][:n]
        return names if len(names) == n else [str(i) for i in range(n)]
    except (ConfigError, AttributeError, TypeError):
        return [str(i) for i in range(n)]


def _build(kind: str, root: str | None, split_seed: int, limit: int | None, download: bool) -> Splits:
    spec = LAYOUT[kind]
    if root is None:
        raise ConfigError(f"config: data.root: {kind} needs data.root (the folder that holds {spec['folder']}/)")
    folder = Path(root) / spec["folder"]
    if not folder.is_dir():
        if not download:
            raise ConfigError(f"config: data.root: {folder} not found; put torchvision's {kind} there or set "
                              "data.download=true on a machine with internet")
        import torchvision

        try:
            getattr(torchvision.datasets, spec["tv"])(root, train=True, download=True)
        except Exception as e:
            raise ConfigError(f"config: data.download: could not download {kind} into {root}: "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    x_train, y_train = read_split(folder, spec["train"], spec["labels"])
    x_test, y_test = read_split(folder, spec["test"], spec["labels"])
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    from sklearn.model_selection import train_test_split  # ~1.2 s to import: only when used

    idx = np.arange(len(y_train))
    tr, va = train_test_split(idx, test_size=0.1, stratify=y_train.numpy(), random_state=split_seed)
    parts = [(x_train, y_train, np.sort(tr)), (x_train, y_train, np.sort(va)),
             (x_test, y_test, np.arange(len(y_test)))]
    if limit is not None:
        parts = [(x, y, ix[:limit]) for x, y, ix in parts]
    train_x = x_train[torch.from_numpy(parts[0][2])]
    mean = (train_x.float() / 255).mean(dim=(0, 2, 3))
    std = (train_x.float() / 255).std(dim=(0, 2, 3))
    train, val, test = (TensorImageDataset(x[torch.from_numpy(ix)], y[torch.from_numpy(ix)], mean=mean, std=std)
                        for x, y, ix in parts)
    return Splits(train=train, val=val, test=test, num_classes=num_classes,
                  class_names=_class_names(folder, spec["meta"], num_classes),
                  meta={"image_size": 32, "mean": mean.tolist(), "std": std.tolist(),
                        "sizes": {"train": len(train), "val": len(val), "test": len(test)}})


@DATASETS.register("cifar10")
def cifar10(root: str | None = None, split_seed: int = 0, limit: int | None = None,
            download: bool = False, **_) -> Splits:
    """CIFAR-10 from ROOT/cifar-10-batches-py (torchvision's format); val: a stratified 10% of train."""
    return _build("cifar10", root, split_seed, limit, download)


@DATASETS.register("cifar100")
def cifar100(root: str | None = None, split_seed: int = 0, limit: int | None = None,
             download: bool = False, **_) -> Splits:
    """CIFAR-100 (fine labels) from ROOT/cifar-100-python (torchvision's format); val: a stratified 10% of train."""
    return _build("cifar100", root, split_seed, limit, download)
