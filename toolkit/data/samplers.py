"""Training samplers. Both give an order that is a pure function of (seed, epoch), touch no
global RNG, and have a fixed length, so mid-epoch resume with skip_first_batches stays exact.

EpochSampler: a seeded permutation per epoch.
PKSampler: batches of P classes x K images (for batch-hard triplet losses), laid out so that
consecutive runs of K indices share a class. Split across W processes, each rank's slice holds
whole classes when (P * K / W) is a multiple of K.
"""

from __future__ import annotations

from typing import Iterator, List

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class PKSampler(Sampler[int]):
    """len(labels) // (P*K) batches per epoch. Each batch: P distinct classes drawn at random,
    K images of each, taken from a per-class shuffled stream that reshuffles when used up (a
    class with fewer than K images repeats some)."""

    def __init__(self, labels: torch.Tensor, p: int, k: int, seed: int):
        classes = torch.unique(labels)
        if p > len(classes):
            raise ValueError(f"P={p} classes per batch, but the training set has {len(classes)}")
        self.by_class: List[torch.Tensor] = [torch.nonzero(labels == c).flatten() for c in classes]
        self.p, self.k, self.seed, self.epoch = p, k, seed, 0
        self.num_batches = len(labels) // (p * k)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        streams = [ix[torch.randperm(len(ix), generator=g)] for ix in self.by_class]
        pos = [0] * len(streams)
        out: List[int] = []
        for _ in range(self.num_batches):
            for c in torch.randperm(len(streams), generator=g)[: self.p].tolist():
                for _ in range(self.k):
                    if pos[c] == len(streams[c]):
                        streams[c] = streams[c][torch.randperm(len(streams[c]), generator=g)]
                        pos[c] = 0
                    out.append(int(streams[c][pos[c]]))
                    pos[c] += 1
        return iter(out)

    def __len__(self) -> int:
        return self.num_batches * self.p * self.k
