"""An image collection for feature extraction: every image under a folder, bad files reported.

    ds = ImageCollection("/data/gallery", image_size=224)
    x, label, index, reason = ds[i]     # x: (3, S, S) uint8, or None with the reason it failed
    x = ds.normalize(x.to(device))      # (B, 3, S, S) float32: the mean/std step, on the device

Items stay uint8 until they reach the device, a quarter of the bytes of float32 through the
DataLoader workers, pinned memory and the host-to-device copy; `normalize` (toolkit.data.base.
Normalize, the formula every uint8 set in the toolkit uses, training included) then does what
torchvision's ToDtype(scale=True) + Normalize do, to within float32 rounding, on the whole batch.

Unlike the training datasets, which refuse a folder with one unreadable file before any work
starts, extraction keeps going: a gallery scraped from the web always holds a few broken
files, and losing a 10-hour extraction to one of them is the wrong trade. A file that does
not decode (empty, truncated, random bytes, not an image, over Pillow's decompression-bomb
limit) comes back with `x=None` and a one-line reason, which the extractor lists in
`bad_images.txt`. Odd but valid modes (CMYK, greyscale, palette, alpha) become RGB.

Layout: images anywhere under `root` with the extensions of `toolkit.data.images`. An
image inside `root/<class>/...` gets that class (classes: the sorted top-level folders that
hold images); an image directly in `root` has label -1 (unknown). Order: sorted by path parts,
so every rank and every rerun sees the same index for the same file.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePath
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from toolkit.data.base import Normalize, TensorImageDataset
from toolkit.data.images import EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, load_rgb
from toolkit.errors import ConfigError


def scan_collection(root: Path) -> Tuple[List[str], List[int], List[str]]:
    """-> paths, labels (-1: unknown), class names of every image under root, in path order."""
    found: List[PurePath] = []
    for top, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = Path(top).relative_to(root)
        found += [rel / f for f in files if not f.startswith(".") and f.lower().endswith(EXTENSIONS)]
    found.sort(key=lambda p: p.parts)
    classes = sorted({p.parts[0] for p in found if len(p.parts) > 1})
    index = {c: i for i, c in enumerate(classes)}
    labels = [index[p.parts[0]] if len(p.parts) > 1 else -1 for p in found]
    return [str(root / p) for p in found], labels, classes


def resize_center_crop_uint8(image_size: int):
    """PIL RGB -> (3, S, S) uint8: shorter side to S, centre crop."""
    from torchvision.transforms import v2

    return v2.Compose([v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size), v2.PILToTensor()])


def _reason(e: Exception) -> str:
    msg = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


class ImageCollection(Dataset):
    """Items are `(x | None, label, index, reason | None)`; see the module docstring."""

    def __init__(self, root: str, image_size: int = 224, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, limit: Optional[int] = None):
        root_path = Path(root)
        if not root_path.is_dir():
            raise ConfigError(f"config: data.root: no such directory: {root}")
        paths, labels, self.class_names = scan_collection(root_path)
        if limit is not None:
            paths, labels = paths[:limit], labels[:limit]
        if not paths:
            raise ConfigError(f"config: data.root: no images under {root} (extensions: {' '.join(EXTENSIONS)})")
        self.paths = np.asarray(paths, dtype=np.str_)  # (N,): no per-item refcounts for forked workers
        self.labels = torch.tensor(labels, dtype=torch.int64)  # (N,)
        self.transform = resize_center_crop_uint8(image_size)
        self.normalize = Normalize(mean, std)
        self.preprocess = {"kind": "resize_center_crop", "image_size": image_size,
                           "mean": [float(m) for m in mean], "std": [float(s) for s in std]}

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, i: int) -> str:
        return str(self.paths[i])

    def __getitem__(self, i: int):
        path = str(self.paths[i])
        try:
            if os.path.getsize(path) == 0:
                return None, self.labels[i], i, "empty file"
            x = self.transform(load_rgb(path))  # (3, S, S) uint8
        except Exception as e:  # truncated, corrupt, not an image, bomb, unreadable: reported, not raised
            from PIL import UnidentifiedImageError

            return None, self.labels[i], i, ("not an image Pillow can read" if isinstance(e, UnidentifiedImageError)
                                             else _reason(e))
        return x, self.labels[i], i, None


class SplitAsCollection(Dataset):
    """One split of a registered dataset (digits, cifar10, ...) in the collection's item format."""

    def __init__(self, dataset: Dataset, name: str, split: str, class_names: List[str], preprocess: dict):
        self.dataset = dataset
        self.name, self.split = name, split
        self.class_names = list(class_names)
        self.labels = torch.as_tensor(dataset.labels, dtype=torch.int64)  # (N,)
        self.preprocess = preprocess
        # uint8 sets (cifar, synthetic, prepared) hand out raw pixels, normalised on the device
        self.raw = isinstance(dataset, TensorImageDataset) and dataset.norm is not None
        # the dataset's own Normalize (what training saw), on the batch's device
        self.normalize = dataset.norm if self.raw else (lambda x: x)

    def __len__(self) -> int:
        return len(self.dataset)

    def path(self, i: int) -> str:
        paths = getattr(self.dataset, "paths", None)
        return str(paths[i]) if paths is not None else f"{self.name}:{self.split}:{i}"

    def __getitem__(self, i: int):
        if self.raw:
            return self.dataset.images[i], self.dataset.labels[i], i, None  # (3, S, S) uint8
        x, y = self.dataset[i]
        return x, y, i, None


def collate_items(batch):
    """-> x (G, 3, S, S) or None, labels (G,), indices (G,) of the good items; [(index, reason)] bad."""
    good = [b for b in batch if b[0] is not None]
    bad = [(int(b[2]), b[3]) for b in batch if b[0] is None]
    if not good:
        return None, torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64), bad
    x = torch.stack([b[0] for b in good])
    y = torch.as_tensor([int(b[1]) for b in good], dtype=torch.int64)
    i = torch.as_tensor([int(b[2]) for b in good], dtype=torch.int64)
    return x, y, i, bad
