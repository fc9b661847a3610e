"""Every place the toolkit reaches past Accelerate's public API, in one file to re-check when the
`accelerate` pin in pyproject.toml moves. Each function says what it relies on.
"""

from __future__ import annotations

import functools
import pickle
import random
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch
from accelerate import Accelerator
from accelerate.data_loader import DataLoaderStateMixin  # noqa: F401  (the base of DeviceLoader)
from accelerate.optimizer import AcceleratedOptimizer


def cache_package_probe() -> None:
    """Accelerate 1.15 asks importlib whether `lomo_optim` is installed on every optimizer step
    and backward (~0.2 ms each, uncached): 5% of a LeNet step on CPU. Installed packages do not
    change during a run, so answer once. Relies on the module attributes
    `accelerate.optimizer.is_lomo_available` and `accelerate.accelerator.is_lomo_available`;
    where they are gone, nothing is patched. Called by train_epoch, not at import."""
    import accelerate.accelerator as acc_mod
    import accelerate.optimizer as opt_mod

    probe = getattr(opt_mod, "is_lomo_available", None)
    if probe is not None and not hasattr(probe, "cache_info"):
        cached = functools.lru_cache(maxsize=1)(probe)
        opt_mod.is_lomo_available = cached
        if getattr(acc_mod, "is_lomo_available", None) is probe:
            acc_mod.is_lomo_available = cached


def fast_zero_grad(optimizer, accelerator: Accelerator) -> Callable[[], None]:
    """`optimizer.zero_grad(set_to_none=True)` as Accelerate does it, without its cost:
    AcceleratedOptimizer.zero_grad reads the wrapped optimizer's signature with `inspect` on
    every call (~60 us per step on the 2-core VM, a few % of a LeNet step). For a plain
    AcceleratedOptimizer around a torch optimizer this calls the wrapped one (`.optimizer`)
    directly, under the same condition (only when the accumulation window closes); anything
    else (DeepSpeed's wrapper, whose engine clears gradients itself) keeps its own zero_grad."""
    inner = getattr(optimizer, "optimizer", None)
    if type(optimizer) is not AcceleratedOptimizer or not isinstance(inner, torch.optim.Optimizer):
        return lambda: optimizer.zero_grad(set_to_none=True)

    def zero_grad() -> None:
        if accelerator.sync_gradients:
            inner.zero_grad(set_to_none=True)
    return zero_grad


def register_loader(gradient_state, loader) -> None:
    """A loader that is not a prepared DataLoader (toolkit.data.device_loader.DeviceLoader)
    registers with Accelerate's GradientState as a prepared one does when it starts iterating
    (`GradientState._add_dataloader`), so gradient accumulation closes its window on the
    epoch's last batch (`end_of_dataloader`, from DataLoaderStateMixin)."""
    gradient_state._add_dataloader(loader)


def set_logging_dir(accelerator: Accelerator, run_dir: Path) -> None:
    """The run directory is chosen after the Accelerator exists (rank 0 picks, all ranks agree);
    TensorBoard reads `project_configuration.logging_dir` only at `init_trackers`, so it is set
    in between."""
    accelerator.project_configuration.project_dir = str(run_dir)
    accelerator.project_configuration.logging_dir = str(run_dir)


def restore_shared_rng(accelerator: Accelerator, path: Path) -> None:
    """Every rank takes rank 0's RNG state and accumulation counter from a checkpoint.

    All ranks hold the same RNG state by design (same seed, augmentation drawn for the global
    batch), so this equals what Accelerate restored when the world size is unchanged, and it
    stays right when a run resumes on more processes than it was saved with (Accelerate then
    finds no file for the new ranks and silently leaves their state fresh). Relies on
    Accelerate's file name `random_states_0.pkl`, its keys, and `accelerate.utils.other.load`
    (torch.load with weights_only=True and numpy's types allowed)."""
    import numpy as np
    from accelerate.utils.other import load as accelerate_load

    states = accelerate_load(path / "random_states_0.pkl")
    random.setstate(states["random_state"])
    np.random.set_state(states["numpy_random_seed"])
    torch.set_rng_state(states["torch_manual_seed"])
    cuda = states.get("torch_cuda_manual_seed")
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda[0], device=accelerator.device)
    if "step" in states:
        accelerator.step = states["step"]


# The files of a checkpoint that Accelerate's load_state reads with torch.load (optimizer.bin,
# scheduler.bin, sampler.bin, scaler.pt, random_states_N.pkl, custom_checkpoint_N.pkl, and
# pytorch_model.bin when there is no model.safetensors).
PICKLED_STATE_SUFFIXES = (".bin", ".pkl", ".pt", ".pth")


def refused_state_file(path: Path) -> Optional[Tuple[Path, BaseException]]:
    """The first file of checkpoint PATH that Accelerate's loader refuses, with the refusal; None
    when it refuses none. For the error message only: load_state's UnpicklingError does not say
    which file it was reading. Relies on `accelerate.utils.other.load` (torch.load with
    weights_only=True and numpy's types allowed, the loader load_state uses), so nothing is
    unpickled here that load_state would not have unpickled."""
    from accelerate.utils.other import load as accelerate_load

    for f in sorted(path.iterdir()):
        if f.is_file() and f.suffix in PICKLED_STATE_SUFFIXES:
            try:
                accelerate_load(f, map_location="cpu")
            except pickle.UnpicklingError as e:
                return f, e
    return None
