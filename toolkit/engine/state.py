"""TrainState: where a run is, beyond Accelerate's own state. Saved as JSON in every checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List


@dataclass
class TrainState:
    epoch: int = 0  # epoch in progress
    batch: int = 0  # loader batches of `epoch` already consumed
    step: int = 0  # optimizer updates so far
    best_val_acc: float = -1.0
    best_epoch: int = -1
    nonfinite_run: int = 0  # consecutive non-finite steps
    nonfinite_total: int = 0
    images: int = 0  # training images seen, all ranks
    train_time_s: float = 0.0
    epoch_sums: List[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # loss*n, correct, n
    log_sums: List[float] = field(default_factory=lambda: [0.0, 0.0])  # loss*n, n since the last log
