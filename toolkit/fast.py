"""`auto` precision and channels_last, resolved for the device this process runs on.

    prec = resolve_precision(cfg.train.precision)              # Resolved("bf16", "auto", "auto: CUDA with bf16")
    cl = resolve_channels_last(cfg.train.channels_last, model)  # Resolved(True, "auto", "auto: convolutional ...")
    print(f"precision {prec.describe()}")                       # "precision no (auto: no CUDA)"

Why these defaults: on a GPU, bf16 autocast and channels_last are where ResNet-50 training's 5.9x
over fp32 comes from (docs/benchmarks.md, "One H100"); on a CPU bf16 costs about 4x (no bf16 units
on most) and channels_last gains nothing, so `auto` is fp32 and contiguous there: CPU runs, and
every exactness test, are what they were before `auto` existed.

A config keeps the word `auto` (config.yaml, every checkpoint), and each process resolves it for
its own device. A resumed run passes what its checkpoint was trained with (`recorded`): an `auto`
run continues with those values wherever it resumes, so a resume never changes the numerics of a
run; only where the recorded value cannot run here (bf16 on a GPU without it) does this process
choose again, and `changed` says so for the log.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn

AUTO = "auto"


@dataclass(frozen=True)
class Resolved:
    """One setting as it runs: `value` ("no" | "bf16" | "fp16", or a bool for channels_last),
    what the config asked, why (None when asked explicitly), and, on a resume that could not keep
    the checkpoint's value, that value (`changed`)."""

    value: Union[str, bool]
    asked: str
    why: Optional[str] = None
    changed: Optional[Union[str, bool]] = None

    def describe(self) -> str:
        """The value, and where it came from: "bf16 (auto: CUDA with bf16)", "no"."""
        shown = _word(self.value)
        return f"{shown} ({self.why})" if self.why else shown


def _word(value: Union[str, bool]) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def cuda_bf16() -> tuple[bool, bool]:
    """(CUDA is available, this GPU does bf16): asked of torch each time, so tests can mock it."""
    cuda = torch.cuda.is_available()
    return cuda, cuda and torch.cuda.is_bf16_supported()


def resolve_precision(asked: str, recorded: Optional[str] = None, kept_from: str = "the checkpoint") -> Resolved:
    """`train.precision` / `extract.precision` -> what autocast runs. `recorded`: the resolved
    precision of the checkpoint a run resumes, or of the shards a rerun keeps (`kept_from` names
    which, for the log); None for a fresh start."""
    asked = str(asked)
    if asked != AUTO:
        return Resolved(asked, asked)
    cuda, bf16 = cuda_bf16()
    if recorded is not None:
        if recorded == "no" or (recorded == "bf16" and (bf16 or not cuda)):  # bf16 autocast runs on any CPU
            return Resolved(recorded, asked, f"auto: kept from {kept_from}")
        changed = recorded
    else:
        changed = None
    if bf16:
        return Resolved("bf16", asked, "auto: CUDA with bf16", changed)
    return Resolved("no", asked, "auto: this GPU has no bf16" if cuda else "auto: no CUDA", changed)


def is_convolutional(model: nn.Module) -> bool:
    """Whether channels_last can pay: the model has a 2-D convolution (the layer whose NHWC
    kernels are faster on tensor cores). An MLP or a transformer has none."""
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def resolve_channels_last(asked: Any, model: nn.Module, recorded: Optional[bool] = None,
                          kept_from: str = "the checkpoint") -> Resolved:
    """`train.channels_last` / `extract.channels_last` (auto | true | false) -> bool. `recorded`,
    `kept_from`: as for resolve_precision."""
    asked = str(asked)
    if asked != AUTO:
        return Resolved(asked == "true", asked)
    if recorded is not None:  # a memory format runs anywhere: the checkpoint's is always kept
        return Resolved(bool(recorded), asked, f"auto: kept from {kept_from}")
    if not torch.cuda.is_available():
        return Resolved(False, asked, "auto: no CUDA")
    if is_convolutional(model):
        return Resolved(True, asked, "auto: convolutional net on CUDA")
    return Resolved(False, asked, "auto: no Conv2d in the model")


def change_note(key: str, r: Resolved, kept_from: str = "the checkpoint") -> Optional[str]:
    """The warning for a resume that could not keep the recorded value, else None."""
    if r.changed is None:
        return None
    return (f"{key}: {kept_from} used {_word(r.changed)}, which cannot run on this device; "
            f"continuing with {r.describe()}")


def summary_fields(key: str, r: Resolved) -> dict:
    """What summary.json / meta.json record of a setting: the value it ran with and the asked word."""
    return {key: r.value, f"{key}_asked": r.asked}


def with_resolved(cfg: Any, section: str, precision: Optional[str] = None,
                  channels_last: Optional[bool] = None) -> Any:
    """A copy of `cfg` (Config: section "train"; ExtractConfig: "extract") with the resolved
    values in place of `auto`, for the code that runs with them; the asked config stays the
    record (config.yaml, checkpoints)."""
    import dataclasses

    from toolkit.config import Precision, Switch

    changes: dict = {}
    if precision is not None:
        changes["precision"] = Precision(precision)
    if channels_last is not None:
        changes["channels_last"] = Switch.true if channels_last else Switch.false
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)})
