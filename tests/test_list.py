"""`python -m toolkit.list KIND`: every registry entry and shipped config, one described line each."""

from __future__ import annotations

import re

import pytest

from helpers import imported_by, refused_in_process
from toolkit.config import shipped_names
from toolkit.data import DATASETS
from toolkit.data.augment import AUGMENTS
from toolkit.list import KINDS, main, yaml_description
from toolkit.losses import LOSSES
from toolkit.models import MODELS
from toolkit.optim import OPTIMIZERS, SCHEDULERS
from toolkit.registry import Registry, first_sentence

EXPECTED = {"models": MODELS.names, "datasets": DATASETS.names, "augments": AUGMENTS.names,
            "losses": LOSSES.names, "optimizers": OPTIMIZERS.names, "schedulers": SCHEDULERS.names,
            "configs": shipped_names, "spaces": lambda: shipped_names("spaces")}


def listed(kind: str, capsys) -> dict:
    """name -> description, as `toolkit.list KIND` prints them (a header, then `  name  text`)."""
    assert main([kind]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{kind}, for ")
    rows = [re.fullmatch(r"  (\S+) +(.*)", line) for line in out[1:]]
    assert all(rows), out
    return {m[1]: m[2] for m in rows}


def test_every_kind_is_listed_and_checked_here():
    assert list(KINDS) == list(EXPECTED)


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_every_entry_is_listed_with_a_description(kind, capsys):
    rows = listed(kind, capsys)
    assert list(rows) == EXPECTED[kind]()
    undescribed = [name for name, text in rows.items() if not text.strip()]
    assert not undescribed, f"{kind} without a description (a docstring on the builder): {undescribed}"


def test_descriptions_are_the_docstring_s_first_sentence(capsys):
    rows = listed("optimizers", capsys)
    assert rows["sgd"] == "SGD with optional (Nesterov) momentum and weight decay."
    assert listed("configs", capsys)["digits_lenet"].startswith("`make demo`: LeNet-5 on the embedded digits")


def test_no_kind_lists_the_kinds(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for kind in KINDS:
        assert re.search(rf"^  {kind} +\S", out, re.M), out


def test_an_unknown_kind_is_one_line(capsys):
    refused_in_process(capsys, main, ["model"], "unknown kind 'model'; choose one of: models, datasets, ")


def test_registry_describe():
    reg = Registry("thing")

    @reg.register("a")
    def a():
        """First sentence, on
        two lines. Second sentence."""

    @reg.register("b", description="Given at registration.")
    def b():
        """Not this."""

    @reg.register("c")
    def c():
        pass

    assert reg.describe("a") == "First sentence, on two lines."
    assert reg.describe("b") == "Given at registration."
    assert reg.describe("c") == ""
    with pytest.raises(Exception, match="unknown thing 'd'"):
        reg.describe("d")


def test_first_sentence():
    assert first_sentence("lr 0.1 down to 0.001 at epoch 5. Then more.") == "lr 0.1 down to 0.001 at epoch 5."
    assert first_sentence("One paragraph\n\nanother.") == "One paragraph"
    long = first_sentence("x" * 300)
    assert len(long) <= 110 and long.endswith("...")


def test_yaml_description_stops_at_commands(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("# Features of a run:\n#   python -m toolkit.extract ...\ndata:\n  name: digits\n")
    assert yaml_description(path) == "Features of a run:"


@pytest.mark.slow
@pytest.mark.parametrize("kind,absent", [("models", "torchvision"), ("configs", "torch")])
def test_listing_imports_only_what_the_registry_needs(kind, absent, tmp_path):
    """Start-up matters (benchmarks/startup.py): the model registry never imports torchvision, and
    the shipped configs are listed without torch."""
    assert imported_by("toolkit.list", [kind], [absent], tmp_path) == [False]
