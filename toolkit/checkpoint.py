"""Atomic, verifiable checkpoints on top of Accelerate's save_state/load_state.

Layout: RUN/checkpoints/step_N/ holds Accelerate's state (model in safetensors, optimizer,
scheduler, scaler, every rank's RNG), trainer_state.json (epoch, position in the epoch, best
metric), config.yaml, and COMPLETE.json: the size and SHA-256 of every file. A checkpoint is
written to `.tmp-step_N` and renamed only when complete, so a crash mid-save never leaves a
directory that looks complete (and a full disk removes it: one DiskFullError line); a truncated or altered file fails the checksum at resume and
the previous checkpoint is used. Loading goes through Accelerate, which reads safetensors and
`torch.load(weights_only=True)` only.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from safetensors.torch import save_file

from toolkit.errors import DiskFullError, disk_full
from toolkit.rundir import CONFIG, replace_dir, sha256, write_atomic_text

MARKER = "COMPLETE.json"
STATE = "trainer_state.json"
PREFIX = "step_"
OLD = f".old-{PREFIX}"  # a replaced checkpoint, for the moment between two renames


def step_of(path: Path) -> int:
    name = path.name[len(OLD):] if path.name.startswith(OLD) else path.name[len(PREFIX):]
    try:
        return int(name) if path.name.startswith((PREFIX, OLD)) else -1
    except ValueError:
        return -1


def list_checkpoints(root: Path) -> List[Path]:
    """Checkpoint directories (complete or not), newest step first. A `.old-step_N` left by a
    crash between the two renames of a re-save stands in for a missing `step_N`."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and step_of(p) >= 0]
    steps = {step_of(p) for p in dirs if p.name.startswith(PREFIX)}
    dirs = [p for p in dirs if p.name.startswith(PREFIX) or step_of(p) not in steps]
    return sorted(dirs, key=step_of, reverse=True)


def verify(path: Path) -> Optional[str]:
    """None when the checkpoint is complete and intact, else the reason it is not."""
    marker = path / MARKER
    if not marker.is_file():
        return "no completion marker (save was interrupted)"
    try:
        files = json.loads(marker.read_text())["files"]
        expected = [(str(name), int(info["size"]), str(info["sha256"])) for name, info in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError):
        return "completion marker is unreadable"
    for name, size, sha in expected:
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} is truncated or resized ({f.stat().st_size} of {size} bytes)"
        if sha256(f) != sha:
            return f"{name} fails its checksum"
    return None


def find_resumable(root: Path) -> Tuple[Optional[Path], List[Tuple[Path, str]]]:
    """The newest intact checkpoint under root, and the newer ones skipped with their reasons."""
    skipped = []
    for path in list_checkpoints(root):
        reason = verify(path)
        if reason is None:
            return path, skipped
        skipped.append((path, reason))
    return None, skipped


def read_state(path: Path) -> Dict[str, Any]:
    return json.loads((path / STATE).read_text())


def save(accelerator, root: Path, step: int, state: Dict[str, Any], config_yaml: str,
         keep_last: int, extra: Optional[Dict[str, Dict[str, Any]]] = None) -> Path:
    """Collective: every rank must call it. Returns the final checkpoint directory.

    extra: {file name: {name: tensor}} written by rank 0 as safetensors beside Accelerate's
    state (the EMA weights), covered by the completion marker like every other file."""
    final = root / f"{PREFIX}{step}"
    tmp = root / f".tmp-{PREFIX}{step}"
    try:
        _write(accelerator, tmp, final, step, state, config_yaml, extra)
    except Exception as e:
        # Judged before the half-written directory is removed: its bytes are what filled the disk.
        full = disk_full(e, final)
        shutil.rmtree(tmp, ignore_errors=True)  # whichever rank failed: never leave a half checkpoint
        if full is None:
            raise
        raise DiskFullError(final, full.reason, "; the half-written checkpoint was removed and earlier ones are "
                            f"intact: free space, then continue with train.resume=auto run.dir={root.parent}") from e
    if accelerator.is_main_process:
        # (final exists when the same step is saved again after resuming past a bad checkpoint)
        replace_dir(tmp, final, root / f"{OLD}{step}")
        _prune(root, keep_last)
    accelerator.wait_for_everyone()
    return final


def _write(accelerator, tmp: Path, final: Path, step: int, state: Dict[str, Any], config_yaml: str,
           extra: Optional[Dict[str, Dict[str, Any]]]) -> None:
    """Everything of checkpoint `step` into `tmp`, its completion marker last. Collective."""
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)  # every rank writes its own RNG file
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_atomic_text(tmp / STATE, json.dumps(state, indent=1))
        write_atomic_text(tmp / CONFIG, config_yaml)
        for name, tensors in (extra or {}).items():
            save_file(tensors, str(tmp / name))
        if os.environ.get("TOOLKIT_FAULT_NO_SPACE"):  # the suite's full disk, once the big files are written
            from toolkit.faults import no_space

            no_space(final)
        files = {str(f.relative_to(tmp)): {"size": f.stat().st_size, "sha256": sha256(f)}
                 for f in sorted(tmp.rglob("*")) if f.is_file()}
        write_atomic_text(tmp / MARKER, json.dumps({"step": step, "files": files}, indent=1))


def _prune(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last`. Resume moves checkpoints newer than its starting point
    aside first, so the one just saved is always the newest and is never pruned."""
    checkpoints = list_checkpoints(root)
    for path in checkpoints[keep_last:]:
        shutil.rmtree(path, ignore_errors=True)
    kept = set(checkpoints[:keep_last])
    for leftover in [*root.glob(f".tmp-{PREFIX}*"), *root.glob(f"{OLD}*")]:  # from earlier crashes
        if leftover not in kept:
            shutil.rmtree(leftover, ignore_errors=True)
