"""The toolkit's image codec: one file -> a (3, S, S) uint8 RGB tensor, and the checks first.

    x = load_resized("cat.jpg", 112)        # (3, 112, 112) uint8: decode, shorter side to 112, centre crop
    check_images(paths)                     # ConfigError naming the first file that does not decode
    IMAGENET(x.unsqueeze(0))                # (1, 3, 112, 112) float32, ImageNet-normalised

Used by `imagefolder` (per sample, in the DataLoader workers), `toolkit.prepare` (once per
image), `data.decode=device` (toolkit.data.device_decode: the files it does not decode on the
device), the extraction collection and `toolkit.retrieve` (`load_rgb`).

`load_resized`: the header is read with Pillow (bomb check below), then the pixels are decoded
to a uint8 (3, H, W) RGB tensor (greyscale, palette, CMYK, RGBA all become 3 channels; alpha is
dropped) -> the shorter side resized to `image_size` (bilinear, antialiased, on the uint8
tensor) -> centre crop to (image_size, image_size). Images are normalised with ImageNet mean/std
(`IMAGENET`, a `toolkit.data.base.Normalize`), what the pretrained torchvision backbones expect
(none are computed from the data). What counts as an image file: `EXTENSIONS` (any case); as a
folder: `visible_dirs` (hidden entries, names starting with `.`, are skipped).

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
torchvision lacks them, `fast_decode()` is False and Pillow decodes everything. If torchvision
refuses a file, Pillow decides: it decodes it or raises its own error.

Safety (docs: DESIGN.md "Safe defaults"): Pillow's DecompressionBombWarning is an error and an
image over `Image.MAX_IMAGE_PIXELS` is refused, and `ImageFile.LOAD_TRUNCATED_IMAGES` is never
set. `check_images` is what the datasets run on every image a split will use (after `limit`)
when they are built, so a bad file stops the run before training rather than in a worker in
epoch 7: open (header; refuses bombs), then for JPEG a full decode in draft mode (libjpeg's 1/8
DCT scaling still entropy-decodes every byte, so a file cut short fails; `verify()` checks
nothing for JPEG), for every other format `verify()` (PNG: chunk structure and CRCs) and a full
`load()`. That costs about one decode of each image, once per build; measured on this 2-core
machine with random-noise content (the worst case for JPEG): 0.24 ms per 112x112 JPEG, 0.7-1.3
ms per 500x375 JPEG, 2-3.5 ms per 500x375 PNG. The checks run on a thread pool (Pillow releases
the GIL while decoding): E4's 4,550 images at 112 px take about 1 s.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from toolkit.data.base import Normalize
from toolkit.errors import ConfigError

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET = Normalize(IMAGENET_MEAN, IMAGENET_STD)


def normalise(x: torch.Tensor) -> torch.Tensor:
    """(3, S, S) or (B, 3, S, S) uint8 -> float32, ImageNet-normalised."""
    return IMAGENET(x.unsqueeze(0))[0] if x.ndim == 3 else IMAGENET(x)


def visible_dirs(folder: Path) -> list[str]:
    """The sorted names of the folders in `folder`, hidden ones (`.name`) left out."""
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


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


# torchvision is imported on first use, not with this module: its import costs ~1.5 s of
# start-up that a run on digits or CIFAR never needs. `load_codecs` pays it up front.
_DECODERS: dict | None = None  # {} where torchvision lacks the ops: Pillow decodes everything
_RESIZE = None  # torchvision.transforms.v2.functional


def decoders() -> dict:
    global _DECODERS
    if _DECODERS is None:
        _DECODERS = _torchvision_decoders()
    return _DECODERS


def fast_decode() -> bool:
    """True where torchvision's JPEG/PNG decoders are available."""
    return bool(decoders())


def _resize_ops():
    global _RESIZE
    if _RESIZE is None:
        from torchvision.transforms.v2 import functional

        _RESIZE = functional
    return _RESIZE


def load_codecs() -> None:
    """Import the decoders and resize ops now. Datasets call it when they are built, in the
    main process, so that forked loader workers inherit them instead of each importing them."""
    decoders()
    _resize_ops()
# Pillow modes (from the header) the torchvision decoders turn into the same RGB as Pillow's
# convert("RGB"); CMYK/YCCK JPEG and 16-bit PNG ("I;16", "I") are left to Pillow.
_FAST_MODES = {"JPEG": ("L", "RGB"), "PNG": ("1", "L", "LA", "RGB", "RGBA", "P")}
_RGB = 3  # torchvision.io.ImageReadMode.RGB.value


def pil_tensor(im: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) uint8, a channels-last view (which the resize kernel prefers)."""
    return torch.from_numpy(np.array(im)).permute(2, 0, 1)


def decode_uint8(path: str) -> torch.Tensor:
    """One image file -> (3, H, W) uint8 RGB; a truncated file or a decompression bomb raises.

    Callers that want Pillow's DecompressionBombWarning raised rather than printed set the
    filter themselves (not here: this runs in threads, and warning filters are process-global);
    `_check_pixels` refuses the same images either way."""
    fmt, x = read_encoded(path)
    return x if fmt is None else decode_encoded(fmt, x, path)


def read_encoded(path: str) -> tuple[str | None, torch.Tensor]:
    """Pillow reads the header (and refuses bombs). A file torchvision decodes as Pillow would
    comes back as (its format, its bytes (B,) uint8); any other is decoded by Pillow here:
    (None, (3, H, W) uint8 RGB)."""
    with open(path, "rb") as f:
        with Image.open(f) as im:  # reads the header only
            _check_pixels(im)
            fast = im.format in decoders() and im.mode in _FAST_MODES.get(im.format, ())
            fmt = im.format if fast else None
            if fmt is None:
                return None, pil_tensor(im.convert("RGB"))
        f.seek(0)
        return fmt, torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)  # (B,)


def decode_encoded(fmt: str, data: torch.Tensor, path: str) -> torch.Tensor:
    """`read_encoded`'s bytes -> (3, H, W) uint8 RGB with torchvision's decoder; Pillow decides
    where torchvision refuses the file or gives something else (16-bit)."""
    try:
        x = decoders()[fmt](data, _RGB, False)  # (3, H, W); EXIF orientation ignored, as Pillow does
    except RuntimeError:
        x = None
    if x is None or x.dtype != torch.uint8 or x.shape[0] != 3:
        with Image.open(path) as im:
            return pil_tensor(im.convert("RGB"))
    return x


def resize_crop(x: torch.Tensor, image_size: int) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, S, S) uint8: shorter side to S (bilinear, antialiased), centre crop."""
    ops = _resize_ops()
    x = ops.resize(x, [image_size], antialias=True)
    return ops.center_crop(x, [image_size, image_size]).contiguous()


def load_resized(path: str, image_size: int) -> torch.Tensor:
    """The per-image pipeline of `imagefolder` and `toolkit.prepare`: (3, S, S) uint8 RGB."""
    return resize_crop(decode_uint8(path), image_size)


# ------------------------------------------------------------------------------------------
# checks


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
        raise ConfigError(f"config: data.root: {describe_bad_images(bad)}")


def describe_bad_images(bad: Sequence[tuple], shown: int = 3) -> str:
    """'N unreadable image(s): a (why), b (why), c (why) and K more, all listed in FILE': the first
    few in the message; with more, every one in a new file in the temp folder (not in the data
    folder, which is the user's), whose path the message gives."""
    head = ", ".join(f"{p} ({why})" for p, why in bad[:shown])
    if len(bad) <= shown:
        return f"{len(bad)} unreadable image(s): {head}"
    import tempfile

    fd, listing = tempfile.mkstemp(prefix="toolkit-unreadable-", suffix=".txt")
    with os.fdopen(fd, "w") as f:
        f.writelines(f"{p}\t{why}\n" for p, why in bad)
    return f"{len(bad)} unreadable image(s): {head} and {len(bad) - shown} more, all listed in {listing}"
