"""Image files written by the tests: class-per-folder trees in every mode and format Pillow
writes, and the broken files every reader must refuse (truncated, decompression bombs).

    root = make_folder(tmp_path / "data")   # root/<split>/<class>/<i><ext>
    s = build_imagefolder(root)             # the `imagefolder` dataset on it, 32 px
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .cli import DEMO

CLASSES = ["cat", "dog", "emu"]
PER_CLASS = {"train": 6, "val": 2, "test": 3, "extra": 2}
# (mode, file extension): every mode Pillow can write in that format; upper-case extensions count too
KINDS = [("RGB", ".jpg"), ("L", ".png"), ("P", ".png"), ("CMYK", ".JPEG"), ("RGBA", ".png"), ("1", ".bmp"),
         ("RGB", ".webp"), ("P", ".gif"), ("RGB", ".tif")]


def flat_image(mode: str, c: int, i: int, size=(40, 30)) -> Image.Image:
    """One colour per (class c, index i), in Pillow mode MODE; size is (width, height)."""
    rgb = Image.new("RGB", size, (60 + 80 * c, 30 * i % 256, 200 - 50 * c))
    if mode == "P":
        return rgb.quantize(16)
    return rgb.convert(mode)


def make_folder(root: Path, per_class=PER_CLASS) -> Path:
    """root/<split>/<class>/<i><ext>, 40x30 px, modes and formats cycling through KINDS."""
    for split, n in per_class.items():
        for c, name in enumerate(CLASSES):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                mode, ext = KINDS[(c * n + i) % len(KINDS)]
                flat_image(mode, c, i).save(d / f"{i:02d}{ext}")
            (d / "notes.txt").write_text("not an image")  # ignored: extension
            (d / ".hidden.png").write_bytes(b"junk")  # ignored: hidden
    return root


def build_imagefolder(root: Path, **kw):
    """The `imagefolder` dataset on ROOT: 32 px, split seed 0, no limit (KW overrides)."""
    from toolkit.data import DATASETS  # here, not at import: a broken toolkit fails only its users

    kw = {"split_seed": 0, "limit": None, "download": False, "image_size": 32, **kw}
    return DATASETS.build("imagefolder", root=str(root), **kw)


# ------------------------------------------------------------------------------------------
# data.decode=device: JPEGs of odd sizes (tests/test_device_decode.py, tests/test_gpu.py)


def make_decode_folder(tmp_path: Path) -> Path:
    """tmp_path/data: make_folder's tree (every mode and format), plus greyscale and odd-sized RGB
    JPEGs, so that the JPEG path decodes L and RGB and resizes by odd factors."""
    root = make_folder(tmp_path / "data")
    for split, n in (("train", 3), ("val", 2), ("test", 2)):
        for c, name in enumerate(CLASSES):
            for i in range(n):
                flat_image("L", c, i, size=(45, 61)).save(root / split / name / f"grey{i}.jpg")
                flat_image("RGB", c, i + 7, size=(97, 53)).save(root / split / name / f"wide{i}.jpeg", quality=85)
    return root


def decoded_batches(ds, decode: str, workers: int = 2, batch: int = 5) -> list:
    """[(x, y)] of DS through a DataLoader, x normalised on the CPU where the batch lands:
    decode="device" decodes the JPEG bytes there, anything else takes the workers' pixels."""
    from torch.utils.data import DataLoader

    from toolkit.data.base import collate_for, device_items

    norm = ds.device_decode(torch.device("cpu")) if decode == "device" else device_items(ds)
    return [(norm(x), y) for x, y in DataLoader(ds, batch_size=batch, num_workers=workers,
                                                 collate_fn=collate_for(ds))]


def decode_folder_args(tmp_path: Path, run: str, *extra: str) -> list:
    """toolkit.train ARGS: 2 epochs of the demo model on make_decode_folder's tree (written once
    per tmp_path), into tmp_path/RUN."""
    root = tmp_path / "data"
    if not root.exists():
        make_decode_folder(tmp_path)
    return ["--config", DEMO, "data.name=imagefolder", f"data.root={root}", "data.image_size=32",
            "data.batch_size=8", "data.eval_batch_size=8", "data.num_workers=2", "train.epochs=2",
            "sched.milestones=[]", "log.tensorboard=false", "log.plots=false", f"run.dir={tmp_path / run}", *extra]


# ------------------------------------------------------------------------------------------
# broken files


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming width x height (RGB, 8 bit), and nothing else of
    substance: enough for Pillow's decompression-bomb check, which reads only the header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def _noise(seed: int = 0) -> Image.Image:
    """64x64 RGB noise: compresses badly, so half the file is half the pixels."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8))


def truncated_jpeg(path: Path) -> bytes:
    """Write the first half of a 64x64 noise JPEG to PATH; -> its bytes. The header survives
    (Pillow's verify() passes, libjpeg alone would fill the rest with grey): only a full decode can tell."""
    _noise().save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with Image.open(path) as im:
        im.verify()
    return path.read_bytes()


def truncated_png(path: Path) -> None:
    """A 64x64 noise PNG without its last 200 bytes (the end of IDAT and IEND)."""
    _noise().save(path)
    path.write_bytes(path.read_bytes()[:-200])


def truncated_bmp(path: Path) -> None:
    """A 40x30 BMP without its last 500 bytes. BMP's verify() checks nothing: only load() can tell."""
    Image.new("RGB", (40, 30), (1, 2, 3)).save(path)
    path.write_bytes(path.read_bytes()[:-500])
