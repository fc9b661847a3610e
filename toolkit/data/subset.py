"""Part of a training split, as a dataset of the same kind: `take(splits.train, index)`.

    kept = take(splits.train, torch.tensor([0, 5, 9]))   # same class, 3 rows; kept.source_index -> [0, 5, 9]

Used by the held-out folds of toolkit.clean and by `data.exclude` (toolkit/engine/holdout.py).
The result is a shallow copy of the dataset whose per-row arrays (images, labels, paths: every
tensor or numpy array attribute with one row per sample) are indexed; everything else is shared.
So it is still what the engine checks for: a TensorImageDataset goes on the device loader
(`isinstance`), `labels` serves the PK sampler and label noise, `device_items`, `device_decode`,
`__getitems__` and `collate` keep their meaning, and an image folder keeps its `paths`. A
wrapper class would hide the type and make the engine fall back to the slower DataLoader.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

SOURCE_INDEX = "source_index"  # (n,) int64: each row's position in the split `take` was first given


def source_index(ds) -> torch.Tensor:
    """Each row's index in the original split ((n,) int64): arange for a whole split."""
    index = getattr(ds, SOURCE_INDEX, None)
    return torch.arange(len(ds)) if index is None else index


def take(ds, index: torch.Tensor):
    """Rows `index` ((n,) int64, positions in `ds`) of `ds`, as a dataset of its own class."""
    index = torch.as_tensor(index, dtype=torch.int64)
    n = len(ds)
    out = copy.copy(ds)
    state = vars(out)
    rows = [k for k, v in state.items() if isinstance(v, (torch.Tensor, np.ndarray)) and v.ndim >= 1
            and v.shape[0] == n and k != SOURCE_INDEX]
    if not any(k.lstrip("_") == "labels" for k in rows):
        raise TypeError(f"{type(ds).__name__} keeps no per-row labels tensor; take() cannot subset it")
    for k in rows:
        v = state[k]
        state[k] = v[index] if isinstance(v, torch.Tensor) else v[index.numpy()]
    state.pop("_device_copy", None)  # the device loader's cache of the full tensors
    state[SOURCE_INDEX] = source_index(ds)[index]
    return out
