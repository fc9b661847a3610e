"""Datasets by name. Each builder returns a `Splits` of map-style datasets.

    splits = DATASETS.build("digits", root=None, split_seed=0, limit=None)
"""

from toolkit.catalog import DATASETS  # an entry's module is imported when the entry is first built
from toolkit.data.base import Splits, TensorImageDataset, collate_batch

__all__ = ["DATASETS", "Splits", "TensorImageDataset", "collate_batch"]
