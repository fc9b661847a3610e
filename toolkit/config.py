"""Typed, layered, strict configuration.

    cfg = load_config("configs/digits_lenet.yaml", ["optim.lr=0.05", "train.epochs=3"])

Layers, later wins: dataclass defaults < YAML file < `section.key=value` overrides.
OmegaConf does the layering and type checking; this module adds range checks, name checks
against the registries, and turns every failure into one line naming the key.

Mode fields (train.precision, data.loader, log.progress, ...) are `Choice` enums: OmegaConf
rejects any other word, and being `str`s they compare, print and serialise as the plain word.
YAML (files and override values) is read with YAML 1.2 booleans: only true/false are booleans,
so `log.progress=off` or `precision: no` stay the words the user wrote.

The hyperparameters a sweep varies are a flat dict (`hparams(cfg)`, `with_flat(cfg, flat)`),
kept apart from run flags such as paths, precision and logging. The extraction config
(`ExtractConfig`, `load_extract_config`) is layered the same way.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException, ValidationError

from toolkit.errors import ConfigError


class Choice(str, Enum):
    """The words a mode field accepts. Members are named like their values (OmegaConf converts
    a word by member name), and being a `str` a member compares equal to its word
    (`cfg.train.nonfinite == "stop"`), hashes like it, and prints as it."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def words(cls) -> List[str]:
        return [m.value for m in cls]


# The order of the members is the order the error message lists them in.
class Precision(Choice):
    auto = "auto"  # bf16 on a CUDA GPU that has it, else no (toolkit/fast.py); config.yaml keeps `auto`
    no = "no"
    bf16 = "bf16"
    fp16 = "fp16"  # needs CUDA


class Switch(Choice):
    """auto | true | false: an on/off setting whose default the device decides (channels_last).
    YAML's true/false arrive as booleans, which OmegaConf will not turn into a member, so
    merge_layers and with_flat pass them on as words (`_switch_words`); yes/no/on/off (words
    under YAML 1.2) are aliases. A member is truthy only when `true`: code that has not resolved
    `auto` (toolkit/fast.py) gets the conservative choice."""

    auto = "auto"
    true = "true"
    false = "false"
    yes = "true"  # aliases: OmegaConf looks a word up by member name; words() lists only the three above
    no = "false"
    on = "true"
    off = "false"

    def __bool__(self) -> bool:
        return self is Switch.true


class Loader(Choice):
    auto = "auto"  # device when the training set is in memory and fits, else dataloader
    dataloader = "dataloader"
    device = "device"  # the whole set gathered on the device once


class Decode(Choice):
    device = "device"  # image-folder JPEGs decoded in batches where the batch lands
    workers = "workers"  # decode + resize per image in DataLoader workers


class Sampler(Choice):
    pk = "pk"  # P classes x K images per batch (triplet losses)
    random = "random"


class Freeze(Choice):
    none = "none"
    backbone = "backbone"  # only model.classifier trains
    classifier = "classifier"  # model.classifier frozen


class Distance(Choice):
    cosine = "cosine"
    euclidean = "euclidean"


class TTA(Choice):
    flip = "flip"  # mean of the logits of the image and its mirror image
    none = "none"


class NonFinite(Choice):
    skip = "skip"
    stop = "stop"


class Progress(Choice):
    auto = "auto"  # rich on a terminal, else plain
    rich = "rich"
    plain = "plain"
    none = "none"


class TrackerName(Choice):
    """Where a run's logged rows go besides metrics.jsonl (log.trackers): Accelerate's trackers.
    No `csv`: metrics.jsonl already is the machine-readable record of every row."""
    tensorboard = "tensorboard"  # RUN/tb/
    mlflow = "mlflow"  # RUN/mlruns/ (a local file store) unless MLFLOW_TRACKING_URI is set
    wandb = "wandb"  # offline in RUN/wandb/ unless WANDB_MODE is set


class Monitor(Choice):
    """The per-epoch metric that picks the best epoch (and drives early stopping)."""
    val_acc = "val_acc"  # higher is better
    val_loss = "val_loss"  # lower is better


class TestWeights(Choice):
    last = "last"
    best = "best"
    both = "both"


class Split(Choice):
    train = "train"
    val = "val"
    test = "test"


# What an unknown word is called in the error ("unknown loader 'gpu'"); default "mode".
_NOUNS = {Precision: "precision", Loader: "loader", Sampler: "sampler", Distance: "distance", Split: "split",
          TrackerName: "tracker"}


# The largest image side the toolkit decodes to. Common CNN inputs are 224-600 px, detection-style
# inputs up to ~2,000; at 4,096 one float32 image is already 201 MB (3 x 4096 x 4096 x 4 bytes),
# so anything larger is a typo that would only end in an out-of-memory kill.
MAX_IMAGE_SIZE = 4096


@dataclass
class RunConfig:
    name: str = "run"  # default: the config file's stem
    dir: Optional[str] = None  # default: runs/<name>/<timestamp>
    seed: int = 0


@dataclass
class DataConfig:
    name: str = "digits"
    root: Optional[str] = None  # on-disk datasets only; digits ships with scikit-learn
    download: bool = False  # fetch an on-disk dataset into root when missing (needs internet)
    image_size: Optional[int] = None  # resize on-disk images to this (null: the dataset's default)
    train_splits: List[str] = field(default_factory=lambda: ["train"])  # folders whose union trains
    batch_size: int = 64  # global: split across processes, so results do not depend on world size
    eval_batch_size: int = 256  # global
    num_workers: int = 0
    loader: Loader = Loader.auto  # auto | device (training set gathered on the device) | dataloader
    decode: Decode = Decode.workers  # imagefolder: workers (decode + resize per image) | device (JPEGs decoded in batches where the batch lands)
    drop_last: bool = True  # training only; keeps every step's global batch full
    split_seed: int = 0  # fixed split, independent of run.seed
    limit: Optional[int] = None  # keep N samples of each split (smoke runs): image folders and prepared take a
    # stratified subset seeded by split_seed; digits, cifar and synthetic (mixed class order) their first N
    augment: str = "none"  # training-batch augmentation: none | crop
    sampler: Sampler = Sampler.random  # random | pk (P classes x K images per batch, for triplet losses)
    pk_k: int = 4  # pk: images per class in a batch; P = batch_size / pk_k
    label_noise: float = 0.0  # share of training labels replaced by a different class (seeded)
    holdout_folds: int = 0  # > 0: cut the training split into this many folds (stratified by the given labels,
    holdout_fold: int = 0  # seeded by split_seed, after label noise) and train without fold `holdout_fold`
    exclude: Optional[str] = None  # a label_issues.csv (toolkit.clean): train without the samples it lists
    exclude_top: Optional[int] = None  # with exclude: only its first N rows (the most likely wrong labels)
    mixup_alpha: float = 0.0  # > 0: mixup with lam ~ Beta(a, a) (labels become soft)
    cutmix_alpha: float = 0.0  # > 0: CutMix; with both set, each batch picks one at random


@dataclass
class ModelConfig:
    name: str = "lenet"
    num_classes: Optional[int] = None  # default: the dataset's
    pretrained: Optional[str] = None  # torchvision weights name (local cache only) or state-dict path
    freeze: Freeze = Freeze.none  # none | backbone | classifier: frozen parameters are not trained


@dataclass
class OptimConfig:
    name: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    no_decay_norm_bias: bool = False  # no weight decay on biases and norm weights
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # adam, adamw
    eps: Optional[float] = None  # null: each optimizer's own default
    alpha: float = 0.99  # rmsprop smoothing


@dataclass
class SchedConfig:
    name: str = "multistep"
    milestones: List[int] = field(default_factory=list)  # epochs at which lr *= gamma
    gamma: float = 0.1
    step_size: int = 1  # step: epochs between decays
    warmup_epochs: float = 0.0  # linear warmup length (every schedule but onecycle, which has its own)
    min_lr_factor: float = 0.0  # cosine: final lr / base lr
    pct_start: float = 0.25  # onecycle: share of the run spent rising


@dataclass
class LossConfig:
    name: str = "cross_entropy"
    label_smoothing: float = 0.0
    margin: float = 0.25  # triplet
    distance: Distance = Distance.cosine  # triplet: cosine | euclidean
    ce_weight: float = 0.0  # triplet: + ce_weight x cross-entropy on the logits


@dataclass
class StageConfig:
    """One stage of a multi-stage run (E4: triplet features first, then the classifier).

    The stage's settings are the run's top-level ones with these applied on top; each stage
    starts with a fresh optimizer and schedule (milestones count from the stage's first epoch)."""

    name: str = ""  # default: stage<index>
    epochs: int = 1
    freeze: Optional[str] = None  # null: model.freeze (checked as model.freeze, so the error names the stage)
    loss: Dict[str, Any] = field(default_factory=dict)  # keys of the loss section
    optim: Dict[str, Any] = field(default_factory=dict)  # keys of the optim section
    sched: Dict[str, Any] = field(default_factory=dict)  # keys of the sched section
    data: Dict[str, Any] = field(default_factory=dict)  # only sampler, pk_k, augment


STAGE_DATA_KEYS = ("sampler", "pk_k", "augment", "mixup_alpha", "cutmix_alpha")


@dataclass
class TrainConfig:
    epochs: int = 10  # with stages: the sum of the stages' epochs (set for you)
    stages: List[StageConfig] = field(default_factory=list)  # empty: one stage, the top-level settings
    grad_accum_steps: int = 1
    clip_grad_norm: Optional[float] = None
    precision: Precision = Precision.auto  # auto (bf16 on a CUDA GPU with bf16, else no) | no | bf16 | fp16 (CUDA)
    compile: bool = False
    channels_last: Switch = Switch.auto  # auto (on for convolutional nets on CUDA, else off) | true | false
    ema_decay: float = 0.0  # > 0: evaluate and save an exponential moving average of the weights
    tta: TTA = TTA.none  # none | flip: evaluation averages the logits of each image and its mirror image
    # false (default): cuDNN times its algorithms per input shape and keeps the fastest (cudnn.benchmark).
    # true: deterministic algorithms (warn-only where none exists), for bit-reproducible GPU runs. On a CPU
    # both give the same numbers: the CPU kernels the toolkit uses are deterministic either way.
    deterministic: bool = False
    resume: str = "none"  # none | auto | path to a checkpoint directory (a path too, so a str, not a Choice)
    checkpoint_every_steps: int = 0  # 0: only at the end of each epoch
    preempt_check_steps: int = 10  # how often the ranks agree on a stop request (SIGUSR1, RUN/.preempt, SIGTERM)
    keep_last: int = 2  # complete checkpoints kept on disk
    max_nonfinite: int = 10  # consecutive non-finite losses before the run stops (nonfinite=skip)
    # skip: every step waits for its loss and skips a non-finite one (one host sync per step);
    # stop: no per-step sync; non-finite losses are counted on the device and checked at each log
    # step, checkpoint and epoch end, and the first check that finds one stops the run
    nonfinite: NonFinite = NonFinite.skip
    dist_timeout_s: int = 600  # collective timeout: a dead rank ends the job after this
    monitor: Monitor = Monitor.val_acc  # picks the best epoch: RUN/model_best.safetensors
    test_weights: TestWeights = TestWeights.both  # which weights the test split measures: last | best | both
    early_stop_patience: int = 0  # > 0: stop a stage after this many epochs without improvement
    early_stop_min_delta: float = 0.0  # improvement needed to reset the patience (in the metric's units)


@dataclass
class LogConfig:
    every_n_steps: int = 20
    progress: Progress = Progress.auto  # auto | rich | plain | none
    tensorboard: bool = True  # false: no TensorBoard even where log.trackers lists it
    # Each logged row goes to metrics.jsonl and to every tracker listed: tensorboard | mlflow | wandb
    trackers: List[TrackerName] = field(default_factory=lambda: [TrackerName.tensorboard])
    test_every_epoch: bool = False  # also evaluate the test split after every epoch (E1/E2 curves)
    plots: bool = True  # curves, confusion matrices (train, test) and feature PCA in the run directory
    tsne: bool = False  # t-SNE of the features too (seconds to minutes)
    embed_max: int = 2000  # images per split whose features are kept for the plots (0: none)
    embed_classes: List[int] = field(default_factory=list)  # classes shown in the feature plots (default: first 10)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)


# What a sweep may vary. Everything else (paths, precision, logging) is a run flag.
TUNABLE = ("data.batch_size", "data.augment", "data.label_noise", "data.holdout_fold", "data.sampler",
           "data.pk_k", "data.mixup_alpha", "data.cutmix_alpha", "model.", "optim.", "sched.", "loss.", "train.epochs",
           "train.grad_accum_steps", "train.clip_grad_norm")

SECTIONS = tuple(f.name for f in dataclasses.fields(Config))


def _omega_error(e: OmegaConfBaseException) -> ConfigError:
    key = getattr(e, "full_key", None)
    msg = str(getattr(e, "msg", None) or e).splitlines()[0]
    if "'StageConfig'" in msg and key and "." not in str(key):
        fields = ", ".join(f.name for f in dataclasses.fields(StageConfig))
        return ConfigError(f"config: train.stages: unknown key {key!r} in a stage; a stage sets: {fields}")
    # OmegaConf's own text ("Invalid value 'x', expected one of [...]") spans several lines and
    # says nothing of YAML's booleans; name the key, the word given and the words allowed.
    choice = getattr(getattr(e, "child_node", None), "enum_type", None)
    if choice is None and OmegaConf.is_list(getattr(e, "parent_node", None)):  # an entry of List[word] (log.trackers)
        choice = next(iter(typing.get_args(getattr(e, "ref_type", None))), None)
    if key and isinstance(e, ValidationError) and isinstance(choice, type) and issubclass(choice, Choice):
        return ConfigError(f"config: {key}: unknown {_NOUNS.get(choice, 'mode')} {getattr(e, 'value', None)!r}; "
                           f"choose one of: {', '.join(choice.words())}")
    return ConfigError(f"config: {key}: {msg}" if key else f"config: {msg}")


class YamlLoader(yaml.SafeLoader):
    """yaml.SafeLoader (no object construction) with YAML 1.2's core-schema scalars where YAML
    1.1 surprises: only true/false (True, TRUE, ...) are booleans, so `no`, `off`, `on`, `yes`
    stay the words written (a bool field still takes them: OmegaConf converts them); `1e-3` is a
    float; a date stays a string. Used for config files and `section.key=value` values alike."""


YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag.rsplit(":", 1)[-1] not in ("bool", "float", "timestamp")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
YamlLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                 list("tTfF"))
YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"""^(?:
     [-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    """YAML text -> Python values, read by YamlLoader. Raises yaml.YAMLError."""
    return yaml.load(text, Loader=YamlLoader)  # noqa: S506 (a SafeLoader subclass)


# The shipped configs are package data (toolkit/configs/; `configs` at the repository root is a
# symlink to it), so they are found by name from any directory, in a checkout or an installed wheel.
SHIPPED = Path(__file__).resolve().parent / "configs"
_SHIPPED_NOUN = {"": "config", "spaces": "space"}


def shipped_names(folder: str = "") -> List[str]:
    """The shipped configs' names in toolkit/configs/FOLDER (`spaces`: the sweep spaces), sorted."""
    return sorted(p.stem for p in (SHIPPED / folder).glob("*.yaml"))


def find_config(arg: str, folder: str = "", flag: str = "--config") -> str:
    """A `--config` argument (`--space`: folder="spaces") -> the YAML file to read.

    A file that exists always wins. Else a shipped config by name: `digits_lenet`,
    `digits_lenet.yaml`, or the documented `configs/digits_lenet.yaml` (`configs/spaces/lr.yaml`),
    so every command in the docs works from any directory. Else one line (ConfigError, exit 2):
    `no such file` for a path, the shipped names for an unknown name."""
    p = Path(arg)
    if p.is_file():
        return arg
    shipped_form = p.suffix in ("", ".yaml") and p.parent in (Path("."), Path("configs", folder))
    if shipped_form and p.stem in shipped_names(folder):
        return str(SHIPPED / folder / f"{p.stem}.yaml")
    if p.suffix in (".yaml", ".yml") or len(p.parts) > 1:
        raise ConfigError(f"{flag}: no such file: {arg}")
    raise ConfigError(f"{flag}: unknown {_SHIPPED_NOUN.get(folder, 'config')} {arg!r}; choose one of: "
                      f"{', '.join(shipped_names(folder))} (or a YAML path)")


def _read_yaml(path: str, sections: Iterable[str] = SECTIONS) -> Dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config: no such file: {path}")
    try:
        data = parse_yaml(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"--config: {path} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of sections, got {type(data).__name__}")
    for section, body in data.items():
        if section in sections and body is not None and not isinstance(body, dict):
            raise ConfigError(f"config: {section}: must be a mapping of keys, got {type(body).__name__}")
    return data


def _parse_overrides(overrides: Iterable[str]) -> List[str]:
    out = []
    for o in overrides:
        key, sep, _ = o.partition("=")
        if not sep or not key or "." not in key:
            raise ConfigError(f"override {o!r} must look like section.key=value")
        out.append(o)
    return out


def _dotlist_layer(dotlist: Sequence[str]) -> Any:
    """`a.b=value` overrides as one OmegaConf layer, later wins (OmegaConf.from_dotlist, but
    each value read by YamlLoader)."""
    layer = OmegaConf.create()
    for o in dotlist:
        key, _, text = o.partition("=")
        try:
            value = parse_yaml(text)
        except yaml.YAMLError:
            raise ConfigError(f"override {o!r}: the value is not valid YAML") from None
        _refuse_interpolation(value, key)
        OmegaConf.update(layer, key, value, merge=True)
    return layer


def _refuse_interpolation(value: Any, key: str) -> None:
    """OmegaConf would resolve `${...}` in a value (`${oc.env:HOME}`, `${data.root}`) and write
    the result into config.yaml, TensorBoard and folder names: the run would not record what the
    user wrote, and a shared config could read the environment. Values are taken literally."""
    if isinstance(value, str) and "${" in value:
        raise ConfigError(f"config: {key}: {value!r} looks like an interpolation (${{...}}), which is "
                          "not supported; write the value itself")
    if isinstance(value, dict):
        for k, v in value.items():
            _refuse_interpolation(v, f"{key}.{k}" if key else str(k))
    if isinstance(value, list):
        for i, v in enumerate(value):
            _refuse_interpolation(v, f"{key}[{i}]")


def _indexed(override: str) -> bool:
    """`a.0.b=v` names an entry of a list; a merged layer would turn the list into a mapping."""
    return any(part.isdigit() for part in override.partition("=")[0].split("."))


def _update_entry(merged: Any, override: str) -> None:
    key, _, text = override.partition("=")
    value = _dotlist_layer([f"x.y={text}"]).x.y  # read like any override's value
    _refuse_interpolation(value, key)
    parts = key.split(".")
    if parts[-1].isdigit():
        head = ".".join(parts[:-1])
        raise ConfigError(f"config: {key}: set the whole list with {head}=[...] or one key of an entry, "
                          f"e.g. {key}.epochs=1")
    node, where = merged, []
    for part in parts[:-1]:
        if part.isdigit():
            size = len(node) if OmegaConf.is_list(node) else 0
            if int(part) >= size:
                raise ConfigError(f"config: {key}: {'.'.join(where)} has {size} entr{'y' if size == 1 else 'ies'}")
            node = node[int(part)]
        else:
            node = node[part] if part in node else None
            if node is None:
                break
        where.append(part)
    OmegaConf.update(merged, key, value, merge=True)


def _switch_words(schema: type, layer: Any) -> Any:
    """A layer (nested dicts) with a boolean given to a `Switch` field as its word: YAML reads
    `channels_last: true` (and an older config.yaml's `channels_last: false`) as a bool, which
    OmegaConf refuses for an enum. Other values pass unchanged, for OmegaConf to check."""
    if not isinstance(layer, dict) or not dataclasses.is_dataclass(schema):
        return layer
    hints = typing.get_type_hints(schema)
    out = {}
    for key, value in layer.items():
        hint = hints.get(key) if isinstance(key, str) else None
        if hint is Switch and isinstance(value, bool):
            value = Switch.true.value if value else Switch.false.value
        elif hint is not None and dataclasses.is_dataclass(hint):
            value = _switch_words(hint, value)
        out[key] = value
    return out


def merge_layers(schema: type, path: Optional[str], overrides: Iterable[str],
                 base: Optional[Dict[str, Any]] = None) -> tuple:
    """Dataclass defaults < base (a resumed run's own config) < YAML < overrides, typed and
    strict -> (object, yaml layers, dotlist)."""
    layers = [] if base is None else [base]
    if path is not None:
        path = find_config(path)  # a shipped config's name works wherever a path does
        data = _read_yaml(path, tuple(f.name for f in dataclasses.fields(schema)))
        data.setdefault("run", {})
        if isinstance(data["run"], dict):
            data["run"].setdefault("name", Path(path).stem)
        layers.append(data)
    dotlist = _parse_overrides(overrides)
    for layer in layers:
        _refuse_interpolation(layer, "")
    try:
        merged = OmegaConf.structured(schema)
        for layer in layers:
            merged = OmegaConf.merge(merged, _switch_words(schema, layer))
        plain = [o for o in dotlist if not _indexed(o)]
        if plain:
            merged = OmegaConf.merge(merged, _switch_words(schema, OmegaConf.to_container(_dotlist_layer(plain))))
        for o in dotlist:  # `train.stages.0.epochs=1`: into the list entry, after the layers
            if _indexed(o):
                _update_entry(merged, o)
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise _omega_error(e) from None
    return obj, layers, dotlist


def load_config(path: Optional[str] = None, overrides: Iterable[str] = (),
                base: Optional[Dict[str, Any]] = None) -> Config:
    """YAML file (optional) + `section.key=value` overrides -> validated Config. `base`: a
    config (nested dicts, e.g. a checkpoint's config.yaml) that stands in for the defaults."""
    cfg, layers, dotlist = merge_layers(Config, path, overrides, base)
    # train.epochs counts as given when it is set in the layer that sets the stages, or later.
    explicit = any(o.startswith("train.epochs=") for o in dotlist) or (
        not any(o.startswith(("train.stages=", "train.stages.")) for o in dotlist)
        and any(isinstance(layer.get("train"), dict) and "epochs" in layer["train"] for layer in layers))
    _derive_epochs(cfg, explicit)
    validate(cfg)
    return cfg


def _derive_epochs(cfg: Config, explicit: bool) -> None:
    """With stages, the run lasts the sum of their epochs; a train.epochs given as well must agree."""
    if not cfg.train.stages:
        return
    total = sum(st.epochs for st in cfg.train.stages)
    if explicit and cfg.train.epochs != total:
        raise ConfigError(f"config: train.epochs: {cfg.train.epochs} disagrees with train.stages, whose epochs "
                          f"add up to {total}; leave train.epochs out or make them agree")
    cfg.train.epochs = total


@dataclass
class Stage:
    """A resolved stage: global epochs [start, end) and the full settings in force during it."""

    index: int
    name: str
    start: int
    end: int
    cfg: Config  # cfg.train.epochs is the stage's length; cfg.train.stages is empty
    notes: List[str] = field(default_factory=list)  # what shorten_schedule cut, for the log and summary


def _stage_error(e: ConfigError, key: str) -> ConfigError:
    msg = str(e)
    for inner, outer in (("train.epochs", "epochs"), ("model.freeze", "freeze")):
        if msg.startswith(f"config: {inner}:"):
            msg = f"config: {outer}:" + msg[len(f"config: {inner}:"):]
    return ConfigError(msg.replace("config: ", f"config: {key}.", 1))


def resolve_stages(cfg: Config) -> List[Stage]:
    """The run's stages, each with its merged and validated settings. Without train.stages:
    one stage, "main", with the top-level settings."""
    if not cfg.train.stages:
        short, notes = shorten_schedule(cfg, "sched")
        return [Stage(0, "main", 0, cfg.train.epochs, short, notes)]
    base = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, stages=[]))
    out: List[Stage] = []
    start = 0
    for i, st in enumerate(cfg.train.stages):
        key = f"train.stages[{i}]"
        extra = sorted(set(st.data) - set(STAGE_DATA_KEYS))
        _need(not extra, f"{key}.data", f"a stage may set only {', '.join(STAGE_DATA_KEYS)}; got {', '.join(extra)}")
        nested: Dict[str, Any] = {"loss": dict(st.loss), "optim": dict(st.optim), "sched": dict(st.sched),
                                  "data": dict(st.data), "train": {"epochs": st.epochs}}
        if st.freeze is not None:
            nested["model"] = {"freeze": st.freeze}
        try:
            merged = OmegaConf.merge(OmegaConf.structured(base), nested)
            stage_cfg = OmegaConf.to_object(merged)
        except OmegaConfBaseException as e:
            raise _stage_error(_omega_error(e), key) from None
        try:
            validate(stage_cfg)
        except ConfigError as e:
            raise _stage_error(e, key) from None
        stage_cfg, notes = shorten_schedule(stage_cfg, f"{key}.sched")
        name = st.name or f"stage{i}"
        _need(name not in {s.name for s in out}, f"{key}.name", f"{name!r} is used by an earlier stage")
        out.append(Stage(i, name, start, start + st.epochs, stage_cfg, notes))
        start += st.epochs
    return out


def shorten_schedule(cfg: Config, key: str) -> tuple:
    """A schedule made for a longer run, fitted to this one -> (config, notes): milestones at or
    past the end are dropped (they would never fire) and a warm-up as long as the run is cut so
    the last epoch trains at the full rate. A shortened smoke run or sweep then just works, and
    the notes say what changed (printed at the start, kept in summary.json's `warnings`)."""
    s, epochs = cfg.sched, cfg.train.epochs
    notes = []
    kept = [m for m in s.milestones if m < epochs]
    if len(kept) < len(s.milestones):
        dropped = [m for m in s.milestones if m >= epochs]
        notes.append(f"{key}.milestones: {dropped} at or past the end of the run's {epochs} epoch(s): dropped")
    warmup = s.warmup_epochs
    if warmup >= epochs and warmup > 0:
        warmup = float(max(epochs - 1, 0))
        notes.append(f"{key}.warmup_epochs: {s.warmup_epochs:g} is not shorter than the run's {epochs} epoch(s): "
                     f"cut to {warmup:g}")
    if not notes:
        return cfg, notes
    return dataclasses.replace(cfg, sched=dataclasses.replace(s, milestones=kept, warmup_epochs=warmup)), notes


def stage_at(stages: List[Stage], epoch: int) -> Stage:
    """The stage that global epoch `epoch` belongs to (the last one once the run is over)."""
    for st in stages:
        if epoch < st.end:
            return st
    return stages[-1]


def _need(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config: {key}: {msg}")


def validate(cfg: Config) -> None:
    """Range, cross-field and registry-name checks: what the types (mode fields are `Choice`
    enums, checked by OmegaConf) cannot express. One line per failure."""
    d, o, s, t = cfg.data, cfg.optim, cfg.sched, cfg.train
    for i, st in enumerate(t.stages):
        _need(st.epochs >= 1, f"train.stages[{i}].epochs", f"must be >= 1, got {st.epochs}")
    _need(t.epochs >= 1, "train.epochs", f"must be >= 1, got {t.epochs}")  # other checks use it
    _need(d.batch_size >= 1, "data.batch_size", f"must be >= 1, got {d.batch_size}")
    _need(d.eval_batch_size >= 1, "data.eval_batch_size", f"must be >= 1, got {d.eval_batch_size}")
    _need(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    _need(d.limit is None or d.limit >= 1, "data.limit", f"must be >= 1 or null, got {d.limit}")
    _need(0 <= d.label_noise <= 1, "data.label_noise", f"must be in [0, 1], got {d.label_noise}")
    _need(d.holdout_folds == 0 or d.holdout_folds >= 2, "data.holdout_folds",
          f"must be 0 (off) or >= 2 folds, got {d.holdout_folds}")
    _need(d.holdout_fold == 0 or 0 <= d.holdout_fold < d.holdout_folds, "data.holdout_fold",
          f"must be in [0, data.holdout_folds={d.holdout_folds}), got {d.holdout_fold}")
    _need(d.exclude_top is None or (d.exclude_top >= 1 and d.exclude is not None), "data.exclude_top",
          f"must be >= 1 and needs data.exclude (a label_issues.csv), got {d.exclude_top}")
    _need(d.image_size is None or 8 <= d.image_size <= MAX_IMAGE_SIZE, "data.image_size",
          f"must be in [8, {MAX_IMAGE_SIZE}] or null, got {d.image_size}")
    _need(len(d.train_splits) >= 1 and all(d.train_splits), "data.train_splits",
          f"must name at least one split folder, got {list(d.train_splits)}")
    _need(o.lr > 0 and math.isfinite(o.lr), "optim.lr", f"must be > 0 and finite, got {o.lr}")
    _need(0 <= o.momentum < 1, "optim.momentum", f"must be in [0, 1), got {o.momentum}")
    _need(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _need(0 < s.gamma <= 1, "sched.gamma", f"must be in (0, 1], got {s.gamma}")
    _need(s.step_size >= 1, "sched.step_size", f"must be >= 1, got {s.step_size}")
    # A warm-up as long as the run, or milestones past its end, are cut when the stages are
    # resolved (shorten_schedule), so that a shortened run (train.epochs=2) just works.
    _need(s.warmup_epochs >= 0, "sched.warmup_epochs", f"must be >= 0, got {s.warmup_epochs}")
    _need(s.warmup_epochs == 0 or s.name != "onecycle", "sched.warmup_epochs",
          "onecycle has its own warmup (sched.pct_start); leave warmup_epochs at 0")
    _need(0 <= s.min_lr_factor <= 1, "sched.min_lr_factor", f"must be in [0, 1], got {s.min_lr_factor}")
    _need(0 < s.pct_start < 1, "sched.pct_start", f"must be in (0, 1), got {s.pct_start}")
    _need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas",
          f"must be two values in [0, 1), got {list(o.betas)}")
    _need(o.eps is None or o.eps > 0, "optim.eps", f"must be > 0 or null, got {o.eps}")
    _need(0 < o.alpha < 1, "optim.alpha", f"must be in (0, 1), got {o.alpha}")
    _need(cfg.loss.margin >= 0, "loss.margin", f"must be >= 0, got {cfg.loss.margin}")
    _need(cfg.loss.ce_weight >= 0, "loss.ce_weight", f"must be >= 0, got {cfg.loss.ce_weight}")
    _need(d.decode == "workers" or d.name == "imagefolder", "data.decode",
          f"device decodes image-folder JPEGs; data.name={d.name} has none (use workers)")
    _need(d.pk_k >= 2, "data.pk_k", f"must be >= 2, got {d.pk_k}")
    _need(d.sampler != "pk" or d.batch_size % d.pk_k == 0, "data.batch_size",
          f"{d.batch_size} must be a multiple of data.pk_k ({d.pk_k}) for the pk sampler")
    _need(0 <= cfg.loss.label_smoothing < 1, "loss.label_smoothing",
          f"must be in [0, 1), got {cfg.loss.label_smoothing}")
    for m in s.milestones:
        _need(m > 0, "sched.milestones", f"milestone {m} must be > 0 (epochs from the start of the run or stage)")
    _need(list(s.milestones) == sorted(set(s.milestones)), "sched.milestones",
          f"must be strictly increasing, got {list(s.milestones)}")
    _need(t.grad_accum_steps >= 1, "train.grad_accum_steps", f"must be >= 1, got {t.grad_accum_steps}")
    _need(t.early_stop_patience >= 0, "train.early_stop_patience", f"must be >= 0, got {t.early_stop_patience}")
    _need(t.early_stop_min_delta >= 0, "train.early_stop_min_delta", f"must be >= 0, got {t.early_stop_min_delta}")
    _need(t.clip_grad_norm is None or t.clip_grad_norm > 0, "train.clip_grad_norm",
          f"must be > 0 or null, got {t.clip_grad_norm}")
    _need(0.0 <= t.ema_decay < 1.0, "train.ema_decay", f"must be in [0, 1) (0: off), got {t.ema_decay}")
    _need(t.keep_last >= 1, "train.keep_last", f"must be >= 1, got {t.keep_last}")
    _need(t.max_nonfinite >= 1, "train.max_nonfinite", f"must be >= 1, got {t.max_nonfinite}")
    _need(t.preempt_check_steps >= 1, "train.preempt_check_steps", f"must be >= 1, got {t.preempt_check_steps}")
    _need(t.checkpoint_every_steps >= 0, "train.checkpoint_every_steps",
          f"must be >= 0, got {t.checkpoint_every_steps}")
    _need(1 <= t.dist_timeout_s <= 7 * 86400, "train.dist_timeout_s",
          f"must be in [1, 604800] (a week), got {t.dist_timeout_s}")
    _need(0 <= cfg.run.seed < 2**32, "run.seed", f"must be in [0, 2**32), got {cfg.run.seed}")
    _need(0 <= d.split_seed < 2**32, "data.split_seed", f"must be in [0, 2**32), got {d.split_seed}")
    _need(cfg.log.embed_max >= 0, "log.embed_max", f"must be >= 0, got {cfg.log.embed_max}")
    for key, a in (("data.mixup_alpha", d.mixup_alpha), ("data.cutmix_alpha", d.cutmix_alpha)):
        _need(a >= 0 and math.isfinite(a), key, f"must be >= 0, got {a}")
    _need(not (d.mixup_alpha or d.cutmix_alpha) or cfg.loss.name != "triplet", "data.mixup_alpha",
          "mixup/CutMix make soft labels, which the triplet loss cannot use; use cross_entropy, squared or mse")
    _need(cfg.log.every_n_steps >= 1, "log.every_n_steps", f"must be >= 1, got {cfg.log.every_n_steps}")
    listed = [str(n) for n in cfg.log.trackers]
    twice = sorted({n for n in listed if listed.count(n) > 1})
    _need(not twice, "log.trackers", f"{', '.join(twice)} listed more than once")
    _need(cfg.model.num_classes is None or cfg.model.num_classes >= 2, "model.num_classes",
          f"must be >= 2 or null, got {cfg.model.num_classes}")

    # Names come from the registries, so a new entry is valid everywhere at once (toolkit.catalog
    # knows them without importing torch: a wrong name is refused in a fraction of a second).
    from toolkit.catalog import AUGMENTS, DATASETS, LOSSES, MODELS, OPTIMIZERS, SCHEDULERS

    DATASETS.check(d.name, "data.name")
    AUGMENTS.check(d.augment, "data.augment")
    MODELS.check(cfg.model.name, "model.name")
    OPTIMIZERS.check(o.name, "optim.name")
    SCHEDULERS.check(s.name, "sched.name")
    LOSSES.check(cfg.loss.name, "loss.name")
    if cfg.train.stages:
        total = sum(st.epochs for st in cfg.train.stages)
        _need(t.epochs == total, "train.epochs", f"{t.epochs} disagrees with train.stages, whose epochs add up to {total}")
        resolve_stages(cfg)


def check_paths(cfg: Config) -> None:
    """Path checks, separate from validate() so a sweep can build configs for other machines."""
    if cfg.train.resume not in ("none", "auto") and not Path(cfg.train.resume).is_dir():
        raise ConfigError(f"config: train.resume: no such checkpoint directory: {cfg.train.resume}")
    if cfg.run.dir is not None and Path(cfg.run.dir).exists() and not Path(cfg.run.dir).is_dir():
        raise ConfigError(f"config: run.dir: {cfg.run.dir} exists and is not a directory")
    from toolkit.models import check_pretrained

    check_pretrained(cfg.model.name, cfg.model.pretrained)  # weights file present and loadable kind
    if cfg.data.root is not None and not Path(cfg.data.root).is_dir() and not cfg.data.download:
        raise ConfigError(f"config: data.root: no such directory: {cfg.data.root}")


def _plain(value: Any) -> Any:
    """Enum members -> their words, recursively: what YAML, JSON, Ray Tune and TensorBoard get."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def to_dict(cfg: Any) -> Dict[str, Any]:
    """A config (Config, ExtractConfig) as nested dicts of plain values (no enums)."""
    return _plain(dataclasses.asdict(cfg))


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML; load_config / load_extract_config read it back equal."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def to_flat(cfg: Any) -> Dict[str, Any]:
    """{"optim.lr": 0.05, ...} for every key, plain values."""
    return {f"{sec}.{k}": v for sec, vals in to_dict(cfg).items() for k, v in vals.items()}


def hparams(cfg: Config) -> Dict[str, Any]:
    """The tunable subset of to_flat(): what a sweep passes in and compares."""
    return {k: v for k, v in to_flat(cfg).items() if k.startswith(TUNABLE)}


def with_flat(cfg: Config, flat: Dict[str, Any]) -> Config:
    """A new validated Config with {"section.key": value} applied (Ray Tune's trial dict)."""
    nested: Dict[str, Dict[str, Any]] = {}
    for key, value in flat.items():
        sec, sep, name = key.partition(".")
        if not sep:
            raise ConfigError(f"config: {key}: expected section.key")
        nested.setdefault(sec, {})[name] = value
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cfg), _switch_words(type(cfg), nested))
        new = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise _omega_error(e) from None
    if "train.stages" in flat:
        _derive_epochs(new, explicit="train.epochs" in flat)
    validate(new)
    return new


# ------------------------------------------------------------------------------------------
# extraction (toolkit/extract.py): its own sections, layered and checked the same way


@dataclass
class ExtractRunConfig:
    name: str = "extract"  # default: the config file's stem
    dir: Optional[str] = None  # default: model.run if set, else runs/<name>; features go to DIR/features
    seed: int = 0  # initialises a model that has no weights to load (the same on every rank)


@dataclass
class ExtractDataConfig:
    name: str = "folder"  # folder (any image tree; bad files listed) or a training dataset (digits, cifar10, ...)
    root: Optional[str] = None
    split: Split = Split.test  # training datasets only: train | val | test
    image_size: Optional[int] = None  # folder: null -> the trained run's, else 224
    batch_size: int = 64  # per process
    num_workers: int = 0
    loader: Loader = Loader.auto  # auto | device (in-memory datasets gathered on the device) | dataloader
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
    precision: Precision = Precision.auto  # auto (bf16 on a CUDA GPU with bf16, else no) | no | bf16 | fp16 (CUDA)
    channels_last: Switch = Switch.auto  # auto (on for convolutional nets on CUDA, else off) | true | false
    shard_size: int = 1024  # images per shard: the unit of work, of resume and of writes
    dist_timeout_s: int = 1800  # how long ranks wait for each other at the end


@dataclass
class ExtractConfig:
    run: ExtractRunConfig = field(default_factory=ExtractRunConfig)
    data: ExtractDataConfig = field(default_factory=ExtractDataConfig)
    model: ExtractModelConfig = field(default_factory=ExtractModelConfig)
    extract: ExtractSection = field(default_factory=ExtractSection)


def load_extract_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> ExtractConfig:
    """YAML file (optional) + `section.key=value` overrides -> validated ExtractConfig."""
    cfg, _, _ = merge_layers(ExtractConfig, path, overrides)
    validate_extract(cfg)
    return cfg


def validate_extract(cfg: ExtractConfig) -> None:
    """Range, cross-field and registry-name checks of an extraction config. One line per failure."""
    d, m, e = cfg.data, cfg.model, cfg.extract
    from toolkit.catalog import DATASETS, MODELS

    names = ["folder", *DATASETS.names()]
    _need(d.name in names, "data.name", f"unknown dataset {d.name!r}; choose one of: {', '.join(names)}")
    _need(d.name != "folder" or d.root is not None, "data.root", "folder needs data.root (the image collection)")
    _need(d.batch_size >= 1, "data.batch_size", f"must be >= 1, got {d.batch_size}")
    _need(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    _need(d.limit is None or d.limit >= 1, "data.limit", f"must be >= 1 or null, got {d.limit}")
    _need(d.image_size is None or d.image_size >= 8, "data.image_size", f"must be >= 8 or null, got {d.image_size}")
    _need(m.name is not None or m.run is not None, "model.name", "set model.name (e.g. resnet50) or model.run")
    _need(m.run is None or m.pretrained is None, "model.pretrained",
          "model.run brings its own weights (RUN/model.safetensors); leave model.pretrained out")
    if m.name is not None:
        MODELS.check(m.name, "model.name")
    _need(m.num_classes is None or m.num_classes >= 2, "model.num_classes", f"must be >= 2 or null, got {m.num_classes}")
    _need(bool(e.layer), "extract.layer", "must name a layer: features, logits or a module name")
    _need(e.shard_size >= 1, "extract.shard_size", f"must be >= 1, got {e.shard_size}")
    _need(e.dist_timeout_s >= 1, "extract.dist_timeout_s", f"must be >= 1, got {e.dist_timeout_s}")
