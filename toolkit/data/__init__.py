"""Datasets by name. Each builder returns a `Splits` of map-style datasets.

    splits = DATASETS.build("digits", root=None, split_seed=0, limit=None)
"""

from toolkit.data import cifar, digits, imagefolder, prepared, synthetic  # noqa: F401  (register entries)
from toolkit.data.base import DATASETS, Splits, TensorImageDataset, collate_batch

__all__ = ["DATASETS", "Splits", "TensorImageDataset", "collate_batch"]
