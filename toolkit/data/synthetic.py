"""`synthetic`: random images and labels of a chosen size, for speed tests and smoke runs.

    data.name=synthetic data.image_size=224 data.limit=5000

Sizes: 5,000 / 1,000 / 1,000 train/val/test images (`data.limit` caps each), 10 classes,
`data.image_size` pixels square (default 32), uint8, seeded by `data.split_seed`. There is
nothing to learn: accuracy stays at chance, by design.
"""

from __future__ import annotations

import torch

from toolkit.catalog import DATASETS
from toolkit.data.base import Splits, TensorImageDataset

SIZES = {"train": 5000, "val": 1000, "test": 1000}
NUM_CLASSES = 10


@DATASETS.register("synthetic")
def synthetic(split_seed: int = 0, limit: int | None = None, image_size: int | None = None, **_) -> Splits:
    """Random uint8 images and labels (10 classes, data.image_size px) for speed tests; accuracy stays at chance."""
    size = image_size or 32
    g = torch.Generator().manual_seed(split_seed)
    mean, std = torch.full((3,), 0.5), torch.full((3,), 0.2887)  # uniform 0..1: mean 1/2, std 1/sqrt(12)
    parts = {}
    for name, n in SIZES.items():
        n = min(n, limit) if limit is not None else n
        images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
        labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
        parts[name] = TensorImageDataset(images, labels, mean=mean, std=std)
    return Splits(train=parts["train"], val=parts["val"], test=parts["test"], num_classes=NUM_CLASSES,
                  class_names=[str(i) for i in range(NUM_CLASSES)],
                  meta={"image_size": size, "mean": mean.tolist(), "std": std.tolist(),
                        "sizes": {k: len(v) for k, v in parts.items()}})
