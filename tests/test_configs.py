"""Every shipped config loads, validates, and trains a short smoke epoch through the real CLI,
on data written in its dataset's real on-disk format (digits ship with scikit-learn; CIFAR-10 as
a `cifar-10-batches-py` folder of pickled batches; the 35-class folder as a class-per-folder
tree of PNG/JPEG/... files)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from helpers import make_cifar10, make_folder, ok, summary, train
from toolkit.config import load_config, to_yaml

# Training configs; the extraction configs (extract_*.yaml) are run in tests/test_extract.py.
CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")
                 if not p.name.startswith("extract_"))
IDS = [p.stem for p in CONFIGS]


def test_there_are_configs_for_the_experiments():
    names = set(IDS)
    assert {"digits_lenet", "cifar10_smallcnn_lrstep", "cifar10_resnet18_3step", "cifar10_smallcnn",
            "cifar10_resnet18", "cifar10_vgg16bn", "cifar10_lenet",  # E1, E2, E5, E6 on CIFAR-10
            "folder35_base_cnn", "folder35_res_basic", "folder35_res_bottleneck", "folder35_vgg16_frozen",
            "folder35_resnet18_frozen", "folder35_triplet_cos", "folder35_triplet_euclid", "folder35_squared",
            "folder35_mse", "folder35_tuned",  # E4
            "digits_smallcnn_lrstep", "digits_resnet18_3step", "digits_smallcnn", "digits_resnet18",
            "digits_lenet_optim", "digits_base_cnn", "digits_triplet_cos", "digits_triplet_euclid",
            "digits_squared", "digits_mse"} <= names  # the digits versions


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_config_is_valid(path):
    cfg = load_config(str(path))
    assert cfg.run.name == path.stem
    assert to_yaml(cfg)
    if not cfg.train.stages:
        assert load_config(str(path), ["train.epochs=99"]).train.epochs == 99


def _one_epoch_overrides(cfg) -> list:
    """Shorten the run without changing what it runs: one epoch (one per stage), no milestones."""
    out = ["sched.milestones=[]", "sched.warmup_epochs=0"]
    if not cfg.train.stages:
        return [*out, "train.epochs=1"]
    stages = []
    for st in cfg.train.stages:
        d = dataclasses.asdict(st)
        d["epochs"] = 1
        d["sched"] = {k: v for k, v in d["sched"].items() if k not in ("milestones", "warmup_epochs")}
        stages.append(d)
    return [*out, "train.stages=" + json.dumps(stages)]


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_config_trains_one_smoke_epoch(path, tmp_path):
    cfg = load_config(str(path))
    run = tmp_path / "run"
    args = ["--config", str(path), f"run.dir={run}", "log.tensorboard=false", "log.tsne=false", "log.embed_max=32",
            *_one_epoch_overrides(cfg)]
    name = cfg.data.name
    if name == "digits":
        args += ["data.limit=96"]
    elif name in ("cifar10", "cifar100"):
        make_cifar10(tmp_path / "data")  # 180 train / 20 val / 50 test images in torchvision's format
        args += [f"data.root={tmp_path / 'data'}"]
    elif name == "imagefolder":
        make_folder(tmp_path / "data", {"train": 8, "val": 2, "test": 2, "extra": 2})  # 3 classes
        args += [f"data.root={tmp_path / 'data'}", "data.batch_size=8", "data.eval_batch_size=8",
                 "model.num_classes=35"]
    else:
        pytest.fail(f"no smoke data for dataset {name!r}: add it here")
    if cfg.data.batch_size > 64:  # the smoke splits are small (180 CIFAR training images)
        args += ["data.batch_size=64", "data.eval_batch_size=64"]
    if cfg.train.precision == "bf16":  # 4x slower on this CPU (66 vs 15 s for cifar10_fast);
        args += ["train.precision=no"]  # bf16 on CPU: test_train_e2e, on a GPU: test_gpu
    if cfg.train.compile:  # minutes of inductor compilation on a CPU; tests/test_gpu.py compiles on a GPU
        args += ["train.compile=false"]
    if cfg.model.pretrained:
        # ImageNet weights cannot be fetched here; loading them is tested in test_models_zoo
        # (hub cache and state-dict files). The smoke run checks the rest of the config.
        args += ["model.pretrained=null"]
    proc = ok(train(args, timeout=600))
    s = summary(run)
    assert s["epochs"] == max(1, len(cfg.train.stages)) and s["num_test_samples"] > 0
    assert (run / "curves.png").is_file() and (run / "config.yaml").is_file()
    resolved = load_config(str(run / "config.yaml"))  # the resolved config reloads as it ran
    assert resolved.model.name == cfg.model.name and resolved.loss.name == cfg.loss.name
    assert "error" not in proc.stderr.lower()
