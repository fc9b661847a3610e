"""TrainState: where a run is, beyond Accelerate's own state. Saved as JSON in every checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import List, Optional

from toolkit.checkpoint import STATE, read_state
from toolkit.errors import ToolkitError


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
    warmup_images: int = 0  # images and training time of the run's first epoch (cuDNN autotuning,
    warmup_time_s: float = 0.0  # compilation, first allocations), left out of the steady rate
    best_metric: Optional[float] = None  # train.monitor's best value so far (the run's best epoch)
    best_metric_epoch: int = -1
    stage_best: Optional[float] = None  # early stopping: the best of the current stage, and the
    epochs_without_improvement: int = 0  # epochs since it improved by more than min_delta
    stopped_early: int = 0  # the epoch after which early stopping ended the run (0: it did not)
    lr: float = 0.0  # the learning rate the last update used (what the logs show), first param group
    precision: Optional[str] = None  # the precision and channels_last the run trains with, `auto` resolved:
    channels_last: Optional[bool] = None  # a resumed `auto` run keeps them (toolkit/fast.py)

    @classmethod
    def load(cls, checkpoint_dir: Path) -> "TrainState":
        """The state saved in a checkpoint; a key this version does not know is one line naming
        the file (a checkpoint written by another version of the toolkit)."""
        saved = read_state(checkpoint_dir)
        unknown = sorted(set(saved) - {f.name for f in fields(cls)})
        if unknown:
            raise ToolkitError(f"cannot resume from {checkpoint_dir}: {checkpoint_dir / STATE} has key(s) "
                               f"{', '.join(unknown)} that this version of the toolkit does not know "
                               "(written by another version?)")
        return cls(**saved)
