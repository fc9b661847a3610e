"""Every shipped config loads, validates and resolves (paths are checked where it runs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from toolkit.config import load_config, to_yaml

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_configs_for_the_experiments():
    names = {p.stem for p in CONFIGS}
    assert {"digits_lenet", "cifar10_e1_lr_step", "cifar10_e2_three_step", "cifar10_e6_lenet",
            "e4_base_cnn", "e4_vgg16_frozen"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_is_valid(path):
    cfg = load_config(str(path))
    assert cfg.run.name == path.stem
    assert load_config(str(path), ["train.epochs=99"]).train.epochs == 99
    assert to_yaml(cfg)
