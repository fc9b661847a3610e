"""The best epoch (by `train.monitor`), its weights, and early stopping.

    tracker = BestEpoch(monitor="val_acc", patience=3, min_delta=0.0)
    improved = tracker.update(row, state)         # after each epoch's validation
    if improved: weights = copy_weights(...)      # kept for RUN/model_best.safetensors
    if tracker.should_stop(state): ...            # early stopping

Two notions, as Lightning keeps them apart (ModelCheckpoint vs EarlyStopping):
- the best epoch of the whole run: any improvement of the monitored metric counts; its weights
  become RUN/model_best.safetensors;
- early stopping: the monitored metric must beat the best of the current stage by more than
  `min_delta` within `patience` epochs, or the stage stops (the next stage, if any, starts).
Both live in TrainState, so a resumed run makes the same decisions as an uninterrupted one.
Every rank sees the same validation numbers (evaluation gathers the whole split), so every rank
decides alike without a collective.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from accelerate import Accelerator
from torch import nn

from toolkit.engine.state import TrainState

MODES = {"val_acc": "max", "val_loss": "min"}


def better(value: float, than: Optional[float], mode: str, by: float = 0.0) -> bool:
    """value beats `than` (None: nothing to beat) by more than `by` in the direction of `mode`."""
    if than is None:
        return True
    return value > than + by if mode == "max" else value < than - by


class BestEpoch:
    def __init__(self, monitor: str, patience: int, min_delta: float):
        self.monitor, self.mode = monitor, MODES[monitor]
        self.patience, self.min_delta = patience, min_delta

    def update(self, row: Dict[str, Any], state: TrainState) -> bool:
        """Record epoch `row` (its metrics); True when it is the run's best epoch so far."""
        value = float(row[self.monitor])
        improved = better(value, state.best_metric, self.mode)
        if improved:
            state.best_metric, state.best_metric_epoch = value, int(row["epoch"])
        if better(value, state.stage_best, self.mode, self.min_delta):
            state.stage_best, state.epochs_without_improvement = value, 0
        else:
            state.epochs_without_improvement += 1
        return improved

    def should_stop(self, state: TrainState) -> bool:
        return self.patience > 0 and state.epochs_without_improvement >= self.patience

    def reason(self, state: TrainState) -> str:
        return (f"{self.monitor} did not improve by more than {self.min_delta:g} for {self.patience} epoch(s) "
                f"(stage best {state.stage_best:.4f})")

    @staticmethod
    def new_stage(state: TrainState) -> None:
        """Early stopping counts within a stage: a new stage starts with a clean slate."""
        state.stage_best, state.epochs_without_improvement = None, 0


def copy_weights(accelerator: Accelerator, model: nn.Module) -> Dict[str, torch.Tensor]:
    """The model's weights as CPU tensors (a copy). Collective under DeepSpeed ZeRO-3 (it gathers
    the shards), so every rank calls it; every rank keeps the copy, rank 0 writes it."""
    state = accelerator.get_state_dict(model)
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
