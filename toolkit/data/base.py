"""In-memory image datasets that hand out whole batches at once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset


class TensorImageDataset(Dataset):
    """Decoded images in one tensor (N, C, H, W): float and already normalised, or uint8 with
    per-channel `mean`/`std` (in 0..1 units) applied per batch, which keeps large sets at a
    quarter of the memory.

    `__getitems__` lets the DataLoader fetch a batch with one indexing op instead of
    N `__getitem__` calls and a stack; `collate_batch` passes that batch through.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor,
                 mean: Optional[torch.Tensor] = None, std: Optional[torch.Tensor] = None):
        assert images.ndim == 4 and labels.ndim == 1 and len(images) == len(labels)
        assert (images.dtype == torch.uint8) == (mean is not None and std is not None)
        self.images = images  # (N, C, H, W) float32 normalised, or uint8
        self.labels = labels  # (N,) int64
        self.scale = None if mean is None else (255.0 * std).view(1, -1, 1, 1)  # (1, C, 1, 1)
        self.shift = None if mean is None else (255.0 * mean).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.scale is None else (x.float() - self.shift) / self.scale

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return self._norm(self.images[i : i + 1])[0], self.labels[i]

    def __getitems__(self, idx: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(idx, dtype=torch.long)
        return self._norm(self.images[index]), self.labels[index]


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
