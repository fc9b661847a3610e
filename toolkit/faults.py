"""Fault injection for the test suite: the failures a real run meets, on demand.

Set through environment variables, read once per run; all are off unless set.
  TOOLKIT_FAULT_KILL_AT_STEP=N[@RANK]    SIGKILL this process right after optimizer step N
  TOOLKIT_FAULT_RAISE_AT_STEP=N[@RANK]   raise RuntimeError right after optimizer step N
  TOOLKIT_FAULT_NONFINITE_STEPS=A-B[@RANK]  make the loss NaN for optimizer steps A..B (1-based)
  TOOLKIT_FAULT_KILL_AT_SHARD=N[@RANK]   extraction: SIGKILL this process right after it wrote its Nth shard
  TOOLKIT_FAULT_STEP_SLEEP=SECONDS       sleep after every optimizer step (a slow run, to interrupt)
  TOOLKIT_FAULT_NO_SPACE=PATTERN[#K]     the Kth write (default 1st) to a path ending in PATTERN (a glob:
                                         `metrics.jsonl`, `summary.json`, `checkpoints/step_8`) fails with
                                         ENOSPC after its data went to the temp file: a full disk
RANK defaults to every rank. Steps count optimizer updates over the whole run. NO_SPACE is read at
each write (toolkit.rundir and toolkit.checkpoint ask only when it is set).
"""

from __future__ import annotations

import errno
import fnmatch
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch


def _split_rank(value: Optional[str]) -> Tuple[str, Optional[int]]:
    """"X@R" -> ("X", R); "X" -> ("X", None): the rank a fault applies to (None: every rank)."""
    head, _, rank = (value or "").partition("@")
    return head, (int(rank) if rank else None)


def _at(value: Optional[str]) -> Optional[Tuple[int, Optional[int]]]:
    step, rank = _split_rank(value)
    return (int(step), rank) if step else None


def _range(value: Optional[str]) -> Optional[Tuple[int, int]]:
    if not value:
        return None
    a, _, b = value.partition("-")
    return int(a), int(b or a)


@dataclass
class Faults:
    kill: Optional[Tuple[int, Optional[int]]] = None
    raise_: Optional[Tuple[int, Optional[int]]] = None
    nonfinite: Optional[Tuple[int, int]] = None
    nonfinite_rank: Optional[int] = None  # None: every rank
    kill_shard: Optional[Tuple[int, Optional[int]]] = None
    step_sleep: float = 0.0

    @classmethod
    def from_env(cls) -> "Faults":
        env = os.environ
        nonfinite, nonfinite_rank = _split_rank(env.get("TOOLKIT_FAULT_NONFINITE_STEPS"))
        return cls(kill=_at(env.get("TOOLKIT_FAULT_KILL_AT_STEP")),
                   raise_=_at(env.get("TOOLKIT_FAULT_RAISE_AT_STEP")),
                   nonfinite=_range(nonfinite), nonfinite_rank=nonfinite_rank,
                   kill_shard=_at(env.get("TOOLKIT_FAULT_KILL_AT_SHARD")),
                   step_sleep=float(env.get("TOOLKIT_FAULT_STEP_SLEEP") or 0))

    def loss(self, loss: torch.Tensor, step: int, rank: int = 0) -> torch.Tensor:
        """`step`: the 1-based optimizer step this micro-batch contributes to."""
        if (self.nonfinite and self.nonfinite[0] <= step <= self.nonfinite[1]
                and self.nonfinite_rank in (None, rank)):
            return loss * float("nan")
        return loss

    def after_step(self, step: int, rank: int) -> None:
        if self.step_sleep:
            time.sleep(self.step_sleep)
        if self.kill and self.kill[0] == step and self.kill[1] in (None, rank):
            os.kill(os.getpid(), signal.SIGKILL)
        if self.raise_ and self.raise_[0] == step and self.raise_[1] in (None, rank):
            raise RuntimeError(f"injected failure on rank {rank} at step {step}")

    def after_shard(self, written: int, rank: int) -> None:
        """`written`: shards this process has written in this run, 1-based."""
        if self.kill_shard and self.kill_shard[0] == written and self.kill_shard[1] in (None, rank):
            os.kill(os.getpid(), signal.SIGKILL)


_no_space_seen: Dict[str, int] = {}  # PATTERN -> matching writes so far in this process


def no_space(path: Union[str, Path]) -> None:
    """Raise OSError(ENOSPC) as the write to `path` would on a full disk, if
    TOOLKIT_FAULT_NO_SPACE names it (see the module docstring)."""
    pattern, _, k = (os.environ.get("TOOLKIT_FAULT_NO_SPACE") or "").partition("#")
    if not pattern or not fnmatch.fnmatch(str(path), f"*{pattern}"):
        return
    _no_space_seen[pattern] = _no_space_seen.get(pattern, 0) + 1
    if _no_space_seen[pattern] == int(k or 1):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
