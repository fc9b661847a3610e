"""`prepared`: an image folder decoded once by `python -m toolkit.prepare`, loaded as uint8 arrays.

    python -m toolkit.prepare --root /data/e4 --image-size 112 --out /data/e4_112
    data.name=prepared data.root=/data/e4_112
    data.name=prepared data.root=/data/e4_112 data.train_splits=[train,val,extra]   # E4 tuning runs

The same splits, order, labels, class names and pixels as `data.name=imagefolder
data.root=/data/e4 data.image_size=112` (the arrays were made by its per-image pipeline), but
loading is one safetensors read per split and no decoding per sample: the images stay uint8
(N, 3, S, S) in a `TensorImageDataset` and are normalised with ImageNet mean/std per batch, so
the whole set can also sit on the device. Keywords as `imagefolder`: `train_splits` (their union
is the training set; each must have been prepared), `limit` (N of each split: the same stratified,
`split_seed`-seeded subset `imagefolder` takes, so the two still feed the same images),
`image_size` (null, or the prepared size: anything else is an error, the arrays are not
resized again); `download` does nothing (the folders are the split).

A missing or incomplete folder, a manifest that does not match its files (size, dtype, shape,
byte count: a truncated copy), or labels out of range stop the build with one line naming the
file. The byte count is checked, not a checksum: loading stays at the disk's speed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from toolkit.catalog import DATASETS
from toolkit.data.base import Splits, TensorImageDataset
from toolkit.data.imagefolder import stratified_limit
from toolkit.errors import ConfigError

FORMAT = "toolkit.prepared"  # toolkit.prepare writes these; kept here so loading imports no CLI
VERSION = 1
MANIFEST = "manifest.json"
_HOW = "python -m toolkit.prepare --root IMAGE_FOLDER --image-size N --out"


def _fail(msg: str) -> ConfigError:
    return ConfigError(f"config: data.root: {msg}")


def read_manifest(root: Path) -> dict:
    if not root.is_dir():
        raise _fail(f"{root} not found (expected a folder written by `{_HOW} {root}`)")
    path = root / MANIFEST
    if not path.is_file():
        hint = " (it looks like an image folder: use data.name=imagefolder, or prepare it)" \
            if (root / "train").is_dir() else ""
        raise _fail(f"{path} is missing: not a complete prepared folder{hint}; write one with `{_HOW} {root}`")
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise _fail(f"{path} is not readable JSON ({type(e).__name__}); prepare the folder again") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise _fail(f"{path} is not a toolkit.prepare manifest (format {m.get('format') if isinstance(m, dict) else None!r})")
    if m.get("version") != VERSION:
        raise _fail(f"{path} has format version {m.get('version')!r}; this toolkit reads version {VERSION}: "
                    "prepare the folder again")
    try:
        ok = (isinstance(m["image_size"], int) and m["image_size"] > 0 and isinstance(m["class_names"], list)
              and len(m["class_names"]) > 0 and len(m["mean"]) == 3 and len(m["std"]) == 3
              and all(isinstance(v["size"], int) and isinstance(v["file"], str) and isinstance(v["bytes"], int)
                      for v in m["splits"].values()))
    except (KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise _fail(f"{path} lacks or mangles image_size, class_names, mean, std or splits; prepare the folder again")
    return m


def load_split(root: Path, m: dict, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> images (N, 3, S, S) uint8, labels (N,) int64, checked against the manifest."""
    from safetensors.torch import load_file

    info = m["splits"][name]
    path = root / Path(info["file"]).name  # a bare file name: the manifest cannot point outside root
    if not path.is_file():
        raise _fail(f"{path} is missing (listed in {root / MANIFEST}); prepare the folder again")
    size = path.stat().st_size
    if size != info["bytes"]:
        raise _fail(f"{path} is truncated or changed ({size} of {info['bytes']} bytes); prepare the folder again")
    try:
        tensors = load_file(str(path))
    except Exception as e:  # bad header, offsets past the end: safetensors' own checks
        msg = str(e).splitlines()[0] if str(e) else ""
        raise _fail(f"{path} is not a readable safetensors file ({type(e).__name__}: {msg})") from None
    n, s = info["size"], m["image_size"]
    images, labels = tensors.get("images"), tensors.get("labels")
    if (images is None or labels is None or images.dtype != torch.uint8 or labels.dtype != torch.int64
            or tuple(images.shape) != (n, 3, s, s) or tuple(labels.shape) != (n,)):
        got = {k: (str(v.dtype).replace("torch.", ""), tuple(v.shape)) for k, v in tensors.items()}
        raise _fail(f"{path} holds {got}; the manifest expects images uint8 {(n, 3, s, s)} and labels int64 ({n},)")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= len(m["class_names"])):
        raise _fail(f"{path} has labels outside 0..{len(m['class_names']) - 1}; prepare the folder again")
    return images, labels


def _check_args(root: Optional[str], image_size, train_splits) -> Tuple[Path, List[str]]:
    if root is None:
        raise ConfigError("config: data.root: prepared needs data.root (a folder written by "
                          f"`{_HOW} OUT`)")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise ConfigError(f"config: data.image_size: {image_size!r} is not a positive integer")
    splits = ["train"] if train_splits is None else list(train_splits)
    if not splits:
        raise ConfigError("config: data.train_splits: empty; name at least one prepared split, e.g. [train]")
    dupes = sorted({str(s) for s in splits if splits.count(s) > 1})
    if dupes:
        raise ConfigError(f"config: data.train_splits: {', '.join(dupes)} listed twice")
    return Path(root), [str(s) for s in splits]


@DATASETS.register("prepared")
def prepared(root: str | None = None, split_seed: int = 0, limit: int | None = None,
             download: bool = False, image_size: int | None = None,
             train_splits: list[str] | None = None, **_) -> Splits:
    """Build train/val/test from a `toolkit.prepare` folder; see the module docstring."""
    root_path, train_names = _check_args(root, image_size, train_splits)
    m = read_manifest(root_path)
    if image_size is not None and image_size != m["image_size"]:
        raise ConfigError(f"config: data.image_size: {image_size}, but {root_path} was prepared at "
                          f"{m['image_size']} px; set data.image_size={m['image_size']} (or null), or prepare "
                          f"again with --image-size {image_size}")
    available = list(m["splits"])
    for name in [*train_names, "val", "test"]:
        if name not in m["splits"]:
            key = "data.train_splits" if name in train_names else "data.root"
            raise ConfigError(f"config: {key}: split {name!r} was not prepared in {root_path} (prepared: "
                              f"{', '.join(available) or 'none'}); prepare it with --splits ... {name}")
    loaded: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
    for name in dict.fromkeys([*train_names, "val", "test"]):  # each file read once
        loaded[name] = load_split(root_path, m, name)
    xs = [loaded[n][0] for n in train_names]
    ys = [loaded[n][1] for n in train_names]
    parts = {"train": (xs[0], ys[0]) if len(xs) == 1 else (torch.cat(xs), torch.cat(ys)),
             "val": loaded["val"], "test": loaded["test"]}
    if limit is not None:
        keep = {k: torch.from_numpy(stratified_limit(y, limit, split_seed)) for k, (_, y) in parts.items()}
        parts = {k: (x[keep[k]], y[keep[k]]) for k, (x, y) in parts.items()}  # copies: the rest is freed
    mean, std = torch.tensor(m["mean"], dtype=torch.float32), torch.tensor(m["std"], dtype=torch.float32)
    data = {k: TensorImageDataset(x, y.clone(), mean=mean, std=std) for k, (x, y) in parts.items()}
    return Splits(train=data["train"], val=data["val"], test=data["test"], num_classes=len(m["class_names"]),
                  class_names=list(m["class_names"]),
                  meta={"image_size": m["image_size"], "mean": list(m["mean"]), "std": list(m["std"]),
                        "sizes": {k: len(v) for k, v in data.items()}, "root": str(root_path),
                        "source_root": m.get("source_root"), "train_splits": train_names,
                        "val_in_train": "val" in train_names})
