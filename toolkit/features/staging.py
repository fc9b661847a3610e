"""Batches of an in-memory set on their way to a GPU, copied while the model runs.

    for x, idx in streamed_batches(images, batches, device):   # x (B, C, H, W) on `device`, idx (B,) int64
        ...

Extraction of an in-memory set (digits, cifar, synthetic, prepared) used to copy the whole set to
the device before its first batch (`images.to(device)`): a pageable copy of every image, 3.7 GB
for 24,576 ResNet-50-sized uint8 images, during which the GPU did nothing, and on N ranks every
rank copied all of it. Here each batch is gathered on the host into one of a few pinned buffers
and copied on a side CUDA stream, one batch ahead, so that the copy of batch j+1 runs on the
copy engine while the model computes batch j; each rank copies only its own images, and the
device holds a few batches rather than the set.

Ordering, which makes it safe: the compute stream waits for a batch's copy (an event) before its
first use; the batch's device memory is recorded on the compute stream, so the caching allocator
does not hand it to the next copy until the model is done with it; a pinned buffer is refilled
only once the copy that read it has finished (its event). The bytes are copied, never converted,
so the batches are exactly the set's rows: features are bit for bit those of the whole-set copy.

Without CUDA there is nothing to overlap; the same code runs with plain host buffers and a copy
(`clone`) standing in for the transfer, which is what the CPU tests exercise.
"""

from __future__ import annotations

from typing import Iterator, List, Optional, Sequence, Tuple

import torch

RING = 3  # pinned buffers: one being filled, one being copied, one spare so the host never waits on a copy


class _Staged:
    """One batch on its way: the device tensor and the event its copy ends with (CUDA only)."""

    def __init__(self, x: torch.Tensor, idx: torch.Tensor, done: Optional[torch.cuda.Event]):
        self.x, self.idx, self.done = x, idx, done


class HostStager:
    """A ring of host buffers (pinned on CUDA) of `shape` (max batch, C, H, W), and the copy of a
    gathered batch from one of them to `device`."""

    def __init__(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device, ring: int = RING):
        self.device = device
        self.cuda = device.type == "cuda"
        self.buffers = [torch.empty(tuple(shape), dtype=dtype, pin_memory=self.cuda) for _ in range(ring)]
        self.freed: List[Optional[torch.cuda.Event]] = [None] * ring  # the copy that last read each buffer
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.turn = 0

    def stage(self, images: torch.Tensor, idx: torch.Tensor) -> _Staged:
        """Gather rows `idx` (B,) of `images` (N, C, H, W) into the next buffer and start its copy."""
        k = self.turn % len(self.buffers)
        self.turn += 1
        if self.freed[k] is not None:
            self.freed[k].synchronize()  # the copy that read this buffer is done: refill it
        host = self.buffers[k][:len(idx)]  # (B, C, H, W)
        torch.index_select(images, 0, idx, out=host)
        if not self.cuda:
            return _Staged(host.clone(), idx, None)  # the buffer is refilled later: hand out a copy
        with torch.cuda.stream(self.stream):
            x = host.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        self.freed[k] = done
        return _Staged(x, idx, done)

    def hand_over(self, staged: _Staged) -> torch.Tensor:
        """The batch, for use on the current stream: it waits for the copy; the allocator keeps the
        memory until the current stream's work with it is done."""
        if staged.done is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(staged.done)
            staged.x.record_stream(current)
        return staged.x


def streamed_batches(images: torch.Tensor, batches: Sequence[Sequence[int]],
                     device: torch.device) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """(x on `device`, idx (B,) int64) for each batch of dataset indices, in order, each copied
    while the one before it is used (see the module docstring). `images`: (N, C, H, W) on the host."""
    if not batches:
        return
    biggest = max(len(b) for b in batches)
    stager = HostStager((biggest, *images.shape[1:]), images.dtype, device)
    ahead = stager.stage(images, torch.as_tensor(batches[0], dtype=torch.int64))
    for j in range(len(batches)):
        current = ahead
        if j + 1 < len(batches):  # the next copy starts before this batch is handed to the model
            ahead = stager.stage(images, torch.as_tensor(batches[j + 1], dtype=torch.int64))
        yield stager.hand_over(current), current.idx
