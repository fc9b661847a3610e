"""Datasets by name. Each builder returns a `Splits` of map-style datasets.

    splits = DATASETS.build("digits", root=None, split_seed=0, limit=None)
"""

from toolkit.data.base import Splits, TensorImageDataset, collate_batch
from toolkit.registry import Registry

DATASETS = Registry("dataset")

from toolkit.data import cifar, digits, imagefolder, prepared, synthetic  # noqa: E402,F401  (register entries)

__all__ = ["DATASETS", "Splits", "TensorImageDataset", "collate_batch"]
