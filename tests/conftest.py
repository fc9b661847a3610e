"""Fixtures only. Builders and CLI runners live in tests/helpers (`from helpers import ...`):
pytest puts tests/ on sys.path when it loads this file (rootdir conftest, "prepend" import
mode), and pyproject.toml's `pythonpath = ["tests"]` says so explicitly."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from helpers.cli import DEMO, launch, ok


def pytest_collection_modifyitems(config, items):
    """Tests pinned to one worker (an xdist_group: the local SLURM cluster, Ray) first, so that
    under `make test`'s workers that long serial chain starts at once and the other workers
    share everything else beside it, instead of it running alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("xdist_group") is None)  # stable


@pytest.fixture(scope="session", autouse=True)
def sweep_signing_key(tmp_path_factory):
    """Sweeps sign Ray's state with a per-user key (toolkit.tune); the suite's sweeps use one in
    a temp folder, never the key in the home folder of whoever runs the tests. Every CLI the
    tests start inherits it."""
    key = tmp_path_factory.mktemp("tune-key") / "tune.key"
    old = os.environ.get("TOOLKIT_TUNE_KEY")
    os.environ["TOOLKIT_TUNE_KEY"] = str(key)
    yield key
    if old is None:
        os.environ.pop("TOOLKIT_TUNE_KEY", None)
    else:
        os.environ["TOOLKIT_TUNE_KEY"] = old


@pytest.fixture(scope="session")
def demo_single(tmp_path_factory, worker_id) -> Path:
    """The demo config, trained once per session with one process, exactly as `make demo` runs it.
    Tests that use it launch a CLI: mark them slow. Read it, never write into it: under xdist the
    workers share this one run (the first to need it trains it while the others wait on a lock)."""
    base = tmp_path_factory.getbasetemp()
    shared = base if worker_id == "master" else base.parent  # the session's folder above the workers'
    run_dir = shared / "demo_single" / "run"
    with open(shared / "demo_single.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (run_dir / "summary.json").is_file():
            ok(launch(["--config", DEMO, f"run.dir={run_dir}"], config_file="launch/cpu.yaml"))
    return run_dir
