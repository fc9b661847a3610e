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
(class folder, then the path within it; training splits in `train_splits` order), and
`data.limit` keeps the first N of each split.

Per sample (in the worker): PIL open -> convert("RGB") (greyscale, palette, CMYK, RGBA all
become 3 channels; alpha is dropped) -> resize the shorter side to `image_size` -> centre crop
to (image_size, image_size) -> float tensor normalised with ImageNet mean/std, which the
pretrained torchvision backbones expect (no statistics are computed from the data). No random
augmentation here: `data.augment` works on whole batches on the device.

Safety (docs: DESIGN.md "Safe defaults"): Pillow's DecompressionBombWarning is an error and an
image over `Image.MAX_IMAGE_PIXELS` is refused, and `ImageFile.LOAD_TRUNCATED_IMAGES` is never
set. Every image a split will use (after `limit`) is checked when the dataset is built, so a
bad file stops the run before training rather than in a worker in epoch 7: open (header;
refuses bombs), then for JPEG a full decode in draft mode (libjpeg's 1/8 DCT scaling still
entropy-decodes every byte, so a file cut short fails; `verify()` checks nothing for JPEG), for
every other format `verify()` (PNG: chunk structure and CRCs) and a full `load()`. That costs
about one decode of each image, once per build; measured on this 2-core machine with
random-noise content (the worst case for JPEG): 0.24 ms per 112x112 JPEG, 0.7-1.3 ms per
500x375 JPEG, 2-3.5 ms per 500x375 PNG. The checks run on a thread pool (Pillow releases the
GIL while decoding): E4's 4,550 images at 112 px take about 1 s. `limit` is applied first, so
smoke runs check only what they use.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePath

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms import v2

from toolkit.data import DATASETS
from toolkit.data.base import Splits
from toolkit.errors import ConfigError

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224


# ------------------------------------------------------------------------------------------
# decoding


def _check_pixels(im: Image.Image) -> None:
    """Refuse what Pillow only warns about: more than MAX_IMAGE_PIXELS (None disables, as in Pillow).

    Pillow itself raises above 2 * MAX_IMAGE_PIXELS; this check does not depend on the warnings
    filter, which is process-global and not the thing to rely on inside threads."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and im.width * im.height > limit:
        raise Image.DecompressionBombError(
            f"Image size ({im.width * im.height} pixels) exceeds limit of {limit} pixels, "
            "could be decompression bomb DOS attack.")


def load_rgb(path: str) -> Image.Image:
    """Decode one image fully as RGB; a truncated file or a decompression bomb raises."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            _check_pixels(im)
            return im.convert("RGB")  # loads the whole file; truncation raises OSError


def check_image(path: str) -> str | None:
    """None when `path` decodes, else the reason in one line (see the module docstring)."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        with Image.open(path) as im:
            _check_pixels(im)
            if im.format == "JPEG":  # verify() checks nothing for JPEG; decoding does
                im.draft(im.mode, (1, 1))  # 1/8 scale: every byte is still entropy-decoded
                im.load()
                return None
            im.verify()  # PNG: chunk structure and CRCs; leaves the image unusable
        with Image.open(path) as im:
            im.load()
        return None
    except UnidentifiedImageError:
        return "not an image Pillow can read"
    except Exception as e:  # truncated, corrupt, bomb, unreadable file, odd decoder errors
        msg = str(e).splitlines()[0] if str(e) else ""
        return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def check_images(paths: Sequence[str]) -> None:
    """ConfigError naming the first bad image (in path order) if any image fails `check_image`."""
    with warnings.catch_warnings():  # entered once here: threads see the global filter
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            reasons = list(pool.map(check_image, paths, chunksize=64))
    bad = [(p, r) for p, r in zip(paths, reasons) if r is not None]
    if bad:
        raise ConfigError(f"config: data.root: {len(bad)} unreadable image(s), first: {bad[0][0]} ({bad[0][1]})")


def eval_transform(image_size: int) -> v2.Compose:
    """PIL RGB image -> (3, S, S) float32, ImageNet-normalised: the classic eval transform."""
    return v2.Compose([
        v2.Resize(image_size, antialias=True),  # shorter side -> S, on the PIL image
        v2.CenterCrop(image_size),
        v2.PILToTensor(),  # (3, S, S) uint8
        v2.ToDtype(torch.float32, scale=True),  # 0..1
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class ImageFolderDataset(Dataset):
    """Image paths and int64 labels; each `__getitem__` decodes one file.

    `labels` may be reassigned (label noise does): the new tensor is what `__getitem__` returns.
    Paths are kept in one numpy string array, not a list of Python strings, so forked workers
    do not copy the list page by page as they touch reference counts."""

    def __init__(self, paths: Sequence[str], labels: torch.Tensor, image_size: int):
        self.paths = np.asarray(list(paths), dtype=np.str_)  # (N,)
        self.labels = labels
        self.image_size = image_size
        self.transform = eval_transform(image_size)

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
            image = load_rgb(path)
        except Exception as e:  # checked at build time, so the file changed since
            msg = str(e).splitlines()[0] if str(e) else ""
            raise ConfigError(f"config: data.root: unreadable image {path} ({type(e).__name__}: {msg})") from None
        return self.transform(image), self._labels[i]  # (3, S, S) float32, () int64


# ------------------------------------------------------------------------------------------
# scanning the folders


def _visible_dirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


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
    unknown = [c for c in _visible_dirs(folder) if c not in index]
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
    size = DEFAULT_IMAGE_SIZE if image_size is None else image_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"config: data.image_size: {image_size!r} is not a positive integer")
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
    """Build train/val/test from `root/<split>/<class>/<image>`; `split_seed` is unused (the
    folders are the split) and `download` has nothing to fetch."""
    root_path, size, train_names = _check_args(root, image_size, train_splits)
    if not root_path.is_dir():
        raise ConfigError(f"config: data.root: {root_path} not found (expected {root_path}/train/<class>/<image>, "
                          f"val/ and test/)")
    for name in [*train_names, "val", "test"]:
        if not (root_path / name).is_dir():
            raise ConfigError(f"config: data.root: {root_path / name} not found (expected "
                              f"{root_path}/{name}/<class>/<image>; splits here: "
                              f"{', '.join(_visible_dirs(root_path)) or 'none'})")
    class_names = _visible_dirs(root_path / train_names[0])
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
        parts = {k: (p[:limit], y[:limit]) for k, (p, y) in parts.items()}
    check_images(list(dict.fromkeys(p for paths, _ in parts.values() for p in paths)))  # val may be in train
    data = {k: ImageFolderDataset(p, torch.tensor(y, dtype=torch.int64), size) for k, (p, y) in parts.items()}
    return Splits(train=data["train"], val=data["val"], test=data["test"], num_classes=len(class_names),
                  class_names=class_names,
                  meta={"image_size": size, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                        "sizes": {k: len(v) for k, v in data.items()}, "root": str(root_path),
                        "train_splits": train_names, "val_in_train": "val" in train_names})
