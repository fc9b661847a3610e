"""The commands the docs print, run as they are printed; and what a launcher leaves on screen.

    python -m pytest tests/test_documented_commands.py

E6's optimizer loop is taken from docs/experiments.md itself (not retyped here), so a doc edit
that breaks it (an empty override once wrote a run into the loop's parent folder, and the report
compared one run instead of five) fails this test. The only change made to the text: one short epoch per run.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import ROOT, child_env, launch, summary

pytestmark = pytest.mark.slow

EXPERIMENTS = ROOT / "docs" / "experiments.md"


def documented_block(doc: Path, first: str, last: str) -> str:
    """The lines of DOC's first fenced shell block from the line starting with FIRST through the
    line starting with LAST."""
    lines = doc.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(first))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith(last))
    assert not any(line.startswith("```") for line in lines[start:end]), "the block ends before LAST"
    return "\n".join(lines[start:end + 1]) + "\n"


def run_from_a_checkout(script: str, cwd: Path) -> subprocess.CompletedProcess:
    """SCRIPT in bash, in CWD laid out like the repository root (configs/ and toolkit/ linked),
    with this environment's `accelerate` and `python` first on PATH, as after `make demo`."""
    for name in ("configs", "toolkit", "launch"):
        (cwd / name).symlink_to(ROOT / name)
    bindir = str(Path(sys.executable).parent)
    env = child_env({"PATH": bindir + os.pathsep + os.environ.get("PATH", "")})
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_e6_optimizer_loop_writes_five_runs_and_the_report_compares_them(tmp_path):
    script = documented_block(EXPERIMENTS, 'for o in "optim.momentum=0"', "python -m toolkit.report runs/exp/optim")
    assert script.count("--config configs/digits_lenet_optim.yaml") == 1, script
    script = script.replace("--config configs/digits_lenet_optim.yaml",
                            "--config configs/digits_lenet_optim.yaml train.epochs=1 data.limit=300 log.plots=false")
    proc = run_from_a_checkout(script, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]

    parent = tmp_path / "runs" / "exp" / "optim"
    runs = sorted(p for p in parent.iterdir() if (p / "summary.json").exists())
    assert not (parent / "summary.json").exists(), "a run was written into the loop's parent folder"
    chosen = {(c["optim"]["name"], c["optim"]["momentum"])
              for c in (yaml.safe_load((r / "config.yaml").read_text()) for r in runs)}
    assert chosen == {("sgd", 0.0), ("sgd", 0.9), ("rmsprop", 0.0), ("adam", 0.9), ("adagrad", 0.9)}, chosen
    assert all(summary(r)["epochs"] == 1 for r in runs)

    compare = parent / "compare"
    with open(compare / "compare.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5, rows
    assert (compare / "compare.png").stat().st_size > 0


def last_words(text: str) -> str:
    """The last line of TEXT with words in it (torchrun's report ends with a rule of '=')."""
    return next(line for line in reversed(text.splitlines()) if re.search(r"\w", line))


def test_under_torchrun_the_last_line_is_the_toolkits_error(tmp_path):
    proc = launch(["--config", str(ROOT / "configs" / "digits_lenet.yaml"), "train.no_such_key=1",
                   f"run.dir={tmp_path / 'run'}"])
    assert proc.returncode != 0
    assert proc.stderr.count("error: config: train.no_such_key") >= 2, proc.stderr[-3000:]  # the rank's line and the report's
    assert "error: config: train.no_such_key" in last_words(proc.stderr), proc.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def test_one_process_with_quiet_ends_with_the_toolkits_error_and_no_traceback(tmp_path):
    proc = launch(["--config", str(ROOT / "configs" / "digits_lenet.yaml"), "train.no_such_key=1",
                   f"run.dir={tmp_path / 'run'}"], config_file="launch/cpu.yaml", launch_args=["-q"])
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert last_words(proc.stderr).startswith("error: config: train.no_such_key"), proc.stderr[-3000:]
