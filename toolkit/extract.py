"""Extract CNN features for an image collection: sharded, resumable, on any number of processes.

    accelerate launch toolkit/extract.py --config configs/extract_resnet50.yaml data.root=/data/gallery
    accelerate launch --config_file launch/cpu_ddp.yaml toolkit/extract.py --config ...
    python -m toolkit.extract --config configs/extract_digits.yaml model.run=runs/digits_lenet/RUN
    toolkit-extract --config extract_digits model.run=runs/digits_lenet/RUN   # from any directory

Each image goes through the model once under `torch.inference_mode` (bf16/fp16 autocast with
`extract.precision`, `channels_last` optional); the chosen layer's output (default: the pooled
penultimate features, `forward_features`) is L2-normalised and written to shards in
RUN/features/ (layout: toolkit.features.store). Shard k covers dataset indices [k*S, (k+1)*S) and
goes to rank k % world_size, so there is no sampler and no padding: every image lands exactly
once, in dataset order, whatever the world size. Rerunning the same command skips every shard
that is complete and intact and finishes the rest; a rerun with different settings that would
change the features is refused. Images that do not decode are listed in bad_images.txt.

One extraction per run directory: rank 0 holds its lock (RUN/.lock, toolkit.rundir.run_lock, the
one training holds) from before the first write to the end, so a second extraction into the same
directory stops with the holder's pid and touches nothing. Every check (settings against an
earlier attempt, the run's preprocessing, sizes, one forward pass of a blank image) comes before
the features directory is created. An earlier attempt that crashed before completing any shard
is the toolkit's own unfinished output: a rerun with other settings starts it over.

With `model.run=RUN` the images are prepared as RUN's were in training (RUN/data.json: image
size, channels, mean/std): a folder is resized to the run's size and normalised with its
statistics, a dataset split is normalised with them; an explicit data.image_size that differs
is refused.

Exit codes: 0 done, 1 runtime failure (a dead rank included), 2 bad config or path.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from toolkit.clihelp import EXTRACT_SECTIONS, config_help, epilog
from toolkit.config import ExtractConfig, load_extract_config, to_flat, to_yaml
from toolkit.data.imagefolder import DEFAULT_IMAGE_SIZE, check_decoded_batch, check_image_size
from toolkit.errors import ConfigError
from toolkit.features import (META, SHARDS, Extractor, ShardWriter, build_model, load_run_config, shard_marker,
                              shard_name, shard_ranges, write_manifest)
from toolkit.fast import resolve_channels_last, resolve_precision, summary_fields, with_resolved
from toolkit.features.extractor import run_preprocess
from toolkit.features.staging import streamed_batches
from toolkit.rundir import run_lock, write_atomic_text

# Settings that do not change a feature value: a rerun may change them.
_FREE_KEYS = ("run.name", "run.dir", "data.batch_size", "data.num_workers", "data.loader", "extract.dist_timeout_s")


def fingerprint(cfg: ExtractConfig) -> Dict[str, Any]:
    """The settings that decide the feature values (what a rerun must keep)."""
    return {k: v for k, v in to_flat(cfg).items() if not k.startswith(_FREE_KEYS)}


# ------------------------------------------------------------------------------------------
# data


def build_source(cfg: ExtractConfig, pre: Optional[Dict[str, Any]] = None):
    """The collection to extract, in the (x | None, label, index, reason) item format, prepared
    as `pre` (the trained run's preprocessing, `run_preprocessing`) says when given."""
    from toolkit.data.collection import ImageCollection, SplitAsCollection
    from toolkit.data.images import IMAGENET_MEAN, IMAGENET_STD

    d = cfg.data
    size = _image_size(cfg, pre)
    if d.name == "folder":
        mean, std = (pre["mean"], pre["std"]) if pre else (IMAGENET_MEAN, IMAGENET_STD)
        return ImageCollection(d.root, image_size=size or DEFAULT_IMAGE_SIZE, mean=mean, std=std, limit=d.limit)
    from toolkit.data import DATASETS

    if d.root is not None and not Path(d.root).is_dir() and not d.download:
        raise ConfigError(f"config: data.root: no such directory: {d.root}")
    try:
        splits = DATASETS.build(d.name, root=d.root, split_seed=d.split_seed, limit=d.limit, download=d.download,
                                image_size=size, train_splits=["train"])
    except ConfigError as e:
        if d.image_size is None and pre is not None and str(e).startswith("config: data.image_size"):
            raise ConfigError(f"config: model.run: {cfg.model.run} was trained on {size} px images, which "
                              f"data.name={d.name} cannot give ({e})") from None  # the size was not the user's
        raise
    split = str(d.split)  # the plain word, for meta.json and the manifest's paths
    preprocess = {"kind": "dataset", "dataset": d.name, "split": split,
                  **{k: splits.meta[k] for k in ("image_size", "mean", "std") if k in splits.meta}}
    source = SplitAsCollection(getattr(splits, split), d.name, split, splits.class_names, preprocess)
    if pre is not None:
        _normalise_as_run(source, pre, cfg.model.run)
    return source


def _image_size(cfg: ExtractConfig, pre: Optional[Dict[str, Any]]) -> Optional[int]:
    """The size asked for: data.image_size, else the run's, else None (the dataset's own)."""
    if cfg.data.image_size is not None:
        return cfg.data.image_size
    return pre["image_size"] if pre else None


def run_preprocessing(cfg: ExtractConfig) -> Optional[Dict[str, Any]]:
    """`model.run`'s image size, channels and mean/std (toolkit.features.extractor.run_preprocess),
    checked against what the extraction config asks for; None without model.run."""
    if cfg.model.run is None:
        return None
    run = Path(cfg.model.run)
    load_run_config(run)  # "not a finished training run" first: it says more than a missing data.json
    pre = run_preprocess(run)
    if pre["channels"] != 3:
        raise ConfigError(f"config: model.run: {run} was trained on {pre['channels']}-channel images; extraction "
                          "feeds 3-channel RGB")
    size = cfg.data.image_size
    if size is not None and size != pre["image_size"]:
        raise ConfigError(f"config: data.image_size: {size}, but model.run {run} was trained on "
                          f"{pre['image_size']} px images; leave data.image_size out to use the run's")
    return pre


def _normalise_as_run(source, pre: Dict[str, Any], run: str) -> None:
    """Make a dataset split feed the model what it saw in training: the run's size (it cannot be
    resized here: refused if it differs) and the run's mean/std in place of the dataset's own
    (which differ when the run trained on another dataset, or the statistics came from another
    split seed or limit)."""
    from toolkit.data.base import Normalize

    got = source.preprocess
    if got.get("image_size") != pre["image_size"]:
        raise ConfigError(f"config: data.name: {source.name} gives {got.get('image_size')} px images, but model.run "
                          f"{run} was trained on {pre['image_size']} px images")
    if [float(v) for v in got.get("mean", [])] == pre["mean"] and [float(v) for v in got.get("std", [])] == pre["std"]:
        return  # the same statistics: keep the dataset's own path, bit for bit
    if source.raw:  # uint8 items: the shared formula with the run's statistics
        source.normalize = Normalize(pre["mean"], pre["std"])
    else:  # float items normalised with the dataset's statistics: back to 0..1, then the run's
        source.normalize = _Renormalize(got["mean"], got["std"], pre["mean"], pre["std"])
    source.preprocess = {**got, "mean": pre["mean"], "std": pre["std"]}


class _Renormalize:
    """(B, C, H, W) float normalised with (mean_a, std_a) -> normalised with (mean_b, std_b):
    x * std_a / std_b + (mean_a - mean_b) / std_b per channel. The two per-channel tensors are
    copied to each device once (a host copy per batch would stall a GPU's queue)."""

    def __init__(self, mean_a, std_a, mean_b, std_b):
        ma, sa, mb, sb = (torch.as_tensor(v, dtype=torch.float32).view(1, -1, 1, 1)
                          for v in (mean_a, std_a, mean_b, std_b))
        self.scale, self.shift = sa / sb, (ma - mb) / sb  # (1, C, 1, 1)
        self._on: Dict[torch.device, tuple] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        on = self._on.get(x.device)
        if on is None:
            on = self._on[x.device] = (self.scale.to(x.device), self.shift.to(x.device))
        return x * on[0] + on[1]


def check_sizes(cfg: ExtractConfig, size: Optional[int]) -> None:
    """Bound the image side and the decoded batch before anything is decoded or allocated."""
    if size is not None:
        check_image_size(size, "config: data.image_size")
        check_decoded_batch(cfg.data.batch_size, size, "config: data.batch_size")


def check_model_takes(extractor: Extractor, size: Optional[int], run: Optional[str]) -> None:
    """One forward pass of a blank (1, 3, S, S) image, before the features directory exists: a
    model that cannot take S px images (LeNet's fixed head at another size) fails here in one
    line rather than in the first batch, after files were written."""
    if size is None:
        return
    try:
        with torch.inference_mode():
            extractor(torch.zeros(1, 3, size, size))
    except RuntimeError as e:
        hint = (f"model.run {run} is recorded at another size" if run else
                "set data.image_size to the size the model was trained at")
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"config: data.image_size: the model cannot take {size} px images ({msg}); {hint}") from None


# ------------------------------------------------------------------------------------------
# the job


def features_dir(cfg: ExtractConfig) -> Path:
    base = cfg.run.dir or cfg.model.run or str(Path("runs") / cfg.run.name)
    return Path(base).absolute() / "features"


def _has_work(out: Path) -> bool:
    """A complete shard or a finished set: work a rerun keeps, never discards."""
    return (out / META).exists() or ((out / SHARDS).is_dir() and any((out / SHARDS).glob("part-*.json")))


def _check_rerun(out: Path, cfg: ExtractConfig) -> Optional[str]:
    """Refuse to mix features from two different settings in one directory. -> None (nothing
    there, or the same settings: go on), or the other settings of an earlier attempt that
    completed nothing, a crashed toolkit run whose config.yaml the caller replaces."""
    stored = out / "config.yaml"
    if not stored.is_file():
        if (out / "shards").is_dir() and any((out / "shards").glob("part-*.json")):
            raise ConfigError(f"config: run.dir: {out} holds shards but no config.yaml; choose another run.dir")
        return None
    try:
        old = load_extract_config(str(stored))
    except ConfigError:
        raise ConfigError(f"config: run.dir: {stored} is not an extraction config; choose another run.dir") from None
    a, b = fingerprint(old), fingerprint(cfg)
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if not diff:
        return None
    other = ", ".join(f"{k}={a.get(k)!r}" for k in diff)
    # Ours, byte for byte (what this module writes), and nothing done with it: safe to start over.
    if not _has_work(out) and stored.read_text() == to_yaml(old):
        return other
    raise ConfigError(f"config: run.dir: {out} holds features extracted with other settings "
                      f"({other}); rerun with those or choose another run.dir")


def _claim(out: Path, cfg: ExtractConfig, stack: contextlib.ExitStack) -> None:
    """Rank 0, after every check: hold the run directory's lock (a second extraction into it
    stops here, having written nothing), then create the features directory and its config."""
    base = out.parent
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"config: run.dir: cannot create {base}: {e.strerror}") from None
    stack.enter_context(run_lock(base))
    stale = _check_rerun(out, cfg)  # again, now that no one else can write here
    (out / SHARDS).mkdir(parents=True, exist_ok=True)
    if stale is not None:
        print(f"extract: {out} holds an unfinished extraction with other settings ({stale}) and no complete "
              "shard; starting over", flush=True)
    if stale is not None or not (out / "config.yaml").is_file():
        write_atomic_text(out / "config.yaml", to_yaml(cfg))


def _use_device_loader(mode: str, source, accelerator) -> bool:
    """`data.loader`: an in-memory dataset (digits, cifar, synthetic, prepared) is copied to the
    device once and each batch is one gather there (`auto` when it fits, as in training); a
    folder is decoded in DataLoader workers."""
    from toolkit.data.collection import SplitAsCollection
    from toolkit.data.device_loader import agreed_reason, device_loader_reason

    if mode == "dataloader":
        return False
    if isinstance(source, SplitAsCollection):
        reason = agreed_reason(accelerator, device_loader_reason(source.dataset, accelerator.device))
    else:
        reason = "a folder collection is decoded image by image in DataLoader workers"
    if reason is not None and mode == "device":
        raise ConfigError(f"config: data.loader: device: {reason}; use data.loader=auto or dataloader")
    return reason is None


# Devices whose in-memory batches are streamed (toolkit.features.staging: each batch copied while
# the one before it computes) rather than the set copied once before the first batch. A CPU has
# no copy to overlap; the tests add "cpu" to check that both ways give the same features.
STREAMED = ("cuda",)


def _device_batches(source, plan: List[tuple[int, List[int]]], device: torch.device):
    """The DataLoader's items for `plan`, from the dataset held in memory: x (B, 3, S, S) on the
    device as the dataset stores it (uint8: normalised by `source.normalize`), labels, indices,
    no bad images (an in-memory set has none). Streamed to a GPU batch by batch, else gathered
    from one copy of the set."""
    ds = source.dataset
    if device.type in STREAMED:
        for x, idx in streamed_batches(ds.images, [b for _, b in plan], device):
            yield x, ds.labels[idx], idx, []
        return
    images = ds.images.to(device)  # (N, 3, S, S), copied once
    flat = torch.as_tensor([i for _, b in plan for i in b], dtype=torch.int64)  # (M,) this rank's images
    flat_dev = flat.to(device)  # one copy: a blocking copy per batch would stall the GPU queue
    start = 0
    for _, batch in plan:
        idx, idx_dev = flat[start:start + len(batch)], flat_dev[start:start + len(batch)]  # (B,)
        start += len(batch)
        yield images[idx_dev], ds.labels[idx], idx, []


def _plan(n: int, shard_size: int, batch_size: int, todo: List[int]) -> List[tuple[int, List[int]]]:
    """[(shard, [dataset indices])] batches that never cross a shard boundary."""
    ranges = shard_ranges(n, shard_size)
    return [(k, list(ranges[k][i:i + batch_size])) for k in todo for i in range(0, len(ranges[k]), batch_size)]


def extract(cfg: ExtractConfig) -> Dict[str, Any]:
    """Run the extraction (all ranks); rank 0 returns the summary once every shard is done."""
    with contextlib.ExitStack() as stack:  # holds rank 0's lock on the run directory
        return _extract(cfg, stack)


def _extract(cfg: ExtractConfig, stack: contextlib.ExitStack) -> Dict[str, Any]:
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, gather_object
    from torch.utils.data import DataLoader

    from toolkit.data.collection import collate_items
    from toolkit.errors import PreemptedError
    from toolkit.faults import Faults
    from toolkit.preempt import Preemption

    # on every rank, before anything is written; cfg: `auto` precision and channels_last resolved
    out, model_record, source, extractor, cfg, speed = checked_setup(cfg)
    e = cfg.extract

    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=e.precision,
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=e.dist_timeout_s))])
    rank, world = accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    on_device = _use_device_loader(cfg.data.loader, source, accelerator)  # before anything is written
    shards = out / SHARDS
    if main:
        _claim(out, cfg, stack)
    accelerator.wait_for_everyone()

    n = len(source)
    ranges = shard_ranges(n, e.shard_size)
    mine = [k for k in range(len(ranges)) if k % world == rank]
    todo = [k for k in mine if shard_marker(shards, k) is None]
    if main:
        print(f"extract: {n} images in {len(ranges)} shard(s) of {e.shard_size} -> {out} "
              f"({world} process(es), device {accelerator.device}, layer {e.layer}, "
              f"precision {speed['precision'].describe()}, channels_last {speed['channels_last'].describe()}, "
              f"loader {'device' if on_device else 'dataloader'})", flush=True)
    if len(todo) < len(mine):
        print(f"extract: rank {rank}: {len(mine) - len(todo)} complete shard(s) kept, {len(todo)} to do", flush=True)

    extractor.to(accelerator.device)
    if e.channels_last:
        extractor.to(memory_format=torch.channels_last)
    faults = Faults.from_env()
    preempt = Preemption(accelerator, out)
    plan = _plan(n, e.shard_size, cfg.data.batch_size, todo)
    if on_device:
        loader = _device_batches(source, plan, accelerator.device)
    else:
        loader = DataLoader(source, batch_sampler=[b for _, b in plan], collate_fn=collate_items,
                            num_workers=cfg.data.num_workers, pin_memory=torch.cuda.is_available())
    last_batch = {k: j for j, (k, _) in enumerate(plan)}  # shard -> index of its last batch
    buf: Dict[str, list] = {"f": [], "i": [], "y": [], "bad": []}
    t0, done_images, written, stop = time.perf_counter(), 0, 0, 0.0
    autocast = accelerator.autocast if e.precision != "no" else contextlib.nullcontext

    def on_written(k: int) -> None:
        nonlocal written
        written += 1
        if main:
            rate = done_images / max(time.perf_counter() - t0, 1e-9)
            print(f"extract: shard {k + 1}/{len(ranges)} written ({written}/{len(todo)} on rank 0, "
                  f"{rate:,.0f} img/s)", flush=True)
        faults.after_shard(written, rank)

    writer = ShardWriter(shards, on_written)
    try:
        with torch.inference_mode():
            for j, (x, y, idx, bad) in enumerate(loader):
                k = plan[j][0]
                if x is not None:
                    x = source.normalize(x.to(accelerator.device, non_blocking=True))  # uint8 -> float32 there
                    if e.channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    with autocast():
                        f = extractor(x)  # (B, D) float32
                    buf["f"].append(f)  # stays on the device until the shard is written: no sync per batch
                    buf["i"].append(idx)
                    buf["y"].append(y)
                    done_images += len(idx)
                buf["bad"] += [(i, source.path(i), reason) for i, reason in bad]
                if j == last_batch[k]:
                    feats = torch.cat(buf["f"]) if buf["f"] else torch.empty(0, 0)
                    index = torch.cat(buf["i"]) if buf["i"] else torch.empty(0, dtype=torch.int64)
                    labels = torch.cat(buf["y"]) if buf["y"] else torch.empty(0, dtype=torch.int64)
                    writer.submit(k, feats, index, labels, buf["bad"])  # written while the next shard runs
                    buf = {"f": [], "i": [], "y": [], "bad": []}
                    stop = preempt.seen_locally()
                    if stop:  # between shards: what is written stays, a rerun does the rest
                        break
    except BaseException:
        writer.abandon()
        raise
    writer.close()  # the shard in flight is finished (or its error raised) before anything else
    preempt.close()
    wall = time.perf_counter() - t0
    counts = gather_object([(done_images, wall, stop)]) if world > 1 else [(done_images, wall, stop)]
    accelerator.wait_for_everyone()
    stop = max(c[2] for c in counts)
    if stop:
        if main:
            preempt.file.unlink(missing_ok=True)
        accelerator.end_training()
        raise PreemptedError(f"stopped on {Preemption.why(stop)}; the shards written so far are kept in {out}; "
                             "rerun the same command to finish", Preemption.exit_code(stop),
                             label="interrupted" if stop == Preemption.INT else "preempted")
    summary: Dict[str, Any] = {}
    if main:
        summary = finalize(out, source, len(ranges), model_record, cfg, counts, world, speed)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def finalize(out: Path, source, num_shards: int, model_record: Dict[str, Any], cfg: ExtractConfig,
             counts: List[tuple], world: int, speed: Dict[str, Any]) -> Dict[str, Any]:
    """Rank 0, after every rank is done: manifest, bad_images.txt, meta.json (last), summary.
    `speed`: the resolved precision and channels_last (toolkit.fast.Resolved), recorded in meta.json."""
    from safetensors import safe_open

    shards = out / SHARDS
    markers, missing = [], []
    for k in range(num_shards):
        mk = shard_marker(shards, k, check_sum=False)  # checked when written or kept
        (markers.append(mk) if mk is not None else missing.append(k))
    if missing:
        raise RuntimeError(f"extract: {len(missing)} shard(s) missing after all ranks finished, first "
                           f"{shard_name(missing[0])}; rerun to finish them")
    index_parts, label_parts = [], []
    for k in range(num_shards):
        with safe_open(str(shards / f"{shard_name(k)}.safetensors"), framework="pt") as f:
            index_parts.append(f.get_tensor("index"))
            label_parts.append(f.get_tensor("labels"))
    index = torch.cat(index_parts)
    labels = torch.cat(label_parts)
    paths = [source.path(i) for i in index.tolist()]
    write_manifest(out / "manifest.csv", index, labels, paths, source.class_names)
    bad = [b for mk in markers for b in mk["bad"]]
    write_atomic_text(out / "bad_images.txt", "".join(f"{i}\t{p}\t{r}\n" for i, p, r in bad))
    dim = max((mk["dim"] for mk in markers), default=0)
    images = sum(c[0] for c in counts)
    wall = max((c[1] for c in counts), default=0.0)
    meta = {"rows": int(len(index)), "dim": dim, "num_shards": num_shards, "shard_size": cfg.extract.shard_size,
            "num_images": len(source), "bad_images": len(bad), "class_names": source.class_names,
            "labelled": int((labels >= 0).sum()), "layer": cfg.extract.layer,
            "l2_normalize": cfg.extract.l2_normalize, **summary_fields("precision", speed["precision"]),
            **summary_fields("channels_last", speed["channels_last"]),
            "model": model_record, "preprocess": source.preprocess, "source": {"data": cfg.data.name,
                                                                              "root": cfg.data.root}}
    summary = {"features_dir": str(out), "rows": meta["rows"], "dim": dim, "bad_images": len(bad),
               "num_images": len(source), "shards": num_shards, "world_size": world,
               "images_this_run": images, "wall_s": wall, "images_per_s": images / wall if wall > 0 else 0.0}
    write_atomic_text(out / "summary.json", json.dumps(summary, indent=2))
    write_atomic_text(out / META, json.dumps(meta, indent=2))  # last: marks the set complete
    return summary


# ------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    examples = "\n".join(__doc__.split("\n")[2:6])
    p = argparse.ArgumentParser(prog="toolkit.extract", description=__doc__.split("\n")[0],
                                epilog=epilog(EXTRACT_SECTIONS, examples, "docs/retrieval.md"),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", help=config_help("extract_digits"))
    p.add_argument("overrides", nargs="*", help="section.key=value, applied after the YAML")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--check-only", action="store_true",
                   help="make every check the extraction makes before it starts (config, paths, the model with "
                        "its weights loaded, data, sizes, one forward pass) in this process, create nothing, "
                        "print the features directory and exit (slurm/extract.sh runs it before any node starts)")
    return p.parse_args(argv)


def checked_setup(cfg: ExtractConfig):
    """Every check an extraction makes before its Accelerator starts and before anything is
    written: -> (features dir, model record, source, extractor, the config with `auto` precision
    and channels_last resolved, {"precision", "channels_last": toolkit.fast.Resolved}).
    `_extract` and `--check-only` (slurm/extract.sh, before any node starts) both run exactly this."""
    if cfg.extract.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("config: extract.precision: fp16 needs a CUDA GPU; use bf16 on CPU")
    out = features_dir(cfg)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"config: run.dir: {out} exists and is not a directory")
    pre = run_preprocessing(cfg)
    check_sizes(cfg, _image_size(cfg, pre) or (DEFAULT_IMAGE_SIZE if cfg.data.name == "folder" else None))
    model, model_record = build_model(cfg.model, cfg.run.seed)  # model.run's / model.pretrained's weights, loaded
    cfg, speed = resolve_speed(cfg, out, model)
    _check_rerun(out, cfg)  # with the values this run would compute with (after `auto` is resolved)
    source = build_source(cfg, pre)
    size = source.preprocess.get("image_size")
    check_sizes(cfg, size)  # the dataset's own size, where it chose one
    extractor = Extractor(model, cfg.extract.layer, cfg.extract.l2_normalize)
    check_model_takes(extractor, size, cfg.model.run)
    return out, model_record, source, extractor, cfg, speed


def resolve_speed(cfg: ExtractConfig, out: Path, model) -> tuple:
    """`auto` extract.precision / extract.channels_last -> (config with the values this extraction
    computes with, {"precision", "channels_last": Resolved}). A rerun over complete shards keeps
    the values they were computed with (its config.yaml records them), wherever it runs, so a set
    is never a mix of two precisions; otherwise this device's (toolkit/fast.py)."""
    kept = _kept_speed(out)
    by = "the shards already extracted"
    precision = resolve_precision(cfg.extract.precision, kept.get("precision"), kept_from=by)
    channels_last = resolve_channels_last(cfg.extract.channels_last, model, kept.get("channels_last"), kept_from=by)
    resolved = with_resolved(cfg, "extract", precision=precision.value, channels_last=channels_last.value)
    return resolved, {"precision": precision, "channels_last": channels_last}


def _kept_speed(out: Path) -> Dict[str, Any]:
    """The precision and channels_last the complete shards in `out` were computed with, from the
    config.yaml written with them; {} when there are none (or no readable config: _check_rerun
    says so in its own words)."""
    if not _has_work(out):
        return {}
    try:
        e = load_extract_config(str(out / "config.yaml")).extract
    except ConfigError:
        return {}
    kept = {}
    if e.precision != "auto":
        kept["precision"] = str(e.precision)
    if e.channels_last != "auto":
        kept["channels_last"] = e.channels_last == "true"
    return kept


def check_only(cfg: ExtractConfig) -> Path:
    """`--check-only`: `checked_setup` in this one process; nothing is created. -> the features directory."""
    return checked_setup(cfg)[0]


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    from toolkit.errors import run_cli

    def work():
        cfg = load_extract_config(args.config, args.overrides)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return None
        if args.check_only:
            print(check_only(cfg))
            return None
        return extract(cfg)

    code, summary = run_cli(work)
    if code:
        return code
    if summary:
        print(f"features: {summary['rows']} x {summary['dim']} in {summary['features_dir']} "
              f"({summary['bad_images']} bad image(s) listed in bad_images.txt), "
              f"{summary['images_per_s']:,.0f} img/s, {summary['wall_s']:.1f} s")
    return 0


if __name__ == "__main__":
    from toolkit.errors import leave  # sys.exit, minus the teardown of every module

    leave(main())
