"""Extract CNN features for an image collection: sharded, resumable, on any number of processes.

    accelerate launch toolkit/extract.py --config configs/extract_resnet50.yaml data.root=/data/gallery
    accelerate launch --config_file launch/cpu_ddp.yaml toolkit/extract.py --config ... 
    python -m toolkit.extract --config configs/extract_digits.yaml model.run=runs/digits_lenet/RUN

Each image goes through the model once under `torch.inference_mode` (bf16/fp16 autocast with
`extract.precision`, `channels_last` optional); the chosen layer's output (default: the pooled
penultimate features, `forward_features`) is L2-normalised and written to shards in
RUN/features/ (layout: toolkit.features). Shard k covers dataset indices [k*S, (k+1)*S) and
goes to rank k % world_size, so there is no sampler and no padding: every image lands exactly
once, in dataset order, whatever the world size. Rerunning the same command skips every shard
that is complete and intact and finishes the rest; a rerun with different settings that would
change the features is refused. Images that do not decode are listed in bad_images.txt.

Exit codes: 0 done, 1 runtime failure (a dead rank included), 2 bad config or path.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.config import PRECISIONS, _need, merge_layers
from toolkit.errors import ConfigError

LAYERS_BUILTIN = ("features", "logits")


@dataclass
class ExtractRunConfig:
    name: str = "extract"  # default: the config file's stem
    dir: Optional[str] = None  # default: model.run if set, else runs/<name>; features go to DIR/features
    seed: int = 0  # initialises a model that has no weights to load (the same on every rank)


@dataclass
class ExtractDataConfig:
    name: str = "folder"  # folder (any image tree; bad files listed) or a training dataset (digits, cifar10, ...)
    root: Optional[str] = None
    split: str = "test"  # training datasets only: train | val | test
    image_size: Optional[int] = None  # folder: null -> the trained run's, else 224
    batch_size: int = 64  # per process
    num_workers: int = 0
    loader: str = "auto"  # auto | device (in-memory datasets gathered on the device) | dataloader
    limit: Optional[int] = None  # first N images only
    split_seed: int = 0  # training datasets: the split the run used
    download: bool = False


@dataclass
class ExtractModelConfig:
    name: Optional[str] = None  # a registered model; null with model.run
    pretrained: Optional[str] = None  # torchvision weights name (local cache) or state-dict path
    run: Optional[str] = None  # a training run directory: its model and RUN/model.safetensors
    num_classes: Optional[int] = None  # null: the run's, else 1000 (keeps an ImageNet head)


@dataclass
class ExtractSection:
    layer: str = "features"  # features (pooled penultimate) | logits | a module name, e.g. backbone.layer3
    l2_normalize: bool = True
    precision: str = "no"  # no | bf16 | fp16 (fp16 needs CUDA)
    channels_last: bool = False
    shard_size: int = 1024  # images per shard: the unit of work, of resume and of writes
    dist_timeout_s: int = 1800  # how long ranks wait for each other at the end


@dataclass
class ExtractConfig:
    run: ExtractRunConfig = field(default_factory=ExtractRunConfig)
    data: ExtractDataConfig = field(default_factory=ExtractDataConfig)
    model: ExtractModelConfig = field(default_factory=ExtractModelConfig)
    extract: ExtractSection = field(default_factory=ExtractSection)


# Settings that do not change a feature value: a rerun may change them.
_FREE_KEYS = ("run.name", "run.dir", "data.batch_size", "data.num_workers", "data.loader", "extract.dist_timeout_s")


def load_extract_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> ExtractConfig:
    cfg, _, _ = merge_layers(ExtractConfig, path, overrides)
    validate(cfg)
    return cfg


def validate(cfg: ExtractConfig) -> None:
    d, m, e = cfg.data, cfg.model, cfg.extract
    from toolkit.data import DATASETS
    from toolkit.models import MODELS

    names = ["folder", *DATASETS.names()]
    _need(d.name in names, "data.name", f"unknown dataset {d.name!r}; choose one of: {', '.join(names)}")
    _need(d.name != "folder" or d.root is not None, "data.root", "folder needs data.root (the image collection)")
    _need(d.split in ("train", "val", "test"), "data.split", f"must be train, val or test, got {d.split!r}")
    _need(d.batch_size >= 1, "data.batch_size", f"must be >= 1, got {d.batch_size}")
    _need(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    _need(d.loader in ("auto", "device", "dataloader"), "data.loader",
          f"unknown loader {d.loader!r}; choose one of: auto, dataloader, device")
    _need(d.limit is None or d.limit >= 1, "data.limit", f"must be >= 1 or null, got {d.limit}")
    _need(d.image_size is None or d.image_size >= 8, "data.image_size", f"must be >= 8 or null, got {d.image_size}")
    _need(m.name is not None or m.run is not None, "model.name", "set model.name (e.g. resnet50) or model.run")
    _need(m.run is None or m.pretrained is None, "model.pretrained",
          "model.run brings its own weights (RUN/model.safetensors); leave model.pretrained out")
    if m.name is not None:
        MODELS.check(m.name, "model.name")
    _need(m.num_classes is None or m.num_classes >= 2, "model.num_classes", f"must be >= 2 or null, got {m.num_classes}")
    _need(bool(e.layer), "extract.layer", "must name a layer: features, logits or a module name")
    _need(e.precision in PRECISIONS, "extract.precision",
          f"unknown precision {e.precision!r}; choose one of: {', '.join(PRECISIONS)}")
    _need(e.shard_size >= 1, "extract.shard_size", f"must be >= 1, got {e.shard_size}")
    _need(e.dist_timeout_s >= 1, "extract.dist_timeout_s", f"must be >= 1, got {e.dist_timeout_s}")


def to_flat(cfg: ExtractConfig) -> Dict[str, Any]:
    return {f"{sec}.{k}": v for sec, vals in dataclasses.asdict(cfg).items() for k, v in vals.items()}


def fingerprint(cfg: ExtractConfig) -> Dict[str, Any]:
    """The settings that decide the feature values (what a rerun must keep)."""
    return {k: v for k, v in to_flat(cfg).items() if not k.startswith(_FREE_KEYS)}


# ------------------------------------------------------------------------------------------
# model and data


def _run_config(run_dir: Path):
    from toolkit.config import load_config

    if not (run_dir / "config.yaml").is_file() or not (run_dir / "model.safetensors").is_file():
        raise ConfigError(f"config: model.run: {run_dir} is not a finished training run "
                          "(needs config.yaml and model.safetensors)")
    return load_config(str(run_dir / "config.yaml"))


def build_model(m: ExtractModelConfig, seed: int = 0) -> tuple[nn.Module, Dict[str, Any]]:
    """-> model in eval mode, and the record of where it came from (for meta.json). Weights that
    are not loaded from a file are initialised from `seed`: the same on every rank and rerun."""
    torch.manual_seed(seed)
    from safetensors.torch import load_file

    from toolkit.models import MODELS, check_pretrained

    if m.run is not None:
        run_dir = Path(m.run).absolute()
        train_cfg = _run_config(run_dir)
        name = train_cfg.model.name
        if m.name is not None and m.name != name:
            raise ConfigError(f"config: model.name: {m.name} differs from the run's model {name}; leave it out")
        weights = run_dir / "model.safetensors"
        try:
            sd = load_file(str(weights))
        except Exception as e:
            raise ConfigError(f"config: model.run: cannot read {weights} ({type(e).__name__}: {e})") from None
        head = sd.get("classifier.weight")
        num_classes = m.num_classes or (int(head.shape[0]) if head is not None else train_cfg.model.num_classes)
        model = MODELS.build(name, num_classes=num_classes, pretrained=None)
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise ConfigError(f"config: model.run: {weights} does not fit {name}: {str(e).splitlines()[0]}") from None
        record = {"name": name, "num_classes": num_classes, "run": str(run_dir), "weights": str(weights)}
    else:
        check_pretrained(m.name, m.pretrained)
        num_classes = m.num_classes or 1000
        model = MODELS.build(m.name, num_classes=num_classes, pretrained=m.pretrained)
        record = {"name": m.name, "num_classes": num_classes, "pretrained": m.pretrained}
    return model.eval(), record


class _Stop(Exception):
    """Raised by the layer hook: nothing after the chosen layer needs computing."""


class Extractor(nn.Module):
    """x (B, 3, H, W) -> features (B, D) float32 from `layer`, L2-normalised if asked.

    A module's 4-D output is global-average-pooled to (B, C); other shapes are flattened."""

    def __init__(self, model: nn.Module, layer: str = "features", l2_normalize: bool = True):
        super().__init__()
        self.model, self.layer, self.l2 = model, layer, l2_normalize
        self._out: Optional[torch.Tensor] = None
        if layer not in LAYERS_BUILTIN:
            modules = dict(model.named_modules())
            if layer not in modules:
                top = [n for n, _ in model.named_children()]
                raise ConfigError(f"config: extract.layer: no module {layer!r} in {type(model).__name__}; use "
                                  f"features, logits or a module name (top level: {', '.join(top)})")
            modules[layer].register_forward_hook(self._hook)

    def _hook(self, _module, _args, out) -> None:
        self._out = out
        raise _Stop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layer == "features":
            f = self.model.forward_features(x)
        elif self.layer == "logits":
            f = self.model(x)
        else:
            try:
                self.model(x)
                raise RuntimeError(f"layer {self.layer} did not run in the forward pass")
            except _Stop:
                f, self._out = self._out, None
        if f.ndim == 4:
            f = f.mean(dim=(2, 3))  # (B, C, H, W) -> (B, C)
        f = f.flatten(1).float()  # (B, D)
        return F.normalize(f, dim=1) if self.l2 else f


def build_source(cfg: ExtractConfig, run_image_size: Optional[int] = None):
    """The collection to extract, in the (x | None, label, index, reason) item format."""
    from toolkit.data.collection import ImageCollection, SplitAsCollection

    d = cfg.data
    if d.name == "folder":
        return ImageCollection(d.root, image_size=d.image_size or run_image_size or 224, limit=d.limit)
    from toolkit.data import DATASETS

    if d.root is not None and not Path(d.root).is_dir() and not d.download:
        raise ConfigError(f"config: data.root: no such directory: {d.root}")
    splits = DATASETS.build(d.name, root=d.root, split_seed=d.split_seed, limit=d.limit, download=d.download,
                            image_size=d.image_size, train_splits=["train"])
    preprocess = {"kind": "dataset", "dataset": d.name, "split": d.split,
                  **{k: splits.meta[k] for k in ("image_size", "mean", "std") if k in splits.meta}}
    return SplitAsCollection(getattr(splits, d.split), d.name, d.split, splits.class_names, preprocess)


def _run_image_size(cfg: ExtractConfig) -> Optional[int]:
    if cfg.model.run is None:
        return None
    return _run_config(Path(cfg.model.run)).data.image_size


# ------------------------------------------------------------------------------------------
# the job


def features_dir(cfg: ExtractConfig) -> Path:
    base = cfg.run.dir or cfg.model.run or str(Path("runs") / cfg.run.name)
    return Path(base).absolute() / "features"


def _check_rerun(out: Path, cfg: ExtractConfig) -> None:
    """Refuse to mix features from two different settings in one directory."""
    stored = out / "config.yaml"
    if not stored.is_file():
        if (out / "shards").is_dir() and any((out / "shards").glob("part-*.json")):
            raise ConfigError(f"config: run.dir: {out} holds shards but no config.yaml; choose another run.dir")
        return
    try:
        old = load_extract_config(str(stored))
    except ConfigError:
        raise ConfigError(f"config: run.dir: {stored} is not an extraction config; choose another run.dir") from None
    a, b = fingerprint(old), fingerprint(cfg)
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if diff:
        raise ConfigError(f"config: run.dir: {out} holds features extracted with other settings "
                          f"({', '.join(f'{k}={a.get(k)!r}' for k in diff)}); rerun with those or choose another run.dir")


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


def _device_batches(source, plan: List[tuple[int, List[int]]], device: torch.device):
    """The DataLoader's items for `plan`, gathered from the dataset held on the device:
    x (B, 3, S, S) as the dataset stores it (uint8: normalised by `source.normalize`), labels,
    indices, no bad images (an in-memory set has none)."""
    ds = source.dataset
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
    from toolkit.features import shard_ranges

    ranges = shard_ranges(n, shard_size)
    return [(k, list(ranges[k][i:i + batch_size])) for k in todo for i in range(0, len(ranges[k]), batch_size)]


class ShardWriter:
    """Writes finished shards on one background thread while the next shard's batches run.

        writer = ShardWriter(folder, on_written=lambda k: ...)
        writer.submit(k, feats, index, labels, bad)   # feats (n, D) on any device
        writer.close()                                # waits for the last write

    Writing a shard (safetensors, fsync, sha256, marker) and, on a GPU, waiting for its features
    to reach the host used to stall the model once per shard. Here the device-to-host copy is
    only queued (into pinned memory, a CUDA event marks its end) and the thread waits for it,
    then writes. At most one shard is in flight: `submit` first waits for the previous one and
    then calls `on_written(k)` for it (progress, fault hooks), so memory stays bounded and a
    failed write is raised in the caller at most one shard later. A shard counts as written
    only once its marker is on disk, exactly as before (toolkit.features.write_shard)."""

    def __init__(self, folder: Path, on_written) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.folder, self.on_written = folder, on_written
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self.pending = None  # (k, Future)

    def submit(self, k: int, feats: torch.Tensor, index: torch.Tensor, labels: torch.Tensor, bad: list) -> None:
        self.wait()
        ready = None
        if feats.is_cuda:
            host = torch.empty(feats.shape, dtype=feats.dtype, pin_memory=True)  # (n, D)
            host.copy_(feats, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        else:
            host = feats.cpu()
        self.pending = (k, self.pool.submit(self._write, k, host, ready, feats.device, index, labels, bad))

    def _write(self, k: int, host: torch.Tensor, ready, device: torch.device, index, labels, bad) -> None:
        from toolkit import features as store

        if ready is not None:
            with torch.cuda.device(device):  # this rank's GPU, not a new context on GPU 0
                ready.synchronize()
        store.write_shard(self.folder, k, host, index, labels, bad)

    def wait(self) -> None:
        """Wait for the shard in flight, if any; raise its error; report it written."""
        if self.pending is not None:
            k, future = self.pending
            self.pending = None
            future.result()
            self.on_written(k)

    def close(self) -> None:
        """Wait for the last write (raising its error) and stop the thread."""
        try:
            self.wait()
        finally:
            self.pool.shutdown(wait=True)

    def abandon(self) -> None:
        """On the way out with another error: let the write in flight finish (a shard is never
        left half-written) without reporting it or letting its own error hide the first one."""
        self.pending = None
        self.pool.shutdown(wait=True)


def extract(cfg: ExtractConfig) -> Dict[str, Any]:
    """Run the extraction (all ranks); rank 0 returns the summary once every shard is done."""
    import yaml
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, gather_object
    from torch.utils.data import DataLoader

    from toolkit import features as store
    from toolkit.data.collection import collate_items
    from toolkit.errors import PreemptedError
    from toolkit.faults import Faults
    from toolkit.preempt import Preemption

    e = cfg.extract
    if e.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("config: extract.precision: fp16 needs a CUDA GPU; use bf16 on CPU")
    out = features_dir(cfg)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"config: run.dir: {out} exists and is not a directory")
    _check_rerun(out, cfg)  # on every rank, before anything is written
    model, model_record = build_model(cfg.model, cfg.run.seed)
    source = build_source(cfg, _run_image_size(cfg))
    extractor = Extractor(model, e.layer, e.l2_normalize)

    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=e.precision,
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=e.dist_timeout_s))])
    rank, world = accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    on_device = _use_device_loader(cfg.data.loader, source, accelerator)  # before anything is written
    shards = out / store.SHARDS
    if main:
        shards.mkdir(parents=True, exist_ok=True)
        if not (out / "config.yaml").is_file():
            store.write_atomic_text(out / "config.yaml", yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    accelerator.wait_for_everyone()

    n = len(source)
    ranges = store.shard_ranges(n, e.shard_size)
    mine = [k for k in range(len(ranges)) if k % world == rank]
    todo = [k for k in mine if store.shard_marker(shards, k) is None]
    if main:
        print(f"extract: {n} images in {len(ranges)} shard(s) of {e.shard_size} -> {out} "
              f"({world} process(es), device {accelerator.device}, layer {e.layer}, precision {e.precision}, "
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
        why = "SIGTERM" if stop == Preemption.TERM else "a preemption request"
        raise PreemptedError(f"stopped on {why}; the shards written so far are kept in {out}; rerun the same "
                             "command to finish", 143 if stop == Preemption.TERM else 4)
    summary: Dict[str, Any] = {}
    if main:
        summary = finalize(out, source, len(ranges), model_record, cfg, counts, world)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def finalize(out: Path, source, num_shards: int, model_record: Dict[str, Any], cfg: ExtractConfig,
             counts: List[tuple], world: int) -> Dict[str, Any]:
    """Rank 0, after every rank is done: manifest, bad_images.txt, meta.json (last), summary."""
    from safetensors import safe_open

    from toolkit import features as store

    shards = out / store.SHARDS
    markers, missing = [], []
    for k in range(num_shards):
        mk = store.shard_marker(shards, k, check_sum=False)  # checked when written or kept
        (markers.append(mk) if mk is not None else missing.append(k))
    if missing:
        raise RuntimeError(f"extract: {len(missing)} shard(s) missing after all ranks finished, first "
                           f"{store.shard_name(missing[0])}; rerun to finish them")
    index_parts, label_parts = [], []
    for k in range(num_shards):
        with safe_open(str(shards / f"{store.shard_name(k)}.safetensors"), framework="pt") as f:
            index_parts.append(f.get_tensor("index"))
            label_parts.append(f.get_tensor("labels"))
    index = torch.cat(index_parts)
    labels = torch.cat(label_parts)
    paths = [source.path(i) for i in index.tolist()]
    store.write_manifest(out / "manifest.csv", index, labels, paths, source.class_names)
    bad = [b for mk in markers for b in mk["bad"]]
    store.write_atomic_text(out / "bad_images.txt", "".join(f"{i}\t{p}\t{r}\n" for i, p, r in bad))
    dim = max((mk["dim"] for mk in markers), default=0)
    images = sum(c[0] for c in counts)
    wall = max((c[1] for c in counts), default=0.0)
    meta = {"rows": int(len(index)), "dim": dim, "num_shards": num_shards, "shard_size": cfg.extract.shard_size,
            "num_images": len(source), "bad_images": len(bad), "class_names": source.class_names,
            "labelled": int((labels >= 0).sum()), "layer": cfg.extract.layer,
            "l2_normalize": cfg.extract.l2_normalize, "precision": cfg.extract.precision,
            "model": model_record, "preprocess": source.preprocess, "source": {"data": cfg.data.name,
                                                                              "root": cfg.data.root}}
    summary = {"features_dir": str(out), "rows": meta["rows"], "dim": dim, "bad_images": len(bad),
               "num_images": len(source), "shards": num_shards, "world_size": world,
               "images_this_run": images, "wall_s": wall, "images_per_s": images / wall if wall > 0 else 0.0}
    store.write_atomic_text(out / "summary.json", json.dumps(summary, indent=2))
    store.write_atomic_text(out / store.META, json.dumps(meta, indent=2))  # last: marks the set complete
    return summary


# ------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="toolkit.extract", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", help="YAML config (configs/extract_*.yaml)")
    p.add_argument("overrides", nargs="*", help="section.key=value, applied after the YAML")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    from toolkit.errors import run_cli

    def work():
        cfg = load_extract_config(args.config, args.overrides)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False), end="")
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
    sys.exit(main())
