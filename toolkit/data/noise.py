"""Label noise (E4): replace exactly round(rate * N) training labels with a different class.

    new_labels, changed = flip_labels(labels, rate=0.3, num_classes=35, seed=0)

Seeded by `data.split_seed`, so every run and sweep trial at one rate sees the same noisy
labels whatever its `run.seed`. The engine records the changed samples in RUN/label_noise.json.
"""

from __future__ import annotations

from typing import Tuple

import torch


def flip_labels(labels: torch.Tensor, rate: float, num_classes: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns (noisy labels, sorted indices of the changed samples). `labels` is not modified."""
    if not 0 <= rate <= 1:
        raise ValueError(f"label noise rate must be in [0, 1], got {rate}")
    n = labels.shape[0]
    k = int(round(rate * n))
    g = torch.Generator().manual_seed(seed + 7919)
    changed = torch.randperm(n, generator=g)[:k].sort().values
    # A uniformly random *different* class: shift by 1..C-1 modulo C.
    shift = torch.randint(1, num_classes, (k,), generator=g)
    noisy = labels.clone()
    noisy[changed] = (labels[changed] + shift) % num_classes
    return noisy, changed
