"""`imagefolder`: class-per-folder images on disk, decoded lazily in the DataLoader workers.

    data.name=imagefolder data.root=/data/e4 data.image_size=112
    data.name=imagefolder data.root=/data/e4 data.train_splits=[train,val,extra]   # E4 tuning runs

Layout: `root/<split>/<class>/<image>`. `root/val` and `root/test` are the validation and test
sets; the training set is the union of the folders in `train_splits` (default `[train]`, any
extra folder such as `extra` may be named; naming `val` is allowed, the run then validates on
data it trained on, which E4 accepts by validating on test). Class names are the sorted class
folders of the first training split; a class folder may be missing from a split, but a class
folder that is not in that first split is an error. Hidden entries (names starting with `.`)
are skipped; files inside a class folder are found recursively, and only these extensions
count (any case): .jpg .jpeg .png .bmp .webp .gif .tif .tiff. Each split is ordered by path
(class folder, then the path within it; training splits in `train_splits` order).
`data.limit=N` keeps N images of each split: a stratified sample drawn with `data.split_seed`
(`stratified_limit`), kept in path order. The first N in path order would be one or two classes,
so a smoke run or a sweep with a limit would learn nothing about the others.

Per sample (in the worker): `load_resized` (toolkit.data.images: decode to uint8 RGB, shorter
side to `image_size`, centre crop). The engine calls `device_items()`, so the item stays uint8
through the worker queue, pinned memory and the copy to the GPU (a quarter of float32's bytes)
and the batch is normalised with ImageNet mean/std where it lands (`toolkit.data.base.Normalize`);
outside the engine an item is that float tensor. No random augmentation here: `data.augment`
works on whole batches on the device. `python -m toolkit.prepare` runs the same `load_resized`
once and stores the uint8 result (dataset `prepared`). With `data.decode=device` the engine calls
`device_decode()` instead: JPEGs travel as bytes and are decoded where the batch lands
(toolkit.data.device_decode).

Every image a split will use is checked when the dataset is built (`check_images`, see
toolkit.data.images: truncated files, decompression bombs), so a bad file stops the run before
training rather than in a worker in epoch 7. `limit` is applied first, so smoke runs check only
what they use.

Sizes are bounded (`MAX_IMAGE_SIZE`, `check_decoded_batch`): one image side of 100,000 px is
120 GB as float32, and such a typo should be one line, not an OOM kill.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path, PurePath

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from toolkit.catalog import DATASETS
from toolkit.config import MAX_IMAGE_SIZE
from toolkit.data.base import Normalize, Splits
from toolkit.data.device_decode import DeviceDecode, collate_for_device, read_for_device
from toolkit.data.images import (
    EXTENSIONS,
    IMAGENET,
    IMAGENET_MEAN,
    IMAGENET_STD,
    check_images,
    load_codecs,
    load_resized,
    normalise,
    visible_dirs,
)
from toolkit.errors import ConfigError

DEFAULT_IMAGE_SIZE = 224
# A decoded batch may take at most this share of the machine's memory: the batch exists several
# times over (uint8 in a worker, the pinned copy, float32, the first layers' activations), so a
# batch past a quarter of RAM does not survive its first forward pass.
BATCH_MEMORY_SHARE = 0.25


def check_image_size(size: int, key: str) -> int:
    """`size` if it is a side the toolkit decodes to (1..MAX_IMAGE_SIZE), else one ConfigError line."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"{key}: {size!r} is not a positive integer")
    if size > MAX_IMAGE_SIZE:
        raise ConfigError(f"{key}: {size} px is over the largest image side, {MAX_IMAGE_SIZE} px "
                          f"(one {size} px image is {_gib(3 * 4 * size * size)} as float32)")
    return size


def memory_bytes() -> int:
    """This machine's physical memory in bytes (0 where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def check_decoded_batch(batch: int, size: int, key: str, memory: int | None = None) -> None:
    """Refuse a batch whose decoded float32 pixels (batch x 3 x size x size x 4 bytes) would take
    more than BATCH_MEMORY_SHARE of memory, before anything is allocated."""
    memory = memory_bytes() if memory is None else memory
    need = batch * 3 * size * size * 4
    if memory and need > BATCH_MEMORY_SHARE * memory:
        raise ConfigError(f"{key}: a batch of {batch} images of {size} px is {_gib(need)} decoded, over "
                          f"{BATCH_MEMORY_SHARE:.0%} of this machine's {_gib(memory)} of memory; use a smaller "
                          "batch or image size")


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def stratified_limit(labels, limit: int, seed: int) -> np.ndarray:
    """Indices (sorted) of `limit` items drawn per class as evenly as the class sizes allow, with
    `seed`: the same subset for the same labels, limit and seed. A class smaller than its share
    gives all it has and the rest is shared among the others; what does not divide evenly goes
    one item each to classes drawn with the seed. `limit` >= len(labels): every index."""
    y = np.asarray(labels)
    if limit >= len(y):
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    quota = _even_quota(counts, limit, rng)
    picked = [rng.permutation(np.flatnonzero(y == c))[:q] for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(picked))


def _even_quota(counts: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    """Items per class, summing to `limit` (< counts.sum()), as even as `counts` allow."""
    quota = np.zeros_like(counts)
    left = limit
    while left > 0:
        open_ = np.flatnonzero(counts > quota)  # classes with images still to give
        share = left // len(open_)
        if share == 0:  # fewer items left than classes: one each to classes drawn with the seed
            quota[rng.choice(open_, size=left, replace=False)] += 1
            break
        add = np.minimum(counts[open_] - quota[open_], share)
        quota[open_] += add
        left -= int(add.sum())
    return quota


class ImageFolderDataset(Dataset):
    """Image paths and int64 labels; each `__getitem__` decodes one file.

    `labels` may be reassigned (label noise does): the new tensor is what `__getitem__` returns.
    Paths are kept in one numpy string array, not a list of Python strings, so forked workers
    do not copy the list page by page as they touch reference counts."""

    def __init__(self, paths: Sequence[str], labels: torch.Tensor, image_size: int):
        self.paths = np.asarray(list(paths), dtype=np.str_)  # (N,)
        self.labels = labels
        self.image_size = image_size
        self.raw_items = False  # True: items are uint8, normalised where the batch lands
        self.encoded = False  # True: JPEGs are handed out undecoded, see device_decode()
        load_codecs()  # here, before loader workers fork: each would import torchvision again

    def device_items(self) -> Normalize:
        """From now on hand out uint8 (3, S, S) images: a quarter of the bytes through the
        worker queues, pinned memory and the host-to-device copy. Returns the ImageNet
        normalisation for the batches, to run on their device."""
        self.raw_items = True
        return IMAGENET

    def device_decode(self, device: torch.device) -> DeviceDecode:
        """`data.decode=device`: from now on hand out JPEGs as their bytes (other files decoded
        and resized, uint8), to be collated by `collate_for_device` and turned into normalised
        batches on `device` by the DeviceDecode returned."""
        self.raw_items = self.encoded = True
        return DeviceDecode(self.image_size, device)

    @property
    def collate(self):
        """`collate_for_device` once `device_decode()` was called, else None (the default)."""
        return collate_for_device if self.encoded else None

    @property
    def labels(self) -> torch.Tensor:
        return self._labels

    @labels.setter
    def labels(self, value) -> None:
        value = torch.as_tensor(value, dtype=torch.int64)
        if value.shape != (len(self.paths),):
            raise ValueError(f"labels must have shape ({len(self.paths)},), got {tuple(value.shape)}")
        self._labels = value  # (N,) int64

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        path = str(self.paths[i])
        try:
            with warnings.catch_warnings():  # a worker process decodes one image at a time
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                if self.encoded:  # (B,) JPEG bytes or (3, S, S) uint8
                    x = read_for_device(path, self.image_size)
                else:
                    x = load_resized(path, self.image_size)  # (3, S, S) uint8
        except Exception as e:  # checked at build time, so the file changed since
            msg = str(e).splitlines()[0] if str(e) else ""
            raise ConfigError(f"config: data.root: unreadable image {path} ({type(e).__name__}: {msg})") from None
        return (x if self.raw_items else normalise(x)), self._labels[i]  # (3, S, S) uint8 or float32, () int64


# ------------------------------------------------------------------------------------------
# scanning the folders


def _images_in(class_dir: Path) -> list[PurePath]:
    """Image files under `class_dir`, recursively, as paths relative to it, sorted by parts."""
    found = []
    for top, dirs, files in os.walk(class_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = Path(top).relative_to(class_dir)
        found += [rel / f for f in files if not f.startswith(".") and f.lower().endswith(EXTENSIONS)]
    return sorted(found, key=lambda p: p.parts)


def scan_split(folder: Path, class_names: list[str], first: Path) -> tuple[list[str], list[int]]:
    """-> paths, labels of every image under folder/<class>/, in (class, path) order; `first` is
    the training split the class names came from."""
    index = {c: i for i, c in enumerate(class_names)}
    unknown = [c for c in visible_dirs(folder) if c not in index]
    if unknown:
        raise ConfigError(f"config: data.root: {folder} has class folder(s) not in the training split "
                          f"{first}: {', '.join(unknown)}")
    paths, labels = [], []
    for c in class_names:  # sorted, so the result is in path order
        if (folder / c).is_dir():
            rel = _images_in(folder / c)
            paths += [str(folder / c / r) for r in rel]
            labels += [index[c]] * len(rel)
    if not paths:
        raise ConfigError(f"config: data.root: no images found in {folder} (expected {folder}/<class>/<image> "
                          f"with extension {' '.join(EXTENSIONS)})")
    return paths, labels


def _check_args(root: str | None, image_size: int | None, train_splits) -> tuple[Path, int, list[str]]:
    if root is None:
        raise ConfigError("config: data.root: imagefolder needs data.root (the folder that holds train/ val/ test/)")
    size = check_image_size(DEFAULT_IMAGE_SIZE if image_size is None else image_size, "config: data.image_size")
    splits = ["train"] if train_splits is None else list(train_splits)
    if not splits:
        raise ConfigError("config: data.train_splits: empty; name at least one split folder, e.g. [train]")
    for s in splits:
        if not isinstance(s, str) or not s or s in (".", "..") or "/" in s or "\\" in s:
            raise ConfigError(f"config: data.train_splits: {s!r} is not a split folder name")
    dupes = sorted({s for s in splits if splits.count(s) > 1})
    if dupes:
        raise ConfigError(f"config: data.train_splits: {', '.join(dupes)} listed twice")
    return Path(root), size, splits


@DATASETS.register("imagefolder")
def imagefolder(root: str | None = None, split_seed: int = 0, limit: int | None = None,
                download: bool = False, image_size: int | None = None,
                train_splits: list[str] | None = None, **_) -> Splits:
    """Build train/val/test from `root/<split>/<class>/<image>`; `split_seed` seeds only
    `limit`'s stratified subset (the folders are the split) and `download` has nothing to fetch."""
    root_path, size, train_names = _check_args(root, image_size, train_splits)
    if not root_path.is_dir():
        raise ConfigError(f"config: data.root: {root_path} not found (expected {root_path}/train/<class>/<image>, "
                          f"val/ and test/)")
    for name in [*train_names, "val", "test"]:
        if not (root_path / name).is_dir():
            raise ConfigError(f"config: data.root: {root_path / name} not found (expected "
                              f"{root_path}/{name}/<class>/<image>; splits here: "
                              f"{', '.join(visible_dirs(root_path)) or 'none'})")
    class_names = visible_dirs(root_path / train_names[0])
    if not class_names:
        raise ConfigError(f"config: data.root: no class folders in {root_path / train_names[0]} "
                          f"(expected {root_path / train_names[0]}/<class>/<image>)")
    first = root_path / train_names[0]
    train_paths: list[str] = []
    train_labels: list[int] = []
    for name in train_names:
        p, y = scan_split(root_path / name, class_names, first)
        train_paths += p
        train_labels += y
    parts = {"train": (train_paths, train_labels),
             "val": scan_split(root_path / "val", class_names, first),
             "test": scan_split(root_path / "test", class_names, first)}
    if limit is not None:
        keep = {k: stratified_limit(y, limit, split_seed) for k, (_, y) in parts.items()}
        parts = {k: ([p[i] for i in keep[k]], [y[i] for i in keep[k]]) for k, (p, y) in parts.items()}
    check_images(list(dict.fromkeys(p for paths, _ in parts.values() for p in paths)))  # val may be in train
    data = {k: ImageFolderDataset(p, torch.tensor(y, dtype=torch.int64), size) for k, (p, y) in parts.items()}
    return Splits(train=data["train"], val=data["val"], test=data["test"], num_classes=len(class_names),
                  class_names=class_names,
                  meta={"image_size": size, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                        "sizes": {k: len(v) for k, v in data.items()}, "root": str(root_path),
                        "train_splits": train_names, "val_in_train": "val" in train_names})
