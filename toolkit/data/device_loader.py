"""Device-resident training loader for in-memory datasets (`data.loader=auto|device|dataloader`).

    loader = DeviceLoader(splits.train, sampler, batch_size=512, drop_last=True,
                          device=accelerator.device, rank=accelerator.process_index,
                          world=accelerator.num_processes, gradient_state=accelerator.gradient_state)
    sampler.set_epoch(epoch)
    for x, y in loader.iterate(start=state.batch):   # x: (B / world, C, H, W) float32, y: (B / world,)
        ...

The images (uint8, or float already normalised) go to the device once. Each epoch the sampler's
seeded order (a pure function of seed and epoch) is cut into global batches of `batch_size`;
rank r takes rows [r * b, (r + 1) * b) of each, b = batch_size / world, which is how Accelerate
splits a prepared DataLoader's batch (`split_batches=True`). Normalisation is the dataset's own
formula, applied to the whole batch where it lives. So for the same seed this loader yields, on
any device, exactly the batches the DataLoader path yields (tests/test_device_loader.py checks
equal weights after training both ways), and `iterate(start=k)` is mid-epoch resume: batch k is
the same batch whether the epoch began at 0 or not.

Per step this costs one gather on the device, with no host-to-device copy, no worker processes
and no per-sample Python. Augmentation already runs on whole batches on the device
(toolkit/data/augment.py). Evaluation keeps the DataLoader: it runs once per epoch, and
Accelerate's `gather_for_metrics` needs its prepared loaders to drop the padding exactly.
"""

from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch
from torch.utils.data import Sampler

from toolkit.accelerate_compat import DataLoaderStateMixin, register_loader
from toolkit.data.base import TensorImageDataset

# `auto` puts a dataset on a GPU only if it takes at most this share of the free memory: the
# model, activations and the allocator's cache need the rest.
GPU_SHARE = 0.4


def dataset_bytes(ds) -> int:
    return ds.images.numel() * ds.images.element_size() + ds.labels.numel() * ds.labels.element_size()


def device_loader_reason(ds, device: torch.device) -> Optional[str]:
    """None when `ds` can live on `device`; otherwise why not, for the log or the error."""
    if not isinstance(ds, TensorImageDataset):
        return f"the training set ({type(ds).__name__}) is decoded on the fly, not held in memory"
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        need = dataset_bytes(ds)
        if need > GPU_SHARE * free:
            return (f"the training set needs {need / 2**30:.2f} GiB, over {GPU_SHARE:.0%} of the "
                    f"{free / 2**30:.2f} GiB free on {device}")
    return None


def agreed_reason(accelerator, reason: Optional[str]) -> Optional[str]:
    """Every rank takes the same decision: the set goes on the devices only if it fits on all of
    them (each rank measures its own GPU's free memory)."""
    if getattr(accelerator, "num_processes", 1) <= 1:
        return reason
    fits = torch.tensor([0.0 if reason else 1.0], device=accelerator.device)
    all_fit = accelerator.gather(fits).min().item() == 1.0  # a collective: every rank calls it once
    if reason is None and not all_fit:
        return "the training set does not fit on the device of every process"
    return reason


class DeviceLoader(DataLoaderStateMixin):
    """Batches of an in-memory dataset gathered on the device; see the module docstring.

    It registers with Accelerate's GradientState while iterating (as a prepared DataLoader
    does), so gradient accumulation closes its window on an epoch's last batch."""

    def __init__(self, dataset: TensorImageDataset, sampler: Sampler, batch_size: int, drop_last: bool,
                 device: torch.device, rank: int, world: int, gradient_state) -> None:
        if batch_size % world:
            raise ValueError(f"batch size {batch_size} is not divisible by {world} processes")
        self.dataset, self.sampler = dataset, sampler
        self.batch_size, self.drop_last = batch_size, drop_last
        self.device, self.rank, self.world = device, rank, world
        self.gradient_state = gradient_state
        self.images, self.labels = _on_device(dataset, device)  # (N, C, H, W), (N,)
        self.norm = dataset.norm  # the dataset's own Normalize (None: float, already normalised)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.norm is None else self.norm(x)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        return self.iterate(0)

    def iterate(self, start: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches from batch `start` on (this rank's slice of each global batch)."""
        order = torch.as_tensor(list(iter(self.sampler)), dtype=torch.long).to(self.device)  # (N,)
        num = len(self)
        per_rank = self.batch_size // self.world
        full = len(order) // self.batch_size
        # (full, B / world): row i is this rank's indices of global batch i, cut once per epoch, so
        # a step costs one row select and two index_selects: 25 instead of 55-70 us of host time
        # per batch than slicing and advanced indexing (2-core VM), which shows on small models.
        mine_rows = order[:full * self.batch_size].view(full, self.world, per_rank)[:, self.rank]
        self.reset()
        register_loader(self.gradient_state, self)
        try:
            for i in range(start, num):
                if i < full:
                    mine = mine_rows[i]  # (B / world,)
                else:  # a short last batch (drop_last=false): only reachable on one process
                    mine = order[i * self.batch_size:]
                self.end_of_dataloader = i == num - 1
                yield self._norm(self.images.index_select(0, mine)), self.labels.index_select(0, mine)
        finally:
            self.end()


def _on_device(ds: TensorImageDataset, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """The dataset's tensors on `device`, copied once per dataset and device (a new training
    stage builds a new loader over the same data). Labels are read now: label noise has been
    applied by then."""
    cached = getattr(ds, "_device_copy", None)
    if cached is not None and cached[0] == device and cached[3] is ds.labels:
        return cached[1], cached[2]
    images, labels = ds.images.to(device), ds.labels.to(device)
    ds._device_copy = (device, images, labels, ds.labels)
    return images, labels
