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

Per sample (in the worker), `load_resized`: the header is read with Pillow (bomb check below),
then the pixels are decoded to a uint8 (3, H, W) RGB tensor (greyscale, palette, CMYK, RGBA all
become 3 channels; alpha is dropped) -> the shorter side resized to `image_size` (bilinear,
antialiased, on the uint8 tensor) -> centre crop to (image_size, image_size). The engine calls
`device_items()`, so the item stays uint8 through the worker queue, pinned memory and the copy
to the GPU (a quarter of float32's bytes) and the batch is normalised with ImageNet mean/std
where it lands (`toolkit.data.base.Normalize`); outside the engine an item is that float tensor.
ImageNet statistics are what the pretrained torchvision backbones expect (none are computed from
the data). No random augmentation here: `data.augment` works on whole batches on the device. `python -m toolkit.prepare` runs the same `load_resized` once and
stores the uint8 result (dataset `prepared`).

`data.decode=device` (the engine calls `device_decode()` instead): a worker hands out an 8-bit
JPEG as its file bytes and decodes anything else as above; `collate_for_device` packs a batch
into two tensors (EncodedBatch: the bytes end to end, the decoded images stacked) and
`DeviceDecode` decodes its JPEGs in one `torchvision.io.decode_jpeg` call for the training device
(nvJPEG on a GPU), resizes and crops them there with the same `resize_crop`, and normalises the
batch. On the CPU both paths give identical pixels.

Decoders: 8-bit JPEG (L, RGB) and PNG (1, L, LA, RGB, RGBA, P) go through torchvision's
libjpeg-turbo/libpng ops, everything else (CMYK JPEG, 16-bit PNG, BMP, WebP, GIF, TIFF) through
Pillow's `convert("RGB")`. Measured (docs/benchmarks.md, "Folder pipeline"; one thread, 112 px,
2-core dev VM): per 256x256 JPEG, Pillow decode + Pillow resize 1.26 ms, Pillow decode + tensor
resize 0.99 ms, torchvision decode + tensor resize 0.78 ms; 500x375 JPEG 2.58 / 1.89 / 1.47 ms;
500x375 PNG 4.71 / 4.39 / 3.80 ms (the H100 host's CPU: the same order, 1.18-1.57x overall). The tensor resize is torch's uint8 antialiased bilinear kernel, a port of Pillow's: on
the 256 px set the output is identical to Pillow's, on other sizes it differs by at most 1 level
(rounding) on some pixels: 0.3% of them on random sizes, more when the scale is close to 1.
torchvision's decoders agree with Pillow's pixel for pixel on these modes (both are
libjpeg-turbo and libpng), refuse a truncated JPEG or PNG like Pillow does ("Image is incomplete
or truncated", tested), but have no decompression-bomb limit (a 100,000 x 100,000 PNG header
makes them try to allocate 30 GB): the Pillow header check runs first, always. They are deprecated since torchvision 0.29 in favour of torchcodec (not a
dependency here); the registered ops are called directly (no per-call warning) and, where a
torchvision lacks them, `FAST_DECODE` is False and Pillow decodes everything. If torchvision
refuses a file, Pillow decides: it decodes it or raises its own error.

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

import io
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePath

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as F

from toolkit.data import DATASETS
from toolkit.data.base import Normalize, Splits
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


def _torchvision_decoders() -> dict:
    """{Pillow format: op(data (B,) uint8, mode, apply_exif) -> (C, H, W)}, empty if unavailable."""
    try:
        import torchvision.io.image  # noqa: F401  (loads the image extension: torch.ops.image)

        return {"JPEG": torch.ops.image.decode_jpeg, "PNG": torch.ops.image.decode_png}
    except (ImportError, AttributeError, RuntimeError):
        return {}


_DECODERS = _torchvision_decoders()
FAST_DECODE = bool(_DECODERS)
# Pillow modes (from the header) the torchvision decoders turn into the same RGB as Pillow's
# convert("RGB"); CMYK/YCCK JPEG and 16-bit PNG ("I;16", "I") are left to Pillow.
_FAST_MODES = {"JPEG": ("L", "RGB"), "PNG": ("1", "L", "LA", "RGB", "RGBA", "P")}
_RGB = 3  # torchvision.io.ImageReadMode.RGB.value


def _pil_tensor(im: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) uint8, a channels-last view (which the resize kernel prefers)."""
    return torch.from_numpy(np.array(im)).permute(2, 0, 1)


def decode_uint8(path: str) -> torch.Tensor:
    """One image file -> (3, H, W) uint8 RGB; a truncated file or a decompression bomb raises.

    Callers that want Pillow's DecompressionBombWarning raised rather than printed set the
    filter themselves (not here: this runs in threads, and warning filters are process-global);
    `_check_pixels` refuses the same images either way."""
    fmt, x = _read(path)
    return x if fmt is None else _decode_bytes(fmt, x, path)


def _read(path: str) -> tuple[str | None, torch.Tensor]:
    """Pillow reads the header (and refuses bombs). A file torchvision decodes as Pillow would
    comes back as (its format, its bytes (B,) uint8); any other is decoded by Pillow here:
    (None, (3, H, W) uint8 RGB)."""
    with open(path, "rb") as f:
        with Image.open(f) as im:  # reads the header only
            _check_pixels(im)
            fmt = im.format if im.format in _DECODERS and im.mode in _FAST_MODES.get(im.format, ()) else None
            if fmt is None:
                return None, _pil_tensor(im.convert("RGB"))
        f.seek(0)
        return fmt, torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)  # (B,)


def _decode_bytes(fmt: str, data: torch.Tensor, path: str) -> torch.Tensor:
    """`_read`'s bytes -> (3, H, W) uint8 RGB with torchvision's decoder; Pillow decides where
    torchvision refuses the file or gives something else (16-bit)."""
    try:
        x = _DECODERS[fmt](data, _RGB, False)  # (3, H, W); EXIF orientation ignored, as Pillow does
    except RuntimeError:
        x = None
    if x is None or x.dtype != torch.uint8 or x.shape[0] != 3:
        with Image.open(path) as im:
            return _pil_tensor(im.convert("RGB"))
    return x


def read_for_device(path: str, image_size: int) -> torch.Tensor:
    """`data.decode=device`, in the worker: an 8-bit JPEG (L, RGB) comes back as its file bytes,
    (B,) uint8, to be decoded where the batch lands (`DeviceDecode`); any other file is decoded
    and resized here, (3, S, S) uint8, as `load_resized` does (the file is read once either way)."""
    fmt, x = _read(path)
    if fmt == "JPEG":
        return x
    return resize_crop(x if fmt is None else _decode_bytes(fmt, x, path), image_size)


class EncodedBatch:
    """A batch of `read_for_device` items in two tensors: the JPEGs' bytes end to end, (T,) uint8,
    and the images the workers decoded, (M, 3, S, S) uint8, with where each sits in the batch.
    Two storages whatever the batch size: a worker shares each storage with the main process
    through one file descriptor, and one per image runs out of them at batch 256 with a few
    workers. Neither the DataLoader's pinning nor Accelerate's move to the device looks inside
    (no `to`/`pin_memory`), so the bytes stay on the host, where decode_jpeg wants its input; with
    `split_batches` each rank's loader collates its own slice, so nothing slices it either."""

    def __init__(self, jpeg: torch.Tensor, jpeg_sizes: list[int], jpeg_at: list[int],
                 images: torch.Tensor, images_at: list[int]):
        self.jpeg, self.jpeg_sizes, self.jpeg_at = jpeg, jpeg_sizes, jpeg_at  # (T,) uint8
        self.images, self.images_at = images, images_at  # (M, 3, S, S) uint8

    def __len__(self) -> int:
        return len(self.jpeg_at) + len(self.images_at)


def collate_for_device(batch):
    """[(item, label)] -> (EncodedBatch, (N,) int64)."""
    xs = [x for x, _ in batch]
    jpeg_at = [i for i, x in enumerate(xs) if x.ndim == 1]
    images_at = [i for i, x in enumerate(xs) if x.ndim == 3]
    jpeg = torch.cat([xs[i] for i in jpeg_at]) if jpeg_at else torch.empty(0, dtype=torch.uint8)
    images = (torch.stack([xs[i] for i in images_at]) if images_at
              else torch.empty((0, 3, 1, 1), dtype=torch.uint8))
    return (EncodedBatch(jpeg, [xs[i].numel() for i in jpeg_at], jpeg_at, images, images_at),
            torch.stack([y for _, y in batch]))


class DeviceDecode:
    """`data.decode=device`: EncodedBatch -> (N, 3, S, S) float32 on `device`, ImageNet-normalised.
    The JPEGs of a batch go to one `torchvision.io.decode_jpeg` call for `device` (on a GPU:
    nvJPEG; torchvision parses headers on the host and, for progressive JPEGs or GPUs without a
    hardware JPEG engine, Huffman-decodes there too, and the call returns once the batch is
    decoded), then each is resized and centre-cropped on the device with the workers'
    `resize_crop` and placed beside the images the workers decoded. A batch the batched call
    refuses is decoded image by image, and an image torchvision refuses by Pillow."""

    def __init__(self, image_size: int, device: torch.device):
        self.image_size = image_size
        self.device = torch.device(device)

    def _decode_one(self, data: torch.Tensor) -> torch.Tensor:
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:
            with Image.open(io.BytesIO(data.numpy().tobytes())) as im:
                return _pil_tensor(im.convert("RGB")).to(self.device)

    def _decode(self, datas: list[torch.Tensor]) -> list[torch.Tensor]:
        """[(B_i,) uint8 on the host] -> [(3, H_i, W_i) uint8 on the device]."""
        if self.device.type == "cuda":
            # torchvision's batched GPU decoder allocates its outputs on our stream but writes them
            # on its own without waiting for ours: memory that kernels queued on our stream still
            # read could be overwritten. Let our stream finish first (the decode blocks anyway).
            torch.cuda.current_stream(self.device).synchronize()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to TorchCodec
            try:
                return decode_jpeg(datas, mode=ImageReadMode.RGB, device=self.device)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError:
                return [self._decode_one(d) for d in datas]

    def __call__(self, x) -> torch.Tensor:
        if isinstance(x, torch.Tensor):  # already decoded: (N, 3, S, S) uint8
            return IMAGENET(x.to(self.device, non_blocking=True))
        s = self.image_size
        out = torch.empty((len(x), 3, s, s), dtype=torch.uint8, device=self.device)  # (N, 3, S, S)
        if x.images_at:
            out[x.images_at] = x.images.to(self.device, non_blocking=True)
        if x.jpeg_at:
            datas = list(torch.split(x.jpeg, x.jpeg_sizes))  # contiguous views, one per file
            for i, img in zip(x.jpeg_at, self._decode(datas)):  # img: (3, H, W) uint8 on the device
                out[i] = resize_crop(img, s)
        return IMAGENET(out)


def resize_crop(x: torch.Tensor, image_size: int) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, S, S) uint8: shorter side to S (bilinear, antialiased), centre crop."""
    x = F.resize(x, [image_size], antialias=True)
    return F.center_crop(x, [image_size, image_size]).contiguous()


def load_resized(path: str, image_size: int) -> torch.Tensor:
    """The per-image pipeline of `imagefolder` and `toolkit.prepare`: (3, S, S) uint8 RGB."""
    return resize_crop(decode_uint8(path), image_size)


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


IMAGENET = Normalize(IMAGENET_MEAN, IMAGENET_STD)


def normalise(x: torch.Tensor) -> torch.Tensor:
    """(3, S, S) or (B, 3, S, S) uint8 -> float32, ImageNet-normalised."""
    return IMAGENET(x.unsqueeze(0))[0] if x.ndim == 3 else IMAGENET(x)


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
