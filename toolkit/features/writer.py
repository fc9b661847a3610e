"""Writing shards off the model's critical path.

    writer = ShardWriter(folder, on_written=lambda k: ...)
    writer.submit(k, feats, index, labels, bad)   # feats (n, D) on any device
    writer.close()                                # waits for the last write
"""

from __future__ import annotations

from pathlib import Path

import torch

from toolkit.features import store


class ShardWriter:
    """Writes finished shards on one background thread while the next shard's batches run.

    Writing a shard (safetensors, fsync, sha256, marker) and, on a GPU, waiting for its features
    to reach the host used to stall the model once per shard. Here the device-to-host copy is
    only queued (into pinned memory, a CUDA event marks its end) and the thread waits for it,
    then writes. At most one shard is in flight: `submit` first waits for the previous one and
    then calls `on_written(k)` for it (progress, fault hooks), so memory stays bounded and a
    failed write is raised in the caller at most one shard later. A shard counts as written
    only once its marker is on disk, exactly as before (toolkit.features.store.write_shard)."""

    def __init__(self, folder: Path, on_written) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.folder, self.on_written = folder, on_written
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self.pending = None  # (k, Future)

    def submit(self, k: int, feats: torch.Tensor, index: torch.Tensor, labels: torch.Tensor, bad: list) -> None:
        self.wait()
        ready = None
        if feats.is_cuda:
            host = torch.empty(feats.shape, dtype=feats.dtype, pin_memory=True)  # (n, D)
            host.copy_(feats, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        else:
            host = feats.cpu()
        self.pending = (k, self.pool.submit(self._write, k, host, ready, feats.device, index, labels, bad))

    def _write(self, k: int, host: torch.Tensor, ready, device: torch.device, index, labels, bad) -> None:
        if ready is not None:
            with torch.cuda.device(device):  # this rank's GPU, not a new context on GPU 0
                ready.synchronize()
        store.write_shard(self.folder, k, host, index, labels, bad)

    def wait(self) -> None:
        """Wait for the shard in flight, if any; raise its error; report it written."""
        if self.pending is not None:
            k, future = self.pending
            self.pending = None
            future.result()
            self.on_written(k)

    def close(self) -> None:
        """Wait for the last write (raising its error) and stop the thread."""
        try:
            self.wait()
        finally:
            self.pool.shutdown(wait=True)

    def abandon(self) -> None:
        """On the way out with another error: let the write in flight finish (a shard is never
        left half-written) without reporting it or letting its own error hide the first one."""
        self.pending = None
        self.pool.shutdown(wait=True)
