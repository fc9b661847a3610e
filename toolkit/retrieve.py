"""Image search and retrieval evaluation over an extracted features directory.

    python -m toolkit.retrieve search --features RUN/features --query img.jpg --topk 5 --grid top5.png
    python -m toolkit.retrieve search --features RUN/features --query-index 17
    python -m toolkit.retrieve eval   --features RUN/features --topk 1,5,10        # leave-one-out
    python -m toolkit.retrieve eval   --features GALLERY/features --queries QUERIES/features
    python -m toolkit.retrieve pairs  --features RUN/features a.jpg b.jpg c.jpg   # E3's distance table
    python -m toolkit.retrieve pairs  --features RUN/features --rows 0 5 17      # gallery rows (datasets)
    toolkit-retrieve eval --features RUN/features                               # from any directory

Features of a dataset split (digits, cifar10, ...) have no image files: name gallery rows instead
(`search --query-index N`, `pairs --rows N N ...`; rows as in manifest.csv), and `--grid` draws
the rows' images from the split itself, rebuilt as the extraction built it (FEATURES/config.yaml)
and shown as they were before normalisation.

Similarity is the dot product of L2-normalised features (cosine); the Euclidean distance
between normalised vectors is sqrt(2 - 2 cos), which ranks identically. Exact search is a
chunked matrix product with a running top-k: memory is O(queries x (k + chunk)), never
queries x gallery. Ties go to the earlier gallery row, so results do not depend on the chunk
size. `--backend faiss` (the optional `faiss-cpu` package) searches a flat inner-product index
and gives the same results.

Evaluation metrics, per query, over the gallery ranked by similarity (the query itself left
out in leave-one-out mode); a gallery image is relevant when it has the query's class:
  precision@k  share of the top k that are relevant: the reports' "accuracy" (E3: 56% at k=5)
  hit_rate@k   share of queries with at least one relevant image in the top k (what
               metric-learning papers call Recall@k)
  recall@k     share of the query's relevant images that are in the top k
  mAP          mean over queries of average precision over the whole ranking
Queries with an unknown class are skipped; queries with no relevant gallery image count in
precision@k and hit_rate@k (as misses) and are left out of recall@k and mAP, and the JSON says
how many there were.

Nothing read is trusted: meta.json's counts, every shard's marker, size, shape and index range,
and the manifest's rows are checked against one another before a result is printed, and each
shard's sha256 too for sets up to 512 MiB (any size with --verify). A damaged or missing file is
one `error:` line naming it, exit 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from toolkit.clihelp import epilog
from toolkit.errors import ConfigError, ToolkitError

QUERY_BLOCK_ELEMENTS = 1 << 25  # similarity entries held at once in eval: 128 MiB of float32
VERIFY_HELP = ("check every shard's sha256 (done anyway for shards up to 512 MiB in all; sizes, shapes and "
               "row counts are always checked)")


# ------------------------------------------------------------------------------------------
# exact search


# A float32 cosine of two unit vectors carries the rounding of a D-term sum: an image and itself
# come out at 0.99999994 or further off (typically sqrt(D) x 6e-8, ~3e-6 for D = 2048), which
# sqrt(2 - 2 cos) turns into a distance of 3.5e-4 or more. Within 2^-16 (1.5e-5) of 1 a cosine
# cannot be told from 1, so it is taken as 1 (a distance below 5.5e-3 reads as 0).
_COS_ONE = 1.0 - 2.0 ** -16


def euclidean_from_cosine(cos: float) -> float:
    """The Euclidean distance between unit vectors with cosine `cos`: 0 for an image and itself."""
    return 0.0 if cos >= _COS_ONE else math.sqrt(max(0.0, 2.0 - 2.0 * cos))


def topk_search(queries: torch.Tensor, gallery: Iterable[torch.Tensor], k: int,
                exclude: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """queries (Q, D), gallery chunks (c_i, D) in row order -> scores (Q, k'), rows (Q, k').

    Dot-product similarity; k' = min(k, gallery rows available). `exclude` (Q,) holds one
    gallery row per query to leave out (its own row in leave-one-out), or -1 for none."""
    q = queries.float()
    best_s = torch.empty(len(q), 0)
    best_i = torch.empty(len(q), 0, dtype=torch.int64)
    offset = 0
    for chunk in gallery:
        s = q @ chunk.float().T  # (Q, c)
        rows = torch.arange(offset, offset + len(chunk)).expand(len(q), -1)  # (Q, c)
        if exclude is not None:
            s = s.masked_fill(rows == exclude[:, None], float("-inf"))
        # Earlier rows first, then a stable sort: ties keep the lower row whatever the chunking.
        cat_s, cat_i = torch.cat([best_s, s], 1), torch.cat([best_i, rows], 1)
        order = torch.sort(cat_s, dim=1, descending=True, stable=True).indices[:, :k]
        best_s, best_i = cat_s.gather(1, order), cat_i.gather(1, order)
        offset += len(chunk)
    if exclude is not None:  # an excluded row can only be in the result when the gallery ran out
        keep = torch.isfinite(best_s).all(0)
        best_s, best_i = best_s[:, keep], best_i[:, keep]
    return best_s, best_i


def chunks(x: torch.Tensor, size: int) -> Iterable[torch.Tensor]:
    for i in range(0, len(x), size):
        yield x[i:i + size]


def faiss_topk(queries: torch.Tensor, gallery: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The same search on a FAISS flat inner-product index (needs the optional faiss-cpu)."""
    try:
        import faiss
    except ImportError:
        raise ConfigError("--backend faiss: faiss is not installed; pip install faiss-cpu "
                          "(or use the default exact backend)") from None
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(gallery.float().contiguous().numpy())
    s, i = index.search(queries.float().contiguous().numpy(), min(k, len(gallery)))
    return torch.from_numpy(s), torch.from_numpy(i).long()


# ------------------------------------------------------------------------------------------
# evaluation


def retrieval_metrics(q_feats: torch.Tensor, q_labels: torch.Tensor, g_feats: torch.Tensor, g_labels: torch.Tensor,
                      ks: Sequence[int], leave_one_out: bool = False,
                      block_elements: int = QUERY_BLOCK_ELEMENTS) -> Dict[str, Any]:
    """Metrics of the module docstring. In leave-one-out mode the queries are the gallery
    (same rows, same order) and each query's own row is left out of its ranking."""
    if leave_one_out and len(q_feats) != len(g_feats):
        raise ValueError("leave-one-out needs the queries to be the gallery")
    known = (q_labels >= 0).nonzero().flatten()  # queries with a class
    if len(known) == 0:
        raise ConfigError("eval: no query has a known class (labels come from class folders)")
    gallery_size = len(g_feats) - (1 if leave_one_out else 0)
    bad_k = [k for k in ks if not 1 <= k <= gallery_size]
    if bad_k:
        raise ConfigError(f"--topk: {bad_k[0]} must be in [1, {gallery_size}] (the gallery size"
                          f"{' minus the query' if leave_one_out else ''})")
    block = max(1, block_elements // max(1, len(g_feats)))
    g = g_feats.float()
    sums = {f"{m}@{k}": 0.0 for k in ks for m in ("precision", "hit_rate", "recall")}
    ap_sum, with_rel = 0.0, 0
    for start in range(0, len(known), block):
        rows = known[start:start + block]  # (q,)
        s = q_feats[rows].float() @ g.T  # (q, G)
        rel = q_labels[rows][:, None] == g_labels[None, :]  # (q, G) bool
        if leave_one_out:
            s[torch.arange(len(rows)), rows] = float("-inf")
            rel[torch.arange(len(rows)), rows] = False
        order = torch.sort(s, dim=1, descending=True, stable=True).indices  # (q, G)
        rel_sorted = rel.gather(1, order).float()
        hits = rel_sorted.cumsum(1)  # (q, G): relevant images within the first j+1
        n_rel = rel.sum(1).float()  # (q,)
        has = n_rel > 0
        for k in ks:
            h = hits[:, k - 1]
            sums[f"precision@{k}"] += (h / k).sum().item()
            sums[f"hit_rate@{k}"] += (h > 0).float().sum().item()
            sums[f"recall@{k}"] += (h[has] / n_rel[has]).sum().item()
        ranks = torch.arange(1, s.shape[1] + 1, dtype=torch.float32)
        ap = (rel_sorted * hits / ranks).sum(1)[has] / n_rel[has]  # precision at each relevant rank
        ap_sum += ap.sum().item()
        with_rel += int(has.sum())
    n = len(known)
    out: Dict[str, Any] = {"queries": n, "queries_without_relevant": n - with_rel, "gallery": gallery_size,
                           "leave_one_out": leave_one_out,
                           "mAP": ap_sum / with_rel if with_rel else float("nan")}
    for k in ks:
        out[f"precision@{k}"] = sums[f"precision@{k}"] / n
        out[f"hit_rate@{k}"] = sums[f"hit_rate@{k}"] / n
        out[f"recall@{k}"] = sums[f"recall@{k}"] / with_rel if with_rel else float("nan")
    return out


# ------------------------------------------------------------------------------------------
# queries: the model and preprocessing recorded with the features


class QueryEncoder:
    """Encodes image files exactly as the features in DIR were extracted (model, layer, size).
    `what` and `by_row` name, in the refusal for a dataset's features, the option that took the
    files and the one that names gallery rows instead (each command has its own).

    `dataset_images=True` also takes the features of a dataset split whose items are pictures of
    the size and normalisation meta.json records (digits, CIFAR): a file is then resized and
    normalised as those were. The CLIs keep refusing it (their files are meant to be gallery
    rows); the demo page (toolkit.demo) searches a dataset's gallery with uploaded pictures."""

    def __init__(self, features_dir: Path, meta: Dict[str, Any], what: str = "--query",
                 by_row: str = "--query-index N", dataset_images: bool = False):
        from toolkit.config import load_extract_config
        from toolkit.features import Extractor, build_model

        pre = meta["preprocess"]
        pictures = dataset_images and pre.get("kind") == "dataset" and {"image_size", "mean", "std"} <= set(pre)
        if pre.get("kind") != "resize_center_crop" and not pictures:
            raise ConfigError(f"{what}: the features in {features_dir} come from the {pre.get('dataset')} dataset, "
                              f"not from image files; name gallery rows with {by_row}")
        cfg = load_extract_config(str(Path(features_dir) / "config.yaml"))
        model, _ = build_model(cfg.model, cfg.run.seed)
        self.extractor = Extractor(model, meta["layer"], True).eval()
        from toolkit.data.base import Normalize
        from toolkit.data.collection import resize_center_crop_uint8

        # the gallery's own pipeline (ImageCollection): uint8 resize + crop, then the shared Normalize
        self.transform = resize_center_crop_uint8(pre["image_size"])
        self.normalize = Normalize(pre["mean"], pre["std"])

    def __call__(self, paths: Sequence[str]) -> torch.Tensor:
        from toolkit.data.images import load_rgb

        xs = []
        for p in paths:
            if not Path(p).is_file():
                raise ConfigError(f"--query: no such file: {p}")
            try:
                xs.append(self.transform(load_rgb(p)))
            except Exception as e:
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise ConfigError(f"--query: cannot read image {p} ({type(e).__name__}: {msg})") from None
        with torch.inference_mode():
            return self.extractor(self.normalize(torch.stack(xs)))  # (Q, D), L2-normalised


def _gallery_chunks(path: Path, meta: Dict[str, Any], normalise: bool, verify: Optional[bool],
                    manifest: List[Dict[str, str]]) -> Iterable[torch.Tensor]:
    """The gallery's features shard by shard, each shard checked as it is read (and against the
    manifest whose rows the results name)."""
    from toolkit.features import iter_shards

    for shard in iter_shards(path, meta, verify, manifest):
        f = shard["features"]
        if len(f):
            yield F.normalize(f, dim=1) if normalise else f


# ------------------------------------------------------------------------------------------
# commands


def _console():
    from rich.console import Console

    return Console(highlight=False)


def cmd_search(args) -> int:
    from rich.table import Table

    from toolkit.features import read_manifest, read_meta

    meta = read_meta(args.features)
    if args.topk < 1:
        raise ConfigError(f"--topk: must be >= 1, got {args.topk}")
    manifest = read_manifest(args.features, meta)  # its rows are what the results name
    normalise = not meta.get("l2_normalize", True)
    exclude = None
    if args.query_index is not None:
        if not 0 <= args.query_index < meta["rows"]:
            raise ConfigError(f"--query-index: must be in [0, {meta['rows']}), got {args.query_index}")
        from toolkit.features import load_features

        feats = load_features(args.features, args.verify).features
        q = feats[args.query_index:args.query_index + 1]
        q = F.normalize(q, dim=1) if normalise else q
        names = [manifest[args.query_index]["path"]]
        exclude = torch.tensor([args.query_index])
    else:
        q = QueryEncoder(args.features, meta)(args.query)
        names = list(args.query)
    if args.backend == "faiss":
        from toolkit.features import load_features

        g = load_features(args.features, args.verify).features
        g = F.normalize(g, dim=1) if normalise else g
        k = args.topk + (1 if exclude is not None else 0)
        scores, rows = faiss_topk(q, g, k)
        if exclude is not None:
            keep = rows[0] != exclude[0]
            scores, rows = scores[:, keep][:, :args.topk], rows[:, keep][:, :args.topk]
    else:
        scores, rows = topk_search(q, _gallery_chunks(args.features, meta, normalise, args.verify, manifest),
                                   args.topk, exclude)
    results = []
    console = _console()
    query_rows = [args.query_index] if args.query_index is not None else [None] * len(names)
    for qi, name in enumerate(names):
        table = Table(title=f"top {scores.shape[1]} for {name}")
        for col in ("rank", "cosine", "euclidean", "class", "path"):
            table.add_column(col, justify="right" if col in ("rank", "cosine", "euclidean") else "left")
        hits = []
        for r, (s, row) in enumerate(zip(scores[qi].tolist(), rows[qi].tolist()), 1):
            m = manifest[row]
            dist = euclidean_from_cosine(s)
            table.add_row(str(r), f"{s:.4f}", f"{dist:.4f}", m["class"], m["path"])
            hits.append({"rank": r, "row": row, "cosine": s, "euclidean": dist, "class": m["class"],
                         "path": m["path"]})
        console.print(table)
        entry: Dict[str, Any] = {"query": name, "results": hits}
        if query_rows[qi] is not None:
            entry["query_row"] = query_rows[qi]
        results.append(entry)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.grid:
        write_grid(results, args.grid, GalleryImages(args.features, meta, manifest))
        print(f"wrote {args.grid}")
    return 0


class GalleryImages:
    """The picture of a gallery row, for grids: its file where the row is an image file, else its
    image in the dataset split the features came from, rebuilt as the extraction built it
    (FEATURES/config.yaml: data.root, split_seed, limit; meta.json: dataset, split, size) and
    checked against the manifest (image count, each drawn row's label)."""

    def __init__(self, features_dir: Path, meta: Dict[str, Any], manifest: List[Dict[str, str]]):
        self.features_dir, self.meta, self.manifest = Path(features_dir), meta, manifest
        self._split: Optional[tuple] = None  # (dataset, mean, std), built on first use

    @staticmethod
    def file(path: str):
        """(H, W, 3) uint8 of an image file, or None where it does not read."""
        from toolkit.data.images import load_rgb

        try:
            return load_rgb(path)
        except Exception:
            return None

    def row(self, r: int):
        """(H, W, 3) uint8 of gallery row r (None: a file that does not read)."""
        m = self.manifest[r]
        if self.meta["preprocess"].get("kind") != "dataset" or Path(m["path"]).is_file():
            return self.file(m["path"])  # a folder's image, or a dataset whose items are files
        ds, mean, std = self._dataset()
        i, label = int(m["index"]), int(m["label"])
        if not 0 <= i < len(ds) or int(ds.labels[i]) != label:
            raise self._differs(f"row {r} (index {i}) has label {label} in manifest.csv but not in the split")
        images = getattr(ds, "images", None)
        if isinstance(images, torch.Tensor) and images.dtype == torch.uint8:
            x = images[i]  # (C, S, S) uint8: the stored pixels
        else:  # (C, S, S) float normalised with the split's statistics: undo it for display
            x, _ = ds[i]
            if x.dtype != torch.uint8:
                c = x.shape[0]
                m_t = torch.as_tensor(mean if mean is not None else [0.0] * c, dtype=torch.float32).view(-1, 1, 1)
                s_t = torch.as_tensor(std if std is not None else [1.0] * c, dtype=torch.float32).view(-1, 1, 1)
                x = ((x.float() * s_t + m_t).clamp(0, 1) * 255).round().to(torch.uint8)
        if x.shape[0] == 1:
            x = x.expand(3, -1, -1)
        return x.permute(1, 2, 0).numpy()  # (S, S, 3)

    def _differs(self, why: str) -> ConfigError:
        pre = self.meta["preprocess"]
        return ConfigError(f"--grid: the {pre.get('dataset')} {pre.get('split')} split rebuilt from "
                           f"{self.features_dir / 'config.yaml'} does not match these features ({why}); "
                           "the dataset changed since the extraction")

    def _dataset(self) -> tuple:
        if self._split is None:
            from toolkit.config import load_extract_config
            from toolkit.data import DATASETS

            pre = self.meta["preprocess"]
            stored = self.features_dir / "config.yaml"
            where = f"the {pre.get('dataset')} {pre.get('split')} split these features came from"
            try:
                d = load_extract_config(str(stored)).data
                splits = DATASETS.build(pre["dataset"], root=d.root, split_seed=d.split_seed, limit=d.limit,
                                        download=False, image_size=pre.get("image_size"), train_splits=["train"])
                ds = getattr(splits, pre["split"])
            except (ConfigError, KeyError, AttributeError) as e:
                raise ConfigError(f"--grid: cannot rebuild {where} to draw it: {e}") from None
            if len(ds) != self.meta.get("num_images"):
                raise self._differs(f"{len(ds)} images, meta.json says {self.meta.get('num_images')}")
            self._split = (ds, splits.meta.get("mean"), splits.meta.get("std"))
        return self._split


def write_grid(results: List[Dict[str, Any]], out: Path, images: GalleryImages) -> None:
    """One row per query: the query image, then its results with similarity and class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 1 + max(len(r["results"]) for r in results)
    fig, axes = plt.subplots(len(results), cols, figsize=(2.2 * cols, 2.5 * len(results)), squeeze=False)
    for ax_row, res in zip(axes, results):
        qr = res.get("query_row")
        query = images.row(qr) if qr is not None else images.file(res["query"])
        panels = [(query, "query" if qr is None else f"query {images.manifest[qr]['class']}")]
        panels += [(images.row(h["row"]), f"{h['cosine']:.3f} {h['class']}") for h in res["results"]]
        for ax, (img, title) in zip(ax_row, panels):
            if img is None:
                ax.text(0.5, 0.5, "unreadable", ha="center")
            else:
                ax.imshow(img, interpolation="nearest")
            ax.set_title(title, fontsize=8)
        for ax in ax_row:
            ax.axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _relabel(q_names: List[str], g_names: List[str], q_labels: torch.Tensor) -> torch.Tensor:
    """Query labels in the gallery's class numbering (matched by class name)."""
    if q_names == g_names:
        return q_labels
    index = {c: i for i, c in enumerate(g_names)}
    if not set(q_names) & set(index):
        raise ConfigError("--queries: no class name is shared with the gallery, so nothing can be relevant")
    table = torch.tensor([index.get(c, -2) for c in q_names] + [-1], dtype=torch.int64)  # -2: never relevant
    return table[q_labels]  # -1 (unknown) maps to the last entry, -1


def cmd_eval(args) -> int:
    from rich.table import Table

    from toolkit.features import load_features

    try:
        ks = sorted({int(k) for k in args.topk.split(",")})
    except ValueError:
        raise ConfigError(f"--topk: expected comma-separated integers, got {args.topk!r}") from None
    g = load_features(args.features, args.verify)
    gf = g.features if g.meta.get("l2_normalize", True) else F.normalize(g.features, dim=1)
    if args.queries is None:
        res = retrieval_metrics(gf, g.labels, gf, g.labels, ks, leave_one_out=True)
    else:
        q = load_features(args.queries, args.verify)
        if q.features.shape[1] != gf.shape[1]:
            raise ConfigError(f"--queries: features are {q.features.shape[1]}-d, the gallery's {gf.shape[1]}-d")
        qf = q.features if q.meta.get("l2_normalize", True) else F.normalize(q.features, dim=1)
        res = retrieval_metrics(qf, _relabel(q.class_names, g.class_names, q.labels), gf, g.labels, ks)
    res.update({"features": str(args.features), "queries_features": str(args.queries) if args.queries else None,
                "model": g.meta.get("model"), "layer": g.meta.get("layer")})
    out = args.out or (Path(args.features) / "retrieval_eval.json")
    out.write_text(json.dumps(res, indent=2))
    table = Table(title=f"retrieval: {res['queries']} queries, gallery {res['gallery']}"
                        f"{' (leave-one-out)' if res['leave_one_out'] else ''}")
    for col in ("k", "precision@k", "hit_rate@k", "recall@k"):
        table.add_column(col, justify="right")
    for k in ks:
        table.add_row(str(k), *(f"{100 * res[f'{m}@{k}']:.2f}%" for m in ("precision", "hit_rate", "recall")))
    console = _console()
    console.print(table)
    console.print(f"mAP {100 * res['mAP']:.2f}%  ({res['queries_without_relevant']} queries without a relevant "
                  f"image)  -> {out}")
    return 0


def _rows_features(features: Path, meta: Dict[str, Any], rows: Sequence[int],
                   verify: Optional[bool]) -> Tuple[torch.Tensor, List[str], List[str]]:
    """Gallery rows' features (n, D), L2-normalised, with their table and CSV names."""
    from toolkit.features import load_features

    bad = [r for r in rows if not 0 <= r < meta["rows"]]
    if bad:
        raise ConfigError(f"--rows: {bad[0]} is not a row of {features} (rows 0 to {meta['rows'] - 1}; "
                          "manifest.csv lists them)")
    g = load_features(features, verify)
    f = g.features[list(rows)]  # (n, D)
    f = f if meta.get("l2_normalize", True) else F.normalize(f, dim=1)
    classes = [g.class_names[y] if 0 <= y < len(g.class_names) else "" for y in g.labels[list(rows)].tolist()]
    names = [f"row {r}" + (f" ({c})" if c else "") for r, c in zip(rows, classes)]
    return f, names, [g.paths[r] for r in rows]


def cmd_pairs(args) -> int:
    from rich.table import Table

    from toolkit.features import read_meta

    if args.rows is not None and args.images:
        raise ConfigError("pairs: give image files or --rows, not both")
    if len(args.rows if args.rows is not None else args.images) < 2:
        raise ConfigError("pairs: give at least two images (files, or gallery rows with --rows N N ...)")
    meta = read_meta(args.features)
    if args.rows is not None:
        f, names, csv_names = _rows_features(args.features, meta, args.rows, args.verify)
    else:
        f = QueryEncoder(args.features, meta, "pairs", "--rows N N ...")(args.images)  # (n, D) normalised
        names, csv_names = [Path(p).name for p in args.images], list(args.images)
    if args.metric == "euclidean":
        # from the differences, not sqrt(2 - 2 cos): near 0 that cancels to ~3e-4 for an image
        # and itself (cos = 1 - 6e-8 in float32); (n, n, D) is small for a table of images
        table_vals = (f[:, None, :] - f[None, :, :]).norm(dim=2)  # (n, n)
    else:
        table_vals = (f @ f.T).clamp(-1, 1)  # (n, n)
    table = Table(title=f"{args.metric} {'distance' if args.metric == 'euclidean' else 'similarity'} "
                        "between L2-normalised features")
    table.add_column("")
    for n in names:
        table.add_column(n, justify="right")
    for n, row in zip(names, table_vals.tolist()):
        table.add_row(n, *(f"{v:.3f}" for v in row))
    _console().print(table)
    if args.csv:
        import csv

        with open(args.csv, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["", *csv_names])
            for p, row in zip(csv_names, table_vals.tolist()):
                w.writerow([p, *(f"{v:.6f}" for v in row)])
    return 0


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    usage, notes = __doc__.split("\n", 2)[2].split("\n\n", 1)  # the commands, then the prose
    ap = argparse.ArgumentParser(prog="python -m toolkit.retrieve", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=epilog(examples=usage, docs="docs/retrieval.md", notes=notes))
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("search", help="top-k most similar gallery images for query images")
    s.add_argument("--features", type=Path, required=True, help="a features directory (RUN/features)")
    grp = s.add_mutually_exclusive_group(required=True)
    grp.add_argument("--query", nargs="+", help="query image file(s), encoded like the gallery")
    grp.add_argument("--query-index", type=int, help="use gallery row N as the query (left out of its results)")
    s.add_argument("--topk", type=int, default=5)
    s.add_argument("--backend", choices=("exact", "faiss"), default="exact")
    s.add_argument("--grid", type=Path, help="write a PNG of each query and its results (a dataset's "
                   "images are drawn from the split itself)")
    s.add_argument("--json", type=Path, help="write the results as JSON")
    s.add_argument("--verify", action="store_true", default=None, help=VERIFY_HELP)
    e = sub.add_parser("eval", help="class-labelled retrieval metrics (precision/hit rate/recall@k, mAP)")
    e.add_argument("--features", type=Path, required=True, help="the gallery's features directory")
    e.add_argument("--queries", type=Path, help="a separate query set's features (default: leave-one-out)")
    e.add_argument("--topk", default="1,5,10", help="comma-separated k values")
    e.add_argument("--out", type=Path, help="JSON output (default: FEATURES/retrieval_eval.json)")
    e.add_argument("--verify", action="store_true", default=None, help=VERIFY_HELP)
    p = sub.add_parser("pairs", help="pairwise distances between images (E3's table)")
    p.add_argument("images", nargs="*", help="image files, encoded like the gallery")
    p.add_argument("--rows", type=int, nargs="+", metavar="N",
                   help="gallery rows instead of files (manifest.csv's row; for a dataset's features)")
    p.add_argument("--features", type=Path, required=True, help="features directory whose model to use")
    p.add_argument("--metric", choices=("euclidean", "cosine"), default="euclidean")
    p.add_argument("--csv", type=Path, help="also write the table as CSV")
    p.add_argument("--verify", action="store_true", default=None, help=VERIFY_HELP)
    return ap.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        return {"search": cmd_search, "eval": cmd_eval, "pairs": cmd_pairs}[args.cmd](args)
    except ToolkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    from toolkit.errors import leave  # sys.exit, minus the teardown of every module

    leave(main())
