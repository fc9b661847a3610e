"""What every dataset entry shares: the `Splits` it returns, and the in-memory image datasets
that hand out whole batches at once. (The `DATASETS` registry its builder registers in is in
toolkit.catalog.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset



class Normalize:
    """uint8 (B, C, H, W) -> float32 (x - 255 mean) / (255 std), per channel, on the batch's
    device; float input (already normalised) passes through. One formula for every uint8 set:
    training batches, evaluation and extraction of the same images give the same numbers.

    The per-channel tensors are copied to each device once and kept: a copy from host memory
    per batch is a blocking transfer that stalls a GPU's queue."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.shift = (255.0 * torch.as_tensor(mean, dtype=torch.float32)).view(1, -1, 1, 1)  # (1, C, 1, 1)
        self.scale = (255.0 * torch.as_tensor(std, dtype=torch.float32)).view(1, -1, 1, 1)
        self._on: Dict[torch.device, Tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8:
            return x
        on = self._on.get(x.device)
        if on is None:
            on = self._on[x.device] = (self.shift.to(x.device), self.scale.to(x.device))
        return (x.float() - on[0]) / on[1]


class TensorImageDataset(Dataset):
    """Decoded images in one tensor (N, C, H, W): float and already normalised, or uint8 with
    per-channel `mean`/`std` (in 0..1 units) applied per batch, which keeps large sets at a
    quarter of the memory.

    `__getitems__` lets the DataLoader fetch a batch with one indexing op instead of
    N `__getitem__` calls and a stack; `collate_batch` passes that batch through.
    `device_items()` makes a uint8 set hand out its uint8 images, to be normalised where the
    batch lands (see `device_items`).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor,
                 mean: Optional[torch.Tensor] = None, std: Optional[torch.Tensor] = None):
        assert images.ndim == 4 and labels.ndim == 1 and len(images) == len(labels)
        assert (images.dtype == torch.uint8) == (mean is not None and std is not None)
        self.images = images  # (N, C, H, W) float32 normalised, or uint8
        self.labels = labels  # (N,) int64
        self.norm = None if mean is None else Normalize(mean, std)  # uint8 -> float32, any device
        self.raw_items = False  # True: items are the stored uint8, see device_items()

    def __len__(self) -> int:
        return len(self.labels)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.norm is None else self.norm(x)

    def device_items(self) -> Optional[Normalize]:
        """For a uint8 set: from now on hand out uint8 images (a quarter of the bytes through
        worker queues, pinned memory and the host-to-device copy) and return the function that
        normalises a batch of them on its device, with this dataset's own formula. None for a
        float set (its items are already normalised)."""
        if self.norm is None:
            return None
        self.raw_items = True
        return self.norm

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self.images[i : i + 1]
        return (x if self.raw_items else self._norm(x))[0], self.labels[i]

    def __getitems__(self, idx: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(idx, dtype=torch.long)
        x = self.images[index]
        return (x if self.raw_items else self._norm(x)), self.labels[index]


def device_items(ds) -> Optional[Normalize]:
    """`ds.device_items()` where the dataset has it (uint8 items from now on, normalised by the
    returned function where the batch lands), else None (items already float)."""
    method = getattr(ds, "device_items", None)
    return method() if method is not None else None


def collate_batch(batch):
    """Collate for datasets with `__getitems__`: the batch is already stacked."""
    if isinstance(batch, tuple):
        return batch
    return torch.utils.data.default_collate(batch)


def collate_for(ds):
    """The collate function for `ds`'s items: the dataset's own (`ds.collate`) where it has
    one (image folders under data.decode=device), else `collate_batch`."""
    return getattr(ds, "collate", None) or collate_batch


@dataclass
class Splits:
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    class_names: List[str]
    meta: Dict[str, object]  # image size, normalisation, split sizes: written to the run directory
