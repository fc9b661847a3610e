"""What the loop does with a non-finite loss (`train.nonfinite`): one object per policy.

- `skip` (default): every micro-batch's loss is checked before backward, all ranks agreeing (a
  lone skip would deadlock DDP), and a non-finite one is skipped; `train.max_nonfinite` in a row
  stop the run. One small all-reduce plus one host sync per micro-batch.
- `stop`: never waits for the loss. Each rank counts non-finite losses into a device tensor; the
  count is summed over ranks only where the loop already talks to the host: the log step's
  reduce (it rides along), before every checkpoint (`check_all`, collective) and at the epoch's
  end. Without a skip one NaN poisons the weights, so the first check that finds a count stops
  the run (exit 3): no weights from after a non-finite step are ever saved or evaluated.
"""

from __future__ import annotations

from typing import List

import torch

from toolkit.engine.state import TrainState
from toolkit.errors import NonFiniteLossError


class NonFinitePolicy:
    """The loop's questions: `start` (an epoch begins), `skip` (this micro-batch's loss?),
    `pending` (a (1,) tensor to sum over ranks at the log step), `check` (that sum),
    `check_all` (collective check before a checkpoint)."""

    accelerator = None
    _zero: torch.Tensor

    def start(self, accelerator, state: TrainState) -> None:
        self.accelerator = accelerator
        self._zero = torch.zeros(1, dtype=torch.float64, device=accelerator.device)

    def skip(self, loss: torch.Tensor, state: TrainState, tracker) -> bool:
        raise NotImplementedError

    def pending(self) -> torch.Tensor:
        return self._zero

    def check(self, summed: List[float], state: TrainState) -> None:
        pass

    def check_all(self, state: TrainState) -> None:
        pass


class SkipNonFinite(NonFinitePolicy):
    def __init__(self, max_in_row: int = 10):
        self.max_in_row = max_in_row

    def skip(self, loss: torch.Tensor, state: TrainState, tracker) -> bool:
        finite = torch.isfinite(loss.detach())
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce((~finite).float(), reduction="sum").item() > 0
        else:
            bad = not finite.item()
        if not bad:
            return False
        state.nonfinite_run += 1
        state.nonfinite_total += 1
        tracker.print(f"non-finite loss at step {state.step + 1}: skipped "
                      f"({state.nonfinite_run}/{self.max_in_row} in a row)")
        if state.nonfinite_run >= self.max_in_row:
            raise NonFiniteLossError(
                f"loss was non-finite for {state.nonfinite_run} steps in a row "
                f"(train.max_nonfinite={self.max_in_row}); stopped at step {state.step}, "
                "checkpoints left as they were")
        return True


class StopOnNonFinite(NonFinitePolicy):
    def start(self, accelerator, state: TrainState) -> None:
        super().start(accelerator, state)
        self.bad = self._zero.clone()  # non-finite losses on this rank, not yet checked
        self.checked_step = state.step

    def skip(self, loss: torch.Tensor, state: TrainState, tracker) -> bool:
        self.bad.add_(~torch.isfinite(loss.detach()))  # counted on the device: no host sync here
        return False

    def pending(self) -> torch.Tensor:
        return self.bad

    def check(self, summed: List[float], state: TrainState) -> None:
        """`summed`: [bad] summed over ranks; every rank calls this at the same step."""
        bad = summed[0]
        if bad > 0:
            raise NonFiniteLossError(
                f"loss was non-finite between steps {self.checked_step + 1} and {state.step} ({bad:.0f} "
                f"non-finite micro-batch losses over {self.accelerator.num_processes} rank(s); "
                f"train.nonfinite=stop); stopped at step {state.step}, checkpoints left as they were "
                f"(the newest is from before step {self.checked_step + 1})")
        self.checked_step = state.step

    def check_all(self, state: TrainState) -> None:
        self.check(self.accelerator.reduce(self.bad, reduction="sum").tolist(), state)


def make_policy(mode: str, max_in_row: int) -> NonFinitePolicy:
    """`train.nonfinite` and `train.max_nonfinite` -> the policy object."""
    return StopOnNonFinite() if mode == "stop" else SkipNonFinite(max_in_row)
