"""Unit tests for toolkit.config: layering, strict validation, one-line errors, flat helpers."""

from __future__ import annotations

import dataclasses
import json
from enum import Enum
from pathlib import Path

import pytest
import yaml

from toolkit.config import (Choice, Config, ExtractConfig, Freeze, Precision, check_paths, hparams, load_config,
                            load_extract_config, parse_yaml, resolve_stages, to_flat, to_yaml, validate, with_flat)
from toolkit.data import DATASETS
from toolkit.data.augment import AUGMENTS
from toolkit.errors import ConfigError
from toolkit.losses import LOSSES
from toolkit.models import FREEZE_MODES, MODELS
from toolkit.optim import OPTIMIZERS, SCHEDULERS


def write(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def config_error(path=None, overrides=()) -> str:
    """Load and return the ConfigError message, checking it is a single line."""
    with pytest.raises(ConfigError) as ei:
        load_config(path, overrides)
    msg = str(ei.value)
    assert msg and "\n" not in msg, f"message is not one line: {msg!r}"
    return msg


BASE_YAML = """\
data:
  batch_size: 32
  augment: crop
optim:
  lr: 0.01
  momentum: 0.8
sched:
  milestones: [3]
train:
  epochs: 5
"""


# ---------------------------------------------------------------------------------------------
# layering


def test_defaults_without_file():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg == Config()
    assert cfg.run.name == "run"
    assert cfg.optim.lr == 0.05 and cfg.train.epochs == 10


def test_yaml_over_defaults_and_name_from_stem(tmp_path):
    cfg = load_config(write(tmp_path, "my_exp.yaml", BASE_YAML))
    assert cfg.run.name == "my_exp"
    assert cfg.data.batch_size == 32
    assert cfg.data.augment == "crop"
    assert cfg.optim.lr == 0.01
    assert cfg.optim.momentum == 0.8
    assert cfg.sched.milestones == [3]
    assert cfg.train.epochs == 5
    # untouched keys keep their dataclass defaults
    assert cfg.optim.weight_decay == 5e-4
    assert cfg.data.eval_batch_size == 256
    assert cfg.run.seed == 0


def test_overrides_over_yaml_later_wins(tmp_path):
    path = write(tmp_path, "exp.yaml", BASE_YAML)
    cfg = load_config(path, ["optim.lr=0.2", "train.epochs=8", "optim.lr=0.3",
                             "sched.milestones=[2,6]", "run.seed=7", "data.augment=none"])
    assert cfg.optim.lr == 0.3  # the later of two overrides wins
    assert isinstance(cfg.optim.lr, float)
    assert cfg.train.epochs == 8
    assert cfg.sched.milestones == [2, 6]
    assert cfg.run.seed == 7
    assert cfg.data.augment == "none"
    assert cfg.optim.momentum == 0.8  # from YAML, not overridden
    assert cfg.run.name == "exp"


def test_run_name_in_yaml_and_override(tmp_path):
    path = write(tmp_path, "stem.yaml", "run:\n  name: explicit\n")
    assert load_config(path).run.name == "explicit"
    assert load_config(path, ["run.name=over"]).run.name == "over"
    path2 = write(tmp_path, "other.yaml", "run:\n  seed: 3\n")
    cfg = load_config(path2)
    assert cfg.run.name == "other" and cfg.run.seed == 3


def test_empty_yaml_is_defaults_with_stem(tmp_path):
    cfg = load_config(write(tmp_path, "empty.yaml", ""))
    assert cfg.run.name == "empty"
    assert dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name="run")) == Config()


def test_override_values_are_typed():
    cfg = load_config(None, ["optim.lr=1e-3", "optim.nesterov=true", "model.num_classes=12",
                             "train.clip_grad_norm=1.5", "data.limit=100", "run.name=a=b"])
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.nesterov is True
    assert cfg.model.num_classes == 12
    assert cfg.train.clip_grad_norm == 1.5
    assert cfg.data.limit == 100
    assert cfg.run.name == "a=b"  # only the first '=' splits
    cfg = load_config(None, ["optim.lr=1"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)


# ---------------------------------------------------------------------------------------------
# unknown keys and wrong types


def test_unknown_key_in_section_override():
    msg = config_error(None, ["optim.foo=1"])
    assert "optim.foo" in msg


def test_unknown_top_level_section_override():
    msg = config_error(None, ["nosuch.x=1"])
    assert "nosuch" in msg


def test_unknown_key_in_yaml(tmp_path):
    msg = config_error(write(tmp_path, "c.yaml", "optim:\n  lrr: 0.1\n"))
    assert "optim.lrr" in msg


def test_unknown_section_in_yaml(tmp_path):
    msg = config_error(write(tmp_path, "c.yaml", "bogus:\n  a: 1\n"))
    assert "bogus" in msg


@pytest.mark.parametrize("override,key", [
    ("optim.lr=abc", "optim.lr"),
    ("train.epochs=2.5", "train.epochs"),
    ("train.epochs=true", "train.epochs"),
    ("data.batch_size=big", "data.batch_size"),
    ("run.seed=abc", "run.seed"),
    ("sched.milestones=[1,a]", "sched.milestones"),
    ("sched.milestones=5", "sched.milestones"),
])
def test_wrong_type(override, key):
    msg = config_error(None, [override])
    assert key in msg
    assert msg.startswith("config: ")


def test_wrong_type_in_yaml(tmp_path):
    msg = config_error(write(tmp_path, "c.yaml", "train:\n  epochs: many\n"))
    assert "train.epochs" in msg


def test_section_not_a_mapping_names_the_section(tmp_path):
    msg = config_error(write(tmp_path, "c.yaml", "optim: 3\n"))
    assert "optim" in msg.split(":")[1]  # 'config: optim: ...'


# ---------------------------------------------------------------------------------------------
# out-of-range values


@pytest.mark.parametrize("overrides,key,fragment", [
    (["optim.lr=0"], "optim.lr", "must be > 0"),
    (["optim.lr=-0.1"], "optim.lr", "must be > 0"),
    (["optim.lr=nan"], "optim.lr", "must be > 0"),
    (["optim.momentum=1"], "optim.momentum", "[0, 1)"),
    (["optim.weight_decay=-1"], "optim.weight_decay", ">= 0"),
    (["data.batch_size=0"], "data.batch_size", ">= 1"),
    (["data.eval_batch_size=0"], "data.eval_batch_size", ">= 1"),
    (["data.limit=0"], "data.limit", ">= 1"),
    (["train.epochs=0"], "train.epochs", ">= 1"),
    (["train.epochs=-3"], "train.epochs", ">= 1"),
    (["train.grad_accum_steps=0"], "train.grad_accum_steps", ">= 1"),
    (["train.clip_grad_norm=0"], "train.clip_grad_norm", "> 0"),
    (["train.keep_last=0"], "train.keep_last", ">= 1"),
    (["train.epochs=5", "sched.milestones=[0]"], "sched.milestones", "milestone 0"),
    (["train.epochs=10", "sched.milestones=[3,2]"], "sched.milestones", "strictly increasing"),
    (["train.epochs=10", "sched.milestones=[2,2]"], "sched.milestones", "strictly increasing"),
    (["sched.gamma=0"], "sched.gamma", "(0, 1]"),
    (["sched.gamma=1.5"], "sched.gamma", "(0, 1]"),
    (["loss.label_smoothing=1"], "loss.label_smoothing", "[0, 1)"),
    (["loss.label_smoothing=-0.1"], "loss.label_smoothing", "[0, 1)"),
    (["log.every_n_steps=0"], "log.every_n_steps", ">= 1"),
    (["model.num_classes=1"], "model.num_classes", ">= 2"),
])
def test_out_of_range(overrides, key, fragment):
    msg = config_error(None, overrides)
    assert msg.startswith(f"config: {key}: "), msg
    assert fragment in msg


def test_a_shortened_run_drops_milestones_past_its_end_and_cuts_its_warmup():
    """train.epochs=2 on a config made for 20 epochs just works: what cannot happen in the
    shorter run is dropped or cut, and the stage's notes say so (log and summary.json)."""
    cfg = load_config("configs/digits_lenet.yaml", ["train.epochs=2"])
    assert cfg.sched.milestones == [15]  # the config records what the user wrote
    (stage,) = resolve_stages(cfg)
    assert stage.cfg.sched.milestones == [] and stage.notes == [
        "sched.milestones: [15] at or past the end of the run's 2 epoch(s): dropped"]
    (stage,) = resolve_stages(load_config(None, ["train.epochs=4", "sched.milestones=[1,4,9]",
                                                 "sched.warmup_epochs=5"]))
    assert stage.cfg.sched.milestones == [1] and stage.cfg.sched.warmup_epochs == 3.0
    assert stage.notes[1] == "sched.warmup_epochs: 5 is not shorter than the run's 4 epoch(s): cut to 3"
    (stage,) = resolve_stages(load_config(None, ["train.epochs=1", "sched.warmup_epochs=2"]))
    assert stage.cfg.sched.warmup_epochs == 0.0
    (stage,) = resolve_stages(load_config(None, ["train.epochs=5", "sched.milestones=[1,4]"]))
    assert stage.notes == [] and stage.cfg.sched.milestones == [1, 4]


def test_boundary_values_accepted():
    cfg = load_config(None, ["train.epochs=5", "sched.milestones=[1,4]", "sched.gamma=1",
                             "loss.label_smoothing=0.99", "optim.momentum=0", "data.batch_size=1",
                             "train.epochs=5"])
    assert cfg.sched.milestones == [1, 4]
    assert cfg.sched.gamma == 1.0


def test_infinite_lr_rejected():
    msg = config_error(None, ["optim.lr=inf"])
    assert "optim.lr" in msg


@pytest.mark.parametrize("override,key,choices", [
    ("train.precision=fp8", "train.precision", ["auto", "no", "bf16", "fp16"]),
    ("log.progress=xyz", "log.progress", ["auto", "rich", "plain", "none"]),
    ("train.nonfinite=ignore", "train.nonfinite", ["skip", "stop"]),
])
def test_unknown_mode_lists_choices(override, key, choices):
    msg = config_error(None, [override])
    assert msg.startswith(f"config: {key}: ")
    bad = override.split("=")[1]
    assert repr(bad) in msg
    assert "choose one of: " + ", ".join(choices) in msg


# ---------------------------------------------------------------------------------------------
# unknown registry names


@pytest.mark.parametrize("override,key,valid", [
    ("model.name=vgg", "model.name", MODELS.names()),
    ("data.name=imagenet", "data.name", DATASETS.names()),
    ("optim.name=adamx", "optim.name", OPTIMIZERS.names()),
    ("sched.name=cosinus", "sched.name", SCHEDULERS.names()),
    ("loss.name=hinge", "loss.name", LOSSES.names()),
    ("data.augment=flip", "data.augment", AUGMENTS.names()),
])
def test_unknown_name_lists_valid_choices(override, key, valid):
    msg = config_error(None, [override])
    assert key in msg
    bad = override.split("=")[1]
    assert repr(bad) in msg
    assert "choose one of:" in msg
    listed = [s.strip() for s in msg.split("choose one of:")[1].split(",")]
    for name in valid:
        assert name in listed


def test_registry_names_are_accepted():
    cfg = load_config(None, ["model.name=resnet18_cifar", "sched.name=constant", "data.augment=crop"])
    assert cfg.model.name == "resnet18_cifar"
    assert cfg.sched.name == "constant"


# ---------------------------------------------------------------------------------------------
# malformed overrides and files


@pytest.mark.parametrize("bad", ["optim.lr", "lr=0.1", "=0.1", "optim.lr 0.1", ""])
def test_malformed_override(bad):
    msg = config_error(None, [bad])
    assert repr(bad) in msg
    assert "section.key=value" in msg


def test_missing_config_file(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    msg = config_error(missing)
    assert "no such file" in msg and missing in msg


def test_invalid_yaml(tmp_path):
    path = write(tmp_path, "bad.yaml", "optim:\n  lr: [1,\n")
    msg = config_error(path)
    assert "not valid YAML" in msg and path in msg
    assert "line" in msg


def test_yaml_list(tmp_path):
    path = write(tmp_path, "list.yaml", "- 1\n- 2\n")
    msg = config_error(path)
    assert "mapping" in msg and "list" in msg and path in msg


def test_yaml_scalar(tmp_path):
    path = write(tmp_path, "scalar.yaml", "42\n")
    msg = config_error(path)
    assert "mapping" in msg and "int" in msg


# ---------------------------------------------------------------------------------------------
# check_paths


def test_check_paths_ok(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    cfg = load_config(None, [f"train.resume={ckpt}", f"run.dir={tmp_path / 'new_run'}",
                             f"data.root={tmp_path}"])
    check_paths(cfg)  # no error
    for resume in ("none", "auto"):
        check_paths(load_config(None, [f"train.resume={resume}"]))


def test_check_paths_missing_resume_dir(tmp_path):
    missing = tmp_path / "step_9"
    cfg = load_config(None, [f"train.resume={missing}"])  # validate() does not look at paths
    with pytest.raises(ConfigError) as ei:
        check_paths(cfg)
    msg = str(ei.value)
    assert msg.startswith("config: train.resume: ") and str(missing) in msg and "\n" not in msg


def test_check_paths_resume_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="train.resume"):
        check_paths(load_config(None, [f"train.resume={f}"]))


def test_check_paths_run_dir_is_file(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    cfg = load_config(None, [f"run.dir={f}"])
    with pytest.raises(ConfigError) as ei:
        check_paths(cfg)
    msg = str(ei.value)
    assert msg.startswith("config: run.dir: ") and str(f) in msg and "not a directory" in msg


def test_check_paths_missing_data_root(tmp_path):
    missing = tmp_path / "data"
    cfg = load_config(None, [f"data.root={missing}"])
    with pytest.raises(ConfigError) as ei:
        check_paths(cfg)
    msg = str(ei.value)
    assert msg.startswith("config: data.root: ") and str(missing) in msg


# ---------------------------------------------------------------------------------------------
# flat dicts and YAML round trip


def test_to_flat_has_every_key():
    cfg = Config()
    flat = to_flat(cfg)
    expected = {f"{sec.name}.{f.name}" for sec in dataclasses.fields(Config)
                for f in dataclasses.fields(getattr(cfg, sec.name))}
    assert set(flat) == expected
    assert flat["optim.lr"] == 0.05
    assert flat["sched.milestones"] == []
    assert flat["run.dir"] is None


def test_hparams_subset():
    cfg = load_config(None, ["optim.lr=0.2", "run.dir=/tmp/x", "train.precision=bf16"])
    hp = hparams(cfg)
    assert hp["optim.lr"] == 0.2
    for key in ("data.batch_size", "data.augment", "model.name", "sched.milestones",
                "loss.label_smoothing", "train.epochs", "train.grad_accum_steps",
                "train.clip_grad_norm"):
        assert key in hp
    for key in ("run.dir", "run.name", "run.seed", "train.precision", "train.resume",
                "data.root", "data.num_workers", "log.progress", "train.keep_last"):
        assert key not in hp
    flat = to_flat(cfg)
    assert all(flat[k] == v for k, v in hp.items())


def test_with_flat_round_trip(tmp_path):
    cfg = load_config(write(tmp_path, "exp.yaml", BASE_YAML))
    assert with_flat(cfg, to_flat(cfg)) == cfg
    assert with_flat(cfg, hparams(cfg)) == cfg
    assert with_flat(cfg, {}) == cfg


def test_with_flat_applies_and_leaves_original(tmp_path):
    cfg = load_config(write(tmp_path, "exp.yaml", BASE_YAML))
    new = with_flat(cfg, {"optim.lr": 0.5, "sched.milestones": [1, 2], "data.batch_size": 16})
    assert new.optim.lr == 0.5 and new.sched.milestones == [1, 2] and new.data.batch_size == 16
    assert new.optim.momentum == cfg.optim.momentum
    assert new.run.name == "exp"
    assert cfg.optim.lr == 0.01 and cfg.sched.milestones == [3]  # original untouched
    assert to_flat(new) == {**to_flat(cfg), "optim.lr": 0.5, "sched.milestones": [1, 2],
                            "data.batch_size": 16}


@pytest.mark.parametrize("flat,key", [
    ({"optim.lr": -1.0}, "optim.lr"),
    ({"optim.lr": "abc"}, "optim.lr"),
    ({"train.epochs": 2.5}, "train.epochs"),
    ({"optim.bogus": 1}, "optim.bogus"),
    ({"model.name": "vgg"}, "model.name"),
    ({"sched.milestones": [0]}, "sched.milestones"),
    ({"optimlr": 0.1}, "optimlr"),
])
def test_with_flat_validates(flat, key):
    with pytest.raises(ConfigError) as ei:
        with_flat(Config(), flat)
    msg = str(ei.value)
    assert key in msg and "\n" not in msg


def test_validate_direct():
    cfg = Config()
    validate(cfg)
    cfg.train.epochs = 0
    with pytest.raises(ConfigError, match=r"^config: train\.epochs: "):
        validate(cfg)


def test_to_yaml_reloads_equal(tmp_path):
    cfg = load_config(write(tmp_path, "exp.yaml", BASE_YAML),
                      ["model.num_classes=12", "train.clip_grad_norm=2.0", "run.dir=/x/y",
                       "optim.nesterov=true", "data.limit=40"])
    text = to_yaml(cfg)
    assert isinstance(yaml.safe_load(text), dict)
    out = tmp_path / "different_stem.yaml"
    out.write_text(text)
    again = load_config(str(out))
    assert again == cfg
    assert again.run.name == "exp"  # the saved name wins over the new file's stem
    assert to_yaml(again) == text


def test_to_yaml_defaults_reload(tmp_path):
    out = tmp_path / "d.yaml"
    out.write_text(to_yaml(Config()))
    assert load_config(str(out)) == Config()


def test_precision_no_survives_yaml_1_1_booleans(tmp_path):
    """`no` is YAML 1.1's false: `train.precision=no` and `precision: no` must still mean fp32."""
    assert load_config(None, ["train.precision=no"]).train.precision == "no"
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  precision: no\n")
    assert load_config(str(f)).train.precision == "no"


# ---------------------------------------------------------------------------------------------
# mode fields are str enums that OmegaConf checks; YAML 1.2 booleans


def _choice_fields(schema: type, prefix: str = ""):
    """(key, enum) of every Choice-typed field of a config schema, nested sections included."""
    import typing

    out = []
    for f in dataclasses.fields(schema):
        tp = typing.get_type_hints(schema)[f.name]
        if dataclasses.is_dataclass(tp):
            out += _choice_fields(tp, f"{prefix}{f.name}.")
        elif isinstance(tp, type) and issubclass(tp, Choice):
            out.append((f"{prefix}{f.name}", tp))
    return out


TRAIN_CHOICES = _choice_fields(Config)
EXTRACT_CHOICES = _choice_fields(ExtractConfig)


def test_every_mode_field_is_a_choice():
    keys = {k for k, _ in TRAIN_CHOICES}
    assert keys == {"data.loader", "data.decode", "data.sampler", "model.freeze", "loss.distance",
                    "train.precision", "train.tta", "train.nonfinite", "log.progress", "train.monitor",
                    "train.test_weights", "train.channels_last"}
    assert {k for k, _ in EXTRACT_CHOICES} == {"data.split", "data.loader", "extract.precision",
                                               "extract.channels_last"}
    for _, enum in TRAIN_CHOICES + EXTRACT_CHOICES:
        assert all(m.name == m.value for m in enum)  # OmegaConf converts a word by member name
    assert Freeze.words() == list(FREEZE_MODES)  # the models' freeze modes, in their order


@pytest.mark.parametrize("key,enum", TRAIN_CHOICES, ids=[k for k, _ in TRAIN_CHOICES])
def test_every_mode_field_rejects_an_unknown_word_in_one_line(key, enum):
    msg = config_error(None, [f"{key}=bogus"])
    assert msg.startswith(f"config: {key}: unknown ") and "'bogus'" in msg
    assert msg.endswith("choose one of: " + ", ".join(enum.words()))
    for word in enum.words():  # and accepts each of its words
        if (key, word) == ("data.decode", "device"):
            continue  # needs data.name=imagefolder (a cross-field check)
        overrides = [f"{key}={word}", "data.batch_size=64"]
        assert getattr(getattr(load_config(None, overrides), key.split(".")[0]), key.split(".")[1]) == word


@pytest.mark.parametrize("key,enum", EXTRACT_CHOICES, ids=[k for k, _ in EXTRACT_CHOICES])
def test_every_extract_mode_field_rejects_an_unknown_word_in_one_line(key, enum):
    with pytest.raises(ConfigError) as ei:
        load_extract_config(None, ["model.name=lenet", "data.name=digits", f"{key}=bogus"])
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith(f"config: {key}: unknown ") and "'bogus'" in msg
    assert msg.endswith("choose one of: " + ", ".join(enum.words()))


def test_mode_values_are_strings_everywhere(tmp_path):
    cfg = load_config(None, ["train.precision=bf16", "train.nonfinite=stop", "log.progress=plain",
                             "data.sampler=pk", "model.freeze=backbone", "loss.distance=euclidean"])
    assert isinstance(cfg.train.precision, Precision) and cfg.train.precision is Precision.bf16
    assert cfg.train.nonfinite == "stop" and cfg.train.nonfinite != "skip"  # str comparisons hold
    assert cfg.train.precision in ("no", "bf16") and {"bf16": 1}[cfg.train.precision] == 1
    assert f"{cfg.train.precision} {cfg.log.progress}" == "bf16 plain" and str(cfg.model.freeze) == "backbone"
    assert json.dumps({"p": cfg.train.precision}) == '{"p": "bf16"}'
    for flat in (to_flat(cfg), hparams(cfg)):  # what Ray Tune and TensorBoard get
        for key, value in flat.items():
            assert not isinstance(value, Enum), key
    assert type(hparams(cfg)["data.sampler"]) is str and hparams(cfg)["loss.distance"] == "euclidean"
    text = to_yaml(cfg)
    assert "precision: bf16" in text and "progress: plain" in text and "Precision" not in text
    assert yaml.safe_load(text)["train"]["precision"] == "bf16"  # plain YAML, readable by anyone
    f = tmp_path / "config.yaml"
    f.write_text(text)
    assert load_config(str(f)) == cfg


def test_precision_no_is_written_so_that_yaml_1_1_reads_it_back(tmp_path):
    text = to_yaml(load_config(None, ["train.precision=no", "train.channels_last=false"]))  # (defaults: auto)
    assert yaml.safe_load(text)["train"]["precision"] == "no"  # quoted: 'no'
    assert yaml.safe_load(text)["train"]["channels_last"] == "false"  # the word, not YAML's boolean


@pytest.mark.parametrize("word", ["off", "on", "yes", "no", "y", "n", "Off", "NO"])
def test_yaml_1_1_boolean_words_stay_words(tmp_path, word):
    """`log.progress=off` / `progress: off` reach the config as the word 'off' (an unknown mode
    here, listed with the valid ones), not as the boolean YAML 1.1 makes of it."""
    msg = config_error(None, [f"log.progress={word}"])
    assert msg == f"config: log.progress: unknown mode '{word}'; choose one of: auto, rich, plain, none"
    path = write(tmp_path, "c.yaml", f"log:\n  progress: {word}\n")
    assert config_error(path) == msg
    assert load_config(None, [f"run.name={word}"]).run.name == word
    assert load_config(write(tmp_path, "n.yaml", f"run:\n  name: {word}\n")).run.name == word


def test_true_false_stay_booleans_and_bool_fields_still_take_on_off(tmp_path):
    cfg = load_config(None, ["optim.nesterov=true", "log.tensorboard=false", "train.compile=False"])
    assert cfg.optim.nesterov is True and cfg.log.tensorboard is False and cfg.train.compile is False
    cfg = load_config(write(tmp_path, "c.yaml", "optim:\n  nesterov: on\nlog:\n  tensorboard: off\n"))
    assert cfg.optim.nesterov is True and cfg.log.tensorboard is False  # OmegaConf converts these words
    msg = config_error(None, ["train.precision=true"])
    assert msg == "config: train.precision: unknown precision True; choose one of: auto, no, bf16, fp16"


def test_yaml_1_2_scalars_in_overrides_and_files(tmp_path):
    cfg = load_config(None, ["optim.lr=1e-3", "run.name=2024-01-01",
                             "train.stages=[{epochs: 2, optim: {lr: 5e-4}}]", "sched.milestones=[]"])
    assert cfg.optim.lr == pytest.approx(1e-3) and cfg.run.name == "2024-01-01"
    assert cfg.train.stages[0].optim["lr"] == pytest.approx(5e-4)  # an untyped dict gets a float too
    assert parse_yaml("a: 1e-3\nb: .inf\nc: -1.5\nd: 7\ne: null\nf: ~\ng: off") == {
        "a": 1e-3, "b": float("inf"), "c": -1.5, "d": 7, "e": None, "f": None, "g": "off"}


def test_yaml_stays_safe(tmp_path):
    path = write(tmp_path, "evil.yaml", "run: !!python/object/apply:os.system ['true']\n")
    assert "not valid YAML" in config_error(path)
    msg = config_error(None, ["run.name=!!python/object/apply:os.system ['true']"])
    assert "not valid YAML" in msg


def test_an_override_value_that_is_not_yaml_is_one_line():
    msg = config_error(None, ["optim.lr=[1,"])
    assert msg == "override 'optim.lr=[1,': the value is not valid YAML"


def test_extract_config_round_trips_and_keeps_its_checks(tmp_path):
    cfg = load_extract_config(None, ["model.name=lenet", "data.name=digits", "data.split=val",
                                     "extract.precision=bf16", "data.loader=dataloader"])
    assert cfg.data.split == "val" and cfg.extract.precision == "bf16" and cfg.data.loader == "dataloader"
    f = tmp_path / "config.yaml"
    f.write_text(to_yaml(cfg))
    assert "split: val" in f.read_text() and load_extract_config(str(f)) == cfg
    assert to_flat(cfg)["extract.precision"] == "bf16" and type(to_flat(cfg)["data.split"]) is str
    with pytest.raises(ConfigError, match=r"^config: extract\.shard_size: must be >= 1, got 0$"):
        load_extract_config(None, ["model.name=lenet", "extract.shard_size=0", "data.root=/x"])
    with pytest.raises(ConfigError, match=r"^config: model\.name: set model\.name"):
        load_extract_config(None, ["data.root=/x"])
    with pytest.raises(ConfigError, match=r"^config: data\.root: folder needs data\.root"):
        load_extract_config(None, ["model.name=lenet"])


def test_index_overrides_reach_list_entries_or_fail_in_one_line():
    """`train.stages.0.epochs=1` changes that stage (and the derived train.epochs); a missing
    entry or a whole entry by index is one line, not OmegaConf's merge traceback."""
    cfg = load_config("configs/digits_triplet_cos.yaml", ["train.stages.0.epochs=1", "train.stages.1.optim.lr=0.5"])
    full = load_config("configs/digits_triplet_cos.yaml")
    assert cfg.train.stages[0].epochs == 1 and cfg.train.stages[1].optim["lr"] == 0.5
    assert cfg.train.epochs == full.train.epochs - full.train.stages[0].epochs + 1
    for override, msg in [("train.stages.5.epochs=1", "config: train.stages.5.epochs: train.stages has 2 entries"),
                          ("train.stages.0=1", "config: train.stages.0: set the whole list with train.stages=[...]")]:
        with pytest.raises(ConfigError) as e:
            load_config("configs/digits_triplet_cos.yaml", [override])
        assert str(e.value).startswith(msg) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"^config: train.stages.0.epochs: train.stages has 0 entries$"):
        load_config("configs/digits_lenet.yaml", ["train.stages.0.epochs=1"])


def test_train_help_names_every_config_section_and_the_reference():
    """The --help text is kept by hand (it must not import the config): it must not drift."""
    import dataclasses

    from toolkit.config import Config
    from toolkit.train import EPILOG

    for f in dataclasses.fields(Config):
        assert f"\n  {f.name} " in EPILOG, f.name
    assert "docs/quickstart.md" in EPILOG
