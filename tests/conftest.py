"""Fixtures only. Builders and CLI runners live in tests/helpers (`from helpers import ...`):
pytest puts tests/ on sys.path when it loads this file (rootdir conftest, "prepend" import
mode), and pyproject.toml's `pythonpath = ["tests"]` says so explicitly."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.cli import DEMO, launch, ok


def pytest_collection_modifyitems(config, items):
    """Tests pinned to one worker (an xdist_group: the local SLURM cluster, Ray) first, so that
    under `make test`'s workers that long serial chain starts at once and the other workers
    share everything else beside it, instead of it running alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("xdist_group") is None)  # stable


@pytest.fixture(scope="session")
def demo_single(tmp_path_factory) -> Path:
    """The demo config, trained once per session with one process, exactly as `make demo` runs it.
    Tests that use it launch a CLI: mark them slow."""
    run_dir = tmp_path_factory.mktemp("demo") / "run"
    ok(launch(["--config", DEMO, f"run.dir={run_dir}"], config_file="launch/cpu.yaml"))
    return run_dir
