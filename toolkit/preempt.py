"""Stop requests for long runs: SIGUSR1, SIGTERM, or a `.preempt` file in the output directory.

SLURM warns a job before preemption or its time limit with a signal (`#SBATCH --signal`); the
batch script turns it into a file every rank can see (slurm/lib.sh), since a signal does not
cross accelerate's launcher to the worker processes.
"""

from __future__ import annotations

import functools
import signal
import threading
from pathlib import Path
from typing import Optional

import torch

from toolkit.errors import PreemptedError


class Preemption:
    """Stop requests: SIGUSR1 (SLURM's warning before preemption or the time limit), a
    RUN/.preempt file (what slurm/train.sh writes when its batch shell gets the signal, so no
    signal has to cross accelerate's launcher), and SIGTERM. Every `every` updates the ranks
    agree (one all-reduce of one number) so that they all stop after the same step."""

    PREEMPT, TERM = 1.0, 2.0

    def __init__(self, accelerator, run_dir: Path, every: int = 1):
        self.accelerator, self.file, self.every = accelerator, run_dir / ".preempt", every
        self.local = 0.0
        self._old = {}
        if threading.current_thread() is threading.main_thread():  # (not in a Ray Tune thread)
            for sig, level in ((signal.SIGUSR1, self.PREEMPT), (signal.SIGTERM, self.TERM)):
                self._old[sig] = signal.signal(sig, functools.partial(self._on_signal, level))

    def _on_signal(self, level: float, *_):
        self.local = max(self.local, level)

    def requested(self, step: Optional[int] = None) -> float:
        """0, PREEMPT or TERM, the same on every rank. Collective when step % every == 0 or
        step is None (an epoch boundary)."""
        if step is not None and step % self.every:
            return 0.0
        level = self.local
        if self.accelerator.is_main_process and self.file.exists():
            level = max(level, self.PREEMPT)
        if self.accelerator.num_processes > 1:
            t = torch.tensor([level], device=self.accelerator.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            level = float(t[0])
        return level

    def seen_locally(self) -> float:
        """This rank's view, no collective: for work whose ranks do not move in step."""
        return max(self.local, self.PREEMPT if self.file.exists() else 0.0)

    def stop(self, level: float, st, saved: Path) -> None:
        if self.accelerator.is_main_process:
            self.file.unlink(missing_ok=True)  # acted on: the resumed run must not stop again
        where = f"epoch {st.epoch + 1}, batch {st.batch}, step {st.step}"
        why = "SIGTERM" if level == self.TERM else "a preemption request"
        raise PreemptedError(f"stopped on {why} after saving {saved} ({where}); continue with "
                             f"train.resume=auto run.dir={saved.parent.parent}",
                             143 if level == self.TERM else 4)

    def close(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
