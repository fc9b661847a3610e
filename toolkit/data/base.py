"""In-memory image datasets that hand out whole batches at once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
from torch.utils.data import Dataset


class TensorImageDataset(Dataset):
    """Images already decoded and normalised, as one float tensor (N, C, H, W).

    `__getitems__` lets the DataLoader fetch a batch with one indexing op instead of
    N `__getitem__` calls and a stack; `collate_batch` passes that batch through.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        assert images.ndim == 4 and labels.ndim == 1 and len(images) == len(labels)
        self.images = images  # (N, C, H, W) float32, normalised
        self.labels = labels  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]

    def __getitems__(self, idx: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(idx, dtype=torch.long)
        return self.images[index], self.labels[index]


def collate_batch(batch):
    """Collate for datasets with `__getitems__`: the batch is already stacked."""
    if isinstance(batch, tuple):
        return batch
    return torch.utils.data.default_collate(batch)


@dataclass
class Splits:
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    class_names: List[str]
    meta: Dict[str, object]  # image size, normalisation, split sizes: written to the run directory
