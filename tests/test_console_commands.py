"""The console commands (pyproject.toml's [project.scripts]) and shipped configs found by name,
from a directory outside the checkout; every CLI's --help (config sections, the docs, no torch).

The commands exist once `pip install -e .` (or `make venv`) has run with the current
pyproject.toml; they sit next to the interpreter (.venv/bin/toolkit-train).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from helpers import ROOT, child_env, imported_by, ok, refused_in_process, summary
from toolkit.clihelp import DOCS, EXTRACT_SECTIONS, TRAIN_SECTIONS
from toolkit.config import SHIPPED, Config, ExtractConfig, find_config, load_config, shipped_names
from toolkit.errors import ConfigError

BIN = Path(sys.executable).parent
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
# extract, retrieve and prepare import torch at their top, report matplotlib: not these
HELP_WITHOUT_TORCH = ["train", "predict", "tune", "export", "list"]


def command(name: str, args, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """BIN/NAME ARGS, run in CWD (a directory outside the checkout)."""
    exe = BIN / name
    assert exe.is_file(), f"{exe} is missing: reinstall with `pip install -e .` (pyproject.toml's [project.scripts])"
    return subprocess.run([str(exe), *map(str, args)], cwd=cwd, env=child_env(), capture_output=True, text=True,
                          timeout=timeout)


def one_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and err[0].startswith("error: "), (proc.returncode, proc.stderr)
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


# --- what pyproject.toml promises -----------------------------------------------------------

def test_the_scripts_are_the_commands_users_are_told_about():
    assert sorted(SCRIPTS) == sorted(f"toolkit-{c}" for c in (
        "train", "extract", "predict", "retrieve", "tune", "report", "demo", "export", "prepare", "list", "clean"))
    # train leaves through os._exit on a multi-process rank (toolkit.train.cli), the rest return main()'s code
    assert SCRIPTS["toolkit-train"] == "toolkit.train:cli"
    assert all(v == f"toolkit.{k.removeprefix('toolkit-')}:main" for k, v in SCRIPTS.items() if k != "toolkit-train")


def test_the_installed_entry_points_are_pyproject_s_and_load():
    """Fails until `pip install -e .` has run with this pyproject.toml."""
    installed = {ep.name: ep for ep in importlib.metadata.entry_points(group="console_scripts")
                 if ep.dist is not None and ep.dist.name == "toolkit"}
    assert {k: ep.value for k, ep in installed.items()} == SCRIPTS, "reinstall: pip install -e ."
    for ep in installed.values():
        assert callable(ep.load()), ep


def test_train_cli_exits_with_main_s_code(tmp_path):
    """In a new interpreter: cli() ends the process (toolkit.errors.leave) with main()'s code."""
    code = "from toolkit import train\ntrain.main = lambda: 7\ntrain.cli()\nprint('not reached')"
    env = {k: v for k, v in child_env().items() if k != "WORLD_SIZE"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert (proc.returncode, proc.stdout) == (7, ""), proc.stderr


def test_the_package_holds_the_configs_and_the_checkout_links_to_them():
    assert (SHIPPED / "digits_lenet.yaml").is_file() and (SHIPPED / "spaces" / "lr.yaml").is_file()
    assert SHIPPED.parent == Path(importlib.import_module("toolkit").__file__).resolve().parent
    link = ROOT / "configs"  # every documented `configs/x.yaml` path keeps working from the checkout
    assert link.is_symlink() and link.resolve() == SHIPPED.resolve()


# --- --config NAME: one resolver for configs and spaces ---------------------------------------

def test_a_name_finds_the_shipped_config_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = str(SHIPPED / "digits_lenet.yaml")
    for arg in ("digits_lenet", "digits_lenet.yaml", "configs/digits_lenet.yaml"):
        assert find_config(arg) == shipped, arg
    assert find_config("lr", "spaces", "--space") == str(SHIPPED / "spaces" / "lr.yaml")
    assert find_config("configs/spaces/lr.yaml", "spaces", "--space") == str(SHIPPED / "spaces" / "lr.yaml")
    cfg = load_config("digits_lenet", ["train.epochs=1"])
    assert cfg.run.name == "digits_lenet" and cfg.model.name == "lenet" and cfg.train.epochs == 1


def test_a_path_that_exists_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    own = tmp_path / "configs" / "digits_lenet.yaml"
    own.write_text("model:\n  name: simple_cnn\n")
    for arg in ("configs/digits_lenet.yaml", str(own)):
        assert find_config(arg) == arg
        assert load_config(arg).model.name == "simple_cnn"
    (tmp_path / "lr").write_text("grid:\n  optim.lr: [0.5]\n")
    from toolkit.tune import load_space

    assert load_space("lr").grid == {"optim.lr": [0.5]}


def test_unknown_names_and_missing_paths_are_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        find_config("digits_lenett")
    assert str(e.value) == f"--config: unknown config 'digits_lenett'; choose one of: {', '.join(shipped_names())} " \
                           "(or a YAML path)"
    assert "digits_lenet" in str(e.value) and "extract_digits" in str(e.value)
    for path in ("nope.yaml", "configs/nope.yaml", "other/digits_lenet.yaml", str(tmp_path / "x")):
        with pytest.raises(ConfigError, match=f"^--config: no such file: {re.escape(path)}$"):
            find_config(path)
    with pytest.raises(ConfigError, match="^--space: unknown space 'nope'; choose one of: augment, full, "):
        find_config("nope", "spaces", "--space")


@pytest.mark.parametrize("cli", ["train", "extract", "tune"])
def test_every_config_cli_refuses_an_unknown_name_in_one_line(cli, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main = importlib.import_module(f"toolkit.{cli}").main
    extra = ["--space", "lr", "--check-only"] if cli == "tune" else []
    refused_in_process(capsys, main, ["--config", "nope", *extra], "--config: unknown config 'nope'",
                       "digits_lenet", "extract_digits")
    assert list(tmp_path.iterdir()) == []


def test_tune_stores_the_shipped_files_it_found_by_name(tmp_path, monkeypatch):
    from toolkit import tune

    started = []
    monkeypatch.setattr(tune, "run_sweep", lambda sweep, *args: started.append(sweep) or 0)  # no Ray
    monkeypatch.chdir(tmp_path)
    assert tune.main(["--config", "digits_lenet", "--space", "lr", "--storage", str(tmp_path / "s")]) == 0
    sweep, = started
    # trials and `--resume` read them by these paths, from wherever they run
    assert sweep.config == str(SHIPPED / "digits_lenet.yaml") and sweep.space == str(SHIPPED / "spaces" / "lr.yaml")
    assert sweep.name.startswith("digits_lenet-lr-")


# --- --help: the sections, the docs ---------------------------------------------------------

def section_keys(line: str) -> list:
    """The key names a help line lists: after its last ': ', parentheses and the '...' left out."""
    text = re.sub(r"\([^)]*\)", "", line).rpartition(": ")[2]
    return [k.strip() for k in text.split(",") if k.strip() and k.strip() != "..."]


@pytest.mark.parametrize("schema,sections", [(Config, TRAIN_SECTIONS), (ExtractConfig, EXTRACT_SECTIONS)],
                         ids=["train", "extract"])
def test_the_help_sections_are_the_config_s(schema, sections):
    assert [name for name, _ in sections] == [f.name for f in dataclasses.fields(schema)]
    for field in dataclasses.fields(schema):
        line = dict(sections)[field.name]
        keys = {f.name for f in dataclasses.fields(field.default_factory())}
        named = section_keys(line)
        assert named and set(named) <= keys, (field.name, set(named) - keys)


def help_text(cli: str, capsys) -> str:
    main = importlib.import_module(f"toolkit.{cli}").main
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("cli,sections", [("train", TRAIN_SECTIONS), ("tune", TRAIN_SECTIONS),
                                          ("extract", EXTRACT_SECTIONS)])
def test_config_clis_list_their_sections_in_help(cli, sections, capsys):
    text = help_text(cli, capsys)
    assert f"every key and its default: {DOCS}" in text
    for name, line in sections:
        assert re.search(rf"^  {name} +{re.escape(line)}$", text, re.M), (name, text)
    assert "toolkit-list configs" in text  # where the names --config takes are listed


@pytest.mark.parametrize("cli", ["predict", "export", "report", "retrieve", "prepare", "list"])
def test_every_cli_s_help_points_to_the_quickstart(cli, capsys):
    text = help_text(cli, capsys)
    assert f"docs: {DOCS}" in text and "examples:" in text


# --- the installed commands, from a directory outside the checkout ------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_command_answers_help_from_anywhere(name, tmp_path):
    proc = ok(command(name, ["--help"], tmp_path))
    assert proc.stdout.startswith("usage: ") and DOCS in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("cli", HELP_WITHOUT_TORCH)
def test_help_does_not_import_torch(cli, tmp_path):
    """--help answers before torch loads (seconds on a busy machine): checked in a fresh interpreter."""
    assert imported_by(f"toolkit.{cli}", ["--help"], ["torch", "torchvision"], tmp_path) == [False, False]


@pytest.mark.slow
@pytest.mark.parametrize("override", ["model.name=nosuch", "data.name=nosuch", "loss.name=nosuch",
                                      "optim.name=nosuch", "sched.name=nosuch", "data.augment=nosuch"])
def test_a_wrong_registry_name_is_refused_before_torch_loads(override, tmp_path):
    """toolkit.catalog knows every name: a typo in one costs a fraction of a second, not torch's import."""
    assert imported_by("toolkit.train", ["--config", "digits_lenet", override], ["torch"], tmp_path,
                       exit_code=2) == [False]


@pytest.mark.slow
def test_print_config_by_name_from_anywhere(tmp_path):
    proc = ok(command("toolkit-train", ["--config", "digits_lenet", "--print-config", "train.epochs=2"], tmp_path))
    assert "name: digits_lenet" in proc.stdout and "epochs: 2" in proc.stdout
    proc = ok(command("toolkit-extract", ["--config", "extract_digits", "--print-config", "model.run=RUN"], tmp_path))
    assert "layer: features" in proc.stdout and "run: RUN" in proc.stdout
    assert list(tmp_path.iterdir()) == []  # nothing written where it ran


@pytest.mark.slow
def test_unknown_config_name_from_anywhere_is_one_line(tmp_path):
    one_line(command("toolkit-train", ["--config", "nope", "--print-config"], tmp_path),
             "--config: unknown config 'nope'; choose one of: ", "digits_lenet")
    one_line(command("toolkit-tune", ["--config", "digits_lenet", "--space", "nope", "--check-only"], tmp_path),
             "--space: unknown space 'nope'; choose one of: ", "lr")
    one_line(command("toolkit-list", ["nope"], tmp_path), "unknown kind 'nope'; choose one of: models, ")


@pytest.mark.slow
def test_list_from_anywhere(tmp_path):
    proc = ok(command("toolkit-list", ["configs"], tmp_path))
    assert re.search(r"^  digits_lenet +\S", proc.stdout, re.M), proc.stdout


@pytest.mark.slow
def test_a_short_training_from_anywhere(tmp_path):
    """The real command, as a user outside the checkout types it: shipped config by name, one epoch."""
    work, run = tmp_path / "elsewhere", tmp_path / "run"
    work.mkdir()
    proc = ok(command("toolkit-train", ["--config", "digits_lenet", "train.epochs=1", "log.plots=false",
                                        "log.progress=none", f"run.dir={run}"], work))
    s = summary(run)
    assert s["epochs"] == 1 and s["num_test_samples"] == 360 and s["test_acc"] > 0.2  # chance: 0.1
    assert f"run directory: {run}" in proc.stdout
    assert list(work.iterdir()) == []  # everything went to run.dir, nothing into the working directory


@pytest.mark.slow
def test_a_wheel_ships_the_configs(tmp_path):
    """What a non-editable install gets: every shipped YAML inside the package (package-data)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        (src / name).write_bytes((ROOT / name).read_bytes())
    shutil.copytree(ROOT / "toolkit", src / "toolkit", ignore=shutil.ignore_patterns("__pycache__"))
    ok(subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                       "-w", str(tmp_path / "dist"), str(src)], env=child_env(), capture_output=True, text=True,
                      timeout=300))
    wheel, = (tmp_path / "dist").glob("toolkit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"toolkit/configs/{n}.yaml" for n in shipped_names()} | {
        f"toolkit/configs/spaces/{n}.yaml" for n in shipped_names("spaces")}
    assert shipped and shipped <= names, sorted(shipped - names)
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "toolkit-train = toolkit.train:cli" in entry_points
