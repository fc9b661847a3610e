"""Which training samples a run trains on: a held-out fold (`data.holdout_folds`/`holdout_fold`,
for toolkit.clean's out-of-fold probabilities) and `data.exclude` (a label_issues.csv).

    selection = select_training(splits, cfg.data)   # in fit.load_data, after label noise
    selection.write_records(tracker)                # RUN/excluded.json
    selection.write_holdout_probs(...)              # RUN/holdout_probs.safetensors, at the end

Folds are stratified by the labels the run trains with (after label noise: they are the
"given" labels a label-error finder judges) and seeded by data.split_seed, so every fold run of
one clean job, whatever its run.seed, cuts the same folds. Indices everywhere are positions in
the training split as the dataset builds it (the numbering of RUN/label_noise.json).
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch.utils.data import DataLoader

from toolkit import rundir
from toolkit.config import DataConfig
from toolkit.data.base import collate_for
from toolkit.data.subset import source_index, take
from toolkit.errors import ConfigError
from toolkit.models import set_train_mode


def assign_folds(labels: torch.Tensor, folds: int, seed: int) -> torch.Tensor:
    """(N,) int64 fold of each sample: within each class a seeded shuffle dealt round-robin,
    continuing from where the previous class stopped, so fold sizes differ by at most one and
    each class is spread as evenly as its size allows."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + 104_729)
    out = torch.empty(len(labels), dtype=torch.int64)
    start = 0
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(len(members), generator=g)]
        out[members] = (torch.arange(len(members)) + start) % folds
        start += len(members)
    return out


def check_folds(labels: torch.Tensor, folds: int, class_names: List[str]) -> None:
    """Every fold must hold every class present: K may not exceed the smallest class."""
    classes, counts = torch.unique(labels, return_counts=True)
    smallest = int(counts.argmin())
    if folds > int(counts[smallest]):
        name = class_names[int(classes[smallest])] if int(classes[smallest]) < len(class_names) else classes[smallest]
        raise ConfigError(f"config: data.holdout_folds: {folds} folds need at least {folds} training samples of "
                          f"every class; class {name!r} has {int(counts[smallest])} (lower the folds or data.limit)")


def read_exclusions(path: str, top: Optional[int], labels: torch.Tensor) -> Dict[str, Any]:
    """data.exclude's CSV -> the record of what is left out (RUN/excluded.json). The file must
    be toolkit.clean's: an `index` column of training indices, and where it has a `given`
    column, the labels this run trains with at those indices (else it came from other data)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config: data.exclude: no such file: {path}")
    try:
        with p.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ConfigError(f"config: data.exclude: {path} is not a readable CSV ({type(e).__name__})") from None
    if rows and "index" not in rows[0]:
        raise ConfigError(f"config: data.exclude: {path} has no `index` column (expected toolkit.clean's "
                          f"{rundir.LABEL_ISSUES})")
    rows = rows[:top] if top is not None else rows
    n = len(labels)
    index: List[int] = []
    for line, row in enumerate(rows, start=2):
        try:
            i = int(row["index"])
            given = int(row["given"]) if row.get("given") not in (None, "") else None
        except (TypeError, ValueError):
            raise ConfigError(f"config: data.exclude: {path} line {line}: index/given must be integers") from None
        if not 0 <= i < n:
            raise ConfigError(f"config: data.exclude: {path} line {line}: index {i} is outside the training "
                              f"split's 0..{n - 1}")
        if given is not None and given != int(labels[i]):
            raise ConfigError(f"config: data.exclude: {path} line {line}: sample {i} has label {int(labels[i])} "
                              f"here, not {given}: the file was made for other data (dataset, limit, split_seed "
                              "or label_noise)")
        index.append(i)
    index = sorted(set(index))
    return {"source": str(p.absolute()), "sha256": rundir.sha256(p), "top": top, "num_excluded": len(index),
            "index": index}


@dataclasses.dataclass
class Selection:
    """What select_training left out of the training split."""

    folds: int = 0
    fold: int = 0
    holdout: Any = None  # the held-out fold's rows of the training split (a dataset), or None
    excluded: Optional[Dict[str, Any]] = None  # the RUN/excluded.json record, or None

    def summary_fields(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"num_excluded": self.excluded["num_excluded"] if self.excluded else 0}
        if self.holdout is not None:
            out.update(holdout_folds=self.folds, holdout_fold=self.fold, num_held_out=len(self.holdout))
        return out

    def write_records(self, tracker) -> None:
        if self.excluded is not None:
            tracker.write_text(rundir.EXCLUDED, json.dumps(self.excluded) + "\n")

    def write_holdout_probs(self, tracker, model, accelerator, batch_size: int, num_workers: int,
                            channels_last: bool, tta: str) -> None:
        """RUN/holdout_probs.safetensors: index (n,) int64 training indices, labels (n,) int64
        the labels trained with, probs (n, C) float32 softmax of `model` (the final weights) on the
        unaugmented images. Exact under any world size (gather_for_metrics drops the padding)."""
        if self.holdout is None:
            return
        loader = accelerator.prepare(DataLoader(self.holdout, batch_size=batch_size, shuffle=False,
                                                collate_fn=collate_for(self.holdout), num_workers=num_workers))
        probs = predict_probs(model, loader, accelerator, channels_last, tta)  # (n, model outputs)
        tracker.save_tensors(rundir.HOLDOUT_PROBS, {"index": source_index(self.holdout).contiguous(),
                                                    "labels": self.holdout.labels.contiguous(),
                                                    "probs": probs.contiguous()})


@torch.no_grad()
def predict_probs(model, loader, accelerator, channels_last: bool = False, tta: str = "none") -> torch.Tensor:
    """(N, C) float32 softmax over a prepared loader of (x, y), in the loader's order, on the CPU.
    The logits as evaluate() computes them (autocast, channels_last, tta=flip averaging)."""
    model.eval()
    parts = []
    for x, _y in loader:
        x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        with accelerator.autocast():
            logits = model(x).float()  # (B, C)
            if tta == "flip":
                logits = (logits + model(x.flip(3)).float()) / 2
        parts.append(accelerator.gather_for_metrics(logits.softmax(dim=1)).cpu())
    set_train_mode(model)
    return torch.cat(parts)


def select_training(splits, d: DataConfig) -> Selection:
    """Drop the held-out fold and the excluded samples from `splits.train` (in place: the
    Splits gets the smaller dataset). Runs after label noise, before anything reads the split."""
    sel = Selection(folds=d.holdout_folds, fold=d.holdout_fold)
    if not d.holdout_folds and d.exclude is None:
        return sel
    labels = getattr(splits.train, "labels", None)
    if not isinstance(labels, torch.Tensor):
        raise ConfigError(f"config: data: dataset {d.name!r} does not expose its labels (holdout_folds, exclude)")
    keep = torch.ones(len(labels), dtype=torch.bool)
    if d.holdout_folds:
        check_folds(labels, d.holdout_folds, list(splits.class_names))
        held = assign_folds(labels, d.holdout_folds, d.split_seed) == d.holdout_fold
        sel.holdout = take(splits.train, torch.nonzero(held).flatten())
        keep &= ~held
    if d.exclude is not None:
        sel.excluded = read_exclusions(d.exclude, d.exclude_top, labels)
        keep[torch.as_tensor(sel.excluded["index"], dtype=torch.int64)] = False
    if not keep.any():
        raise ConfigError("config: data.exclude: it leaves no training samples")
    splits.train = take(splits.train, torch.nonzero(keep).flatten())
    return sel
