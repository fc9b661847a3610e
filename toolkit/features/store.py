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

Readers trust nothing they read (`read_meta`, `read_markers`, `read_manifest`, `iter_shards`):
meta.json's counts, each marker, each shard's size, shape and index range, and the manifest's
rows are checked against one another, and each shard's sha256 whenever the set is small enough
to hash in about half a second (VERIFY_AUTO_BYTES) or the caller asks (`verify=True`, retrieve's
--verify). A damaged file is one line naming it (ConfigError); a rerun of the same extraction
recomputes a damaged shard and rewrites the manifest and meta.json.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file, save_file

from toolkit.errors import ConfigError
from toolkit.rundir import sha256, write_atomic, write_atomic_text

SHARDS = "shards"
META = "meta.json"
MANIFEST = "manifest.csv"
MANIFEST_COLUMNS = ["row", "index", "path", "label", "class"]
# Shards up to this many bytes in all are checksummed on every read: sha256 runs at ~1 GB/s on
# one core, so about half a second. Larger sets are checked for size and shape; --verify hashes them too.
VERIFY_AUTO_BYTES = 512 << 20


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


def damaged(path: Path, what: str) -> ConfigError:
    return ConfigError(f"{path} {what}: the features directory is damaged; rerun the same extraction "
                       "into it to repair it")


def read_meta(path: Path) -> Dict[str, Any]:
    """meta.json of a complete features directory, its counts checked; a one-line error otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"--features: no such directory: {path}")
    meta_file = path / META
    if not meta_file.is_file():
        done = len(list((path / SHARDS).glob("part-*.json"))) if (path / SHARDS).is_dir() else 0
        raise ConfigError(f"--features: {path} holds no finished extraction ({done} shard(s) done, no {META}); "
                          "rerun the extraction with the same run.dir to finish it")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError):
        raise damaged(meta_file, "is not valid JSON") from None
    if not isinstance(meta, dict):
        raise damaged(meta_file, "is not a JSON object")
    for key in ("rows", "dim", "num_shards", "shard_size"):
        if not isinstance(meta.get(key), int) or isinstance(meta.get(key), bool) or meta[key] < 0:
            raise damaged(meta_file, f"has no count {key!r}")
    return meta


def _marker_fields(marker: Any) -> Tuple[int, int, str]:
    """(rows, bytes, sha256) of a shard marker, or ValueError."""
    rows, size, sha = marker["rows"], marker["bytes"], marker["sha256"]
    if not (isinstance(rows, int) and isinstance(size, int) and isinstance(sha, str)) or rows < 0:
        raise ValueError("bad marker")
    return rows, size, sha


def read_markers(path: Path, meta: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Every shard's marker, checked against its shard file's size and, together, against the
    row count in meta.json. Cheap: no shard is read."""
    path, shards = Path(path), Path(path) / SHARDS
    markers = []
    for k in range(meta["num_shards"]):
        mfile, data = shards / f"{shard_name(k)}.json", shards / f"{shard_name(k)}.safetensors"
        try:
            marker = json.loads(mfile.read_text())
            rows, size, _ = _marker_fields(marker)
        except FileNotFoundError:
            raise damaged(mfile, "is missing") from None
        except (OSError, ValueError, KeyError, TypeError):
            raise damaged(mfile, "is not a shard marker") from None
        try:
            actual = data.stat().st_size
        except FileNotFoundError:
            raise damaged(data, "is missing") from None
        if actual != size:
            raise damaged(data, f"is {actual} bytes, its marker says {size}")
        if rows > meta["shard_size"]:
            raise damaged(mfile, f"says {rows} rows, more than a shard's {meta['shard_size']}")
        markers.append(marker)
    total = sum(m["rows"] for m in markers)
    if total != meta["rows"]:
        raise damaged(path / META, f"says {meta['rows']} rows, its {len(markers)} shards hold {total}")
    return markers


def should_verify(markers: Sequence[Dict[str, Any]], verify: Optional[bool]) -> bool:
    """verify=None: checksum when the shards are cheap to hash (VERIFY_AUTO_BYTES)."""
    return verify if verify is not None else sum(m["bytes"] for m in markers) <= VERIFY_AUTO_BYTES


def read_checked_shard(path: Path, k: int, marker: Dict[str, Any], meta: Dict[str, Any],
                       verify: bool) -> Dict[str, torch.Tensor]:
    """Shard k, checked: its sha256 (when verify: hashed from the bytes that are then parsed, so
    the file is read once), its tensors' shapes and dtypes against the marker and meta.json, and
    its index within the shard's range, increasing (a shard moved to another name fails)."""
    data = Path(path) / SHARDS / f"{shard_name(k)}.safetensors"
    try:
        if verify:
            raw = data.read_bytes()
            if hashlib.sha256(raw).hexdigest() != marker["sha256"]:
                raise damaged(data, "fails its checksum (the sha256 in its marker)")
            rows = load_bytes(raw)
        else:
            rows = load_file(str(data))
    except (OSError, SafetensorError, ValueError, RuntimeError) as e:
        why = " ".join(str(e).split())[:120] or type(e).__name__
        raise damaged(data, f"cannot be read ({why})") from None
    n, dim = marker["rows"], meta["dim"]
    f, index, labels = rows.get("features"), rows.get("index"), rows.get("labels")
    if f is None or index is None or labels is None:
        raise damaged(data, "lacks features, index or labels")
    shape_ok = (f.dtype == torch.float32 and (tuple(f.shape) == (n, dim) or n == 0 and f.numel() == 0)
                and index.dtype == labels.dtype == torch.int64 and tuple(index.shape) == tuple(labels.shape) == (n,))
    if not shape_ok:
        raise damaged(data, f"holds features {tuple(f.shape)} and index {tuple(index.shape)}, "
                            f"its marker and {META} say ({n}, {dim}) and ({n},)")
    low, high = k * meta["shard_size"], (k + 1) * meta["shard_size"]
    if n and (int(index[0]) < low or int(index[-1]) >= high or (n > 1 and bool((index[1:] <= index[:-1]).any()))):
        raise damaged(data, f"holds dataset indices outside shard {k}'s range [{low}, {high})")
    return rows


def iter_shards(path: Path, meta: Optional[Dict[str, Any]] = None, verify: Optional[bool] = None,
                manifest: Optional[List[Dict[str, str]]] = None) -> Iterator[Dict[str, torch.Tensor]]:
    """Shard contents in order, each checked (read_checked_shard); a missing or damaged shard is
    a one-line error. With the manifest, each shard's index and labels must equal its rows'."""
    path = Path(path)
    meta = meta or read_meta(path)
    markers = read_markers(path, meta)
    verify = should_verify(markers, verify)
    expect = manifest_columns(path, manifest) if manifest is not None else None
    offset = 0
    for k, marker in enumerate(markers):
        rows = read_checked_shard(path, k, marker, meta, verify)
        n = marker["rows"]
        if expect is not None and not (torch.equal(rows["index"], expect[0][offset:offset + n])
                                       and torch.equal(rows["labels"], expect[1][offset:offset + n])):
            raise damaged(path / MANIFEST, f"rows {offset}..{offset + n - 1} do not match {SHARDS}/"
                                           f"{shard_name(k)}.safetensors (another extraction's manifest?)")
        offset += n
        yield rows


def read_manifest(path: Path, meta: Optional[Dict[str, Any]] = None) -> List[Dict[str, str]]:
    """manifest.csv's rows, checked: its header, one line per row of meta.json, rows numbered
    0.. in order."""
    path = Path(path)
    meta = meta or read_meta(path)
    read_markers(path, meta)  # meta.json's row count agrees with the shards before it judges the manifest
    file = path / MANIFEST
    try:
        with open(file, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = reader.fieldnames
    except FileNotFoundError:
        raise damaged(file, "is missing") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise damaged(file, f"cannot be read ({type(e).__name__})") from None
    if header != MANIFEST_COLUMNS:
        raise damaged(file, f"has header {header}, expected {MANIFEST_COLUMNS}")
    if len(rows) != meta["rows"]:
        raise damaged(file, f"has {len(rows)} rows, {META} says {meta['rows']}")
    for n, r in enumerate(rows):
        if r["row"] != str(n) or None in r or any(v is None for v in r.values()):
            raise damaged(file, f"line {n + 2} is not row {n} of {len(MANIFEST_COLUMNS)} fields")
    return rows


def manifest_columns(path: Path, manifest: List[Dict[str, str]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(index, labels) of the manifest's rows, (N,) int64 each."""
    try:
        return (torch.tensor([int(r["index"]) for r in manifest], dtype=torch.int64),
                torch.tensor([int(r["label"]) for r in manifest], dtype=torch.int64))
    except (ValueError, TypeError):
        raise damaged(Path(path) / MANIFEST, "has a row whose index or label is not an integer") from None


def load_features(path: Path, verify: Optional[bool] = None) -> Features:
    """Every row of a complete features directory, in dataset order, every file checked."""
    path = Path(path)
    meta = read_meta(path)
    manifest = read_manifest(path, meta)
    # a shard of only bad images is empty
    parts = [p for p in iter_shards(path, meta, verify, manifest) if len(p["index"])]
    dim = meta["dim"]
    feats = torch.cat([p["features"] for p in parts]) if parts else torch.empty(0, dim)
    index = torch.cat([p["index"] for p in parts]) if parts else torch.empty(0, dtype=torch.int64)
    labels = torch.cat([p["labels"] for p in parts]) if parts else torch.empty(0, dtype=torch.int64)
    return Features(path=path, features=feats, index=index, labels=labels, paths=[r["path"] for r in manifest],
                    class_names=list(meta.get("class_names", [])), meta=meta)


def write_manifest(path: Path, index: torch.Tensor, labels: torch.Tensor, paths: Sequence[str],
                   class_names: Sequence[str]) -> None:
    """manifest.csv: row, index, path, label, class of every row, in row order."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(MANIFEST_COLUMNS)
            for row, (i, y, p) in enumerate(zip(index.tolist(), labels.tolist(), paths)):
                w.writerow([row, i, p, y, class_names[y] if 0 <= y < len(class_names) else ""])

    write_atomic(path, write)
