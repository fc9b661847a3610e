"""On-disk feature store: shards written by any number of ranks, read back as one ordered set.

    feats = load_features("runs/extract_resnet50/features")   # features (N, D), labels, paths, meta
    for rows in iter_shards(dir): ...                          # bounded memory, dataset order

Layout of a features directory:
    shards/part-000007.safetensors   features (n, D) float32, index (n,) int64, labels (n,) int64
    shards/part-000007.json          done marker: rows, sha256 of the shard file, the bad images
    meta.json                        written last, by rank 0: model, layer, preprocessing, counts
    manifest.csv                     row, index, path, label, class of every extracted image
    bad_images.txt                   index, path, reason of every image that did not decode
    config.yaml, summary.json

Shard k holds dataset indices [k * shard_size, (k + 1) * shard_size) minus the bad images, so
the shards do not depend on the world size, and concatenating them in k order gives every
good image exactly once in dataset order. A shard counts as done only when its marker exists
and the shard file's size and checksum match it; both are written to a temp name and renamed,
so a crash leaves either a complete shard or nothing usable (toolkit.rundir.write_atomic).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from toolkit.errors import ConfigError
from toolkit.rundir import sha256, write_atomic, write_atomic_text

SHARDS = "shards"
META = "meta.json"


def shard_name(k: int) -> str:
    return f"part-{k:06d}"


def shard_ranges(n: int, shard_size: int) -> List[range]:
    return [range(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]


def write_shard(folder: Path, k: int, features: torch.Tensor, index: torch.Tensor, labels: torch.Tensor,
                bad: Sequence[Tuple[int, str, str]]) -> Path:
    """Write shard k (features (n, D) float32, index/labels (n,) int64) and then its marker."""
    folder.mkdir(parents=True, exist_ok=True)
    name = shard_name(k)
    final = folder / f"{name}.safetensors"
    tensors = {"features": features.contiguous(), "index": index.contiguous(), "labels": labels.contiguous()}
    write_atomic(final, lambda tmp: save_file(tensors, str(tmp)))
    marker = {"shard": k, "rows": int(len(index)), "dim": int(features.shape[1]) if features.ndim == 2 else 0,
              "bytes": final.stat().st_size, "sha256": sha256(final),
              "bad": [[int(i), str(p), str(r)] for i, p, r in bad]}
    write_atomic_text(folder / f"{name}.json", json.dumps(marker))
    return final


def shard_marker(folder: Path, k: int, check_sum: bool = True) -> Optional[Dict[str, Any]]:
    """Shard k's marker if the shard is complete and intact, else None."""
    name = shard_name(k)
    try:
        marker = json.loads((folder / f"{name}.json").read_text())
        data = folder / f"{name}.safetensors"
        if data.stat().st_size != marker["bytes"]:
            return None
        if check_sum and sha256(data) != marker["sha256"]:
            return None
        return marker
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_shard(folder: Path, k: int) -> Dict[str, torch.Tensor]:
    return load_file(str(folder / f"{shard_name(k)}.safetensors"))


@dataclass
class Features:
    """A complete features directory, loaded: rows in dataset order, bad images left out."""

    path: Path
    features: torch.Tensor  # (N, D) float32
    index: torch.Tensor  # (N,) int64: the dataset index of each row
    labels: torch.Tensor  # (N,) int64, -1 where unknown
    paths: List[str]
    class_names: List[str]
    meta: Dict[str, Any] = field(default_factory=dict)


def read_meta(path: Path) -> Dict[str, Any]:
    """meta.json of a complete features directory; a one-line error otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"--features: no such directory: {path}")
    meta_file = path / META
    if not meta_file.is_file():
        done = len(list((path / SHARDS).glob("part-*.json"))) if (path / SHARDS).is_dir() else 0
        raise ConfigError(f"--features: {path} holds no finished extraction ({done} shard(s) done, no {META}); "
                          "rerun the extraction with the same run.dir to finish it")
    try:
        return json.loads(meta_file.read_text())
    except ValueError:
        raise ConfigError(f"--features: {meta_file} is not valid JSON") from None


def iter_shards(path: Path, meta: Optional[Dict[str, Any]] = None) -> Iterator[Dict[str, torch.Tensor]]:
    """Shard contents in order; a missing or damaged shard is a one-line error."""
    path = Path(path)
    meta = meta or read_meta(path)
    for k in range(meta["num_shards"]):
        try:
            rows = read_shard(path / SHARDS, k)
        except (OSError, SafetensorError) as e:
            raise ConfigError(f"--features: shard {shard_name(k)} in {path} is missing or damaged ({e}); "
                              "delete its .json marker and rerun the extraction") from None
        yield rows


def read_manifest(path: Path) -> List[Dict[str, str]]:
    with open(Path(path) / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def load_features(path: Path) -> Features:
    """Every row of a complete features directory, in dataset order."""
    path = Path(path)
    meta = read_meta(path)
    parts = [p for p in iter_shards(path, meta) if len(p["index"])]  # a shard of only bad images is empty
    dim = meta["dim"]
    feats = torch.cat([p["features"] for p in parts]) if parts else torch.empty(0, dim)
    index = torch.cat([p["index"] for p in parts]) if parts else torch.empty(0, dtype=torch.int64)
    labels = torch.cat([p["labels"] for p in parts]) if parts else torch.empty(0, dtype=torch.int64)
    if len(index) != meta["rows"]:
        raise ConfigError(f"--features: {path} has {len(index)} rows in its shards but meta.json says {meta['rows']}")
    rows = read_manifest(path)
    return Features(path=path, features=feats, index=index, labels=labels, paths=[r["path"] for r in rows],
                    class_names=list(meta.get("class_names", [])), meta=meta)


def write_manifest(path: Path, index: torch.Tensor, labels: torch.Tensor, paths: Sequence[str],
                   class_names: Sequence[str]) -> None:
    """manifest.csv: row, index, path, label, class of every row, in row order."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["row", "index", "path", "label", "class"])
            for row, (i, y, p) in enumerate(zip(index.tolist(), labels.tolist(), paths)):
                w.writerow([row, i, p, y, class_names[y] if 0 <= y < len(class_names) else ""])

    write_atomic(path, write)
