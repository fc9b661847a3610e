"""Stop requests for long runs: Ctrl-C, SIGUSR1, SIGTERM, or a `.preempt` file in the output directory.

SLURM warns a job before preemption or its time limit with a signal (`#SBATCH --signal`); the
batch script turns it into a file every rank can see (slurm/lib.sh), since a signal does not
cross accelerate's launcher to the worker processes.

Ctrl-C is a stop request too: the first one saves a mid-epoch checkpoint like SIGTERM and exits
130, so an interrupted epoch is never lost; a second one stops at once (KeyboardInterrupt).
"""

from __future__ import annotations

import functools
import os
import signal
import threading
from pathlib import Path
from typing import Optional

import torch

from toolkit.errors import PreemptedError


class Preemption:
    """Stop requests: SIGUSR1 (SLURM's warning before preemption or the time limit), a
    RUN/.preempt file (what slurm/train.sh writes when its batch shell gets the signal, so no
    signal has to cross accelerate's launcher), SIGTERM, and a first Ctrl-C (SIGINT). Every
    `every` updates the ranks agree (one all-reduce of one number) so that they all stop after
    the same step. Levels are ordered so that MAX across ranks keeps the most urgent one."""

    PREEMPT, TERM, INT = 1.0, 2.0, 3.0

    def __init__(self, accelerator, run_dir: Path, every: int = 1, catch_interrupt: bool = True):
        self.accelerator, self.file, self.every = accelerator, run_dir / ".preempt", every
        self.local = 0.0
        self._old = {}
        if threading.current_thread() is not threading.main_thread():  # (a Ray Tune thread: Ray owns signals)
            return
        levels = [(signal.SIGUSR1, self.PREEMPT), (signal.SIGTERM, self.TERM)]
        # Only where Ctrl-C would raise KeyboardInterrupt: a launcher that set SIGINT to be
        # ignored (nohup, a background job of a non-interactive shell) keeps it ignored.
        if catch_interrupt and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            levels.append((signal.SIGINT, self.INT))
        for sig, level in levels:
            self._old[sig] = signal.signal(sig, functools.partial(self._on_signal, level))

    def _on_signal(self, level: float, *_):
        if level == self.INT and self.local >= self.INT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, whatever is in flight
        if level == self.INT and self.accelerator.is_main_process:
            # os.write, not print: a handler runs between two bytecodes, maybe inside a print.
            os.write(2, b"\ninterrupted: saving a checkpoint at the next step, then stopping "
                        b"(Ctrl-C again stops at once, without saving)\n")
        self.local = max(self.local, level)

    def requested(self, step: Optional[int] = None) -> float:
        """0, PREEMPT, TERM or INT, the same on every rank. Collective when step % every == 0 or
        step is None (an epoch boundary). One process acts on its own signals at the next step
        whatever `every` is: after a Ctrl-C the user is waiting at the terminal."""
        if step is not None and step % self.every:
            # Between agreed steps only a lone process may act on its own signal: ranks of a
            # group must stop after the same step.
            return self.local if self.accelerator.num_processes == 1 else 0.0
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

    @classmethod
    def why(cls, level: float) -> str:
        """What asked for the stop, for the one line the user reads."""
        return {cls.INT: "Ctrl-C", cls.TERM: "SIGTERM"}.get(level, "a preemption request")

    @classmethod
    def exit_code(cls, level: float) -> int:
        """130 for Ctrl-C and 143 for SIGTERM, as a process ended by that signal reports
        (128 + signal number); 4 for a preemption request."""
        return {cls.INT: 130, cls.TERM: 143}.get(level, 4)

    def stop(self, level: float, st, saved: Path) -> None:
        if self.accelerator.is_main_process:
            self.file.unlink(missing_ok=True)  # acted on: the resumed run must not stop again
        where = f"epoch {st.epoch + 1}, batch {st.batch}, step {st.step}"
        raise PreemptedError(f"stopped on {self.why(level)} after saving {saved} ({where}); continue with "
                             f"train.resume=auto run.dir={saved.parent.parent}", self.exit_code(level),
                             label="interrupted" if level == self.INT else "preempted")

    def close(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
