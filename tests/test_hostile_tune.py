"""`python -m toolkit.tune --resume` on a sweep folder someone else can write to (issue 17, item 8).

Ray's Tuner.restore unpickles SWEEP/tune/tuner.pkl, the newest basic-variant-state-*.json and
experiment_state-*.json: a planted file would run its code in the user's driver. The driver
signs what it writes (HMAC keyed by a per-user file outside the sweep, here in tmp_path via
TOOLKIT_TUNE_KEY) and --resume refuses anything else before Ray starts.
"""

from __future__ import annotations

import csv
import os
import pickle
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import DEMO, ROOT, child_env, ok, run_module
from toolkit.errors import ConfigError

TINY = ["data.limit=240", "sched.milestones=[]", "log.plots=false", "log.every_n_steps=2"]

# Each sweep starts a local Ray instance: one at a time (as in test_tune.py).
pytestmark = pytest.mark.xdist_group("clusters")


class Payload:
    """Unpickling this creates MARKER (any code could run instead)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(Payload(marker)))


def tune(args, tmp_path: Path, env=None, timeout=420) -> subprocess.CompletedProcess:
    env = {"TOOLKIT_TUNE_KEY": str(tmp_path / "home" / "tune.key"), **(env or {})}
    return run_module("toolkit.tune", ["--storage", str(tmp_path / "sweeps"), "--num-cpus", "2", *args], env=env,
                      timeout=timeout)


def refused(proc: subprocess.CompletedProcess, needle: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert needle in lines[0], lines[0]
    return lines[0]


def interrupted_sweep(tmp_path: Path, name: str) -> Path:
    """Two 2-epoch trials one after the other; the driver and its Ray are SIGKILLed once the
    first trial has finished, so Ray's state on disk is what it wrote mid-sweep."""
    space = tmp_path / "lrs.yaml"
    space.write_text("grid:\n  optim.lr: [0.01, 0.05]\n")
    cmd = [sys.executable, "-m", "toolkit.tune", "--storage", str(tmp_path / "sweeps"), "--num-cpus", "2",
           "--config", DEMO, "--space", str(space), "--name", name, "--scheduler", "fifo", "--max-concurrent", "1",
           "train.epochs=2", *TINY]
    env = child_env({"TOOLKIT_FAULT_STEP_SLEEP": "0.15", "TOOLKIT_TUNE_KEY": str(tmp_path / "home" / "tune.key")})
    driver = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    sweep = tmp_path / "sweeps" / name
    deadline = time.time() + 300
    # Wait until Ray has saved its state with the first trial finished (it saves every >= 10 s).
    while time.time() < deadline:
        done = [p for p in (sweep / "runs").glob("*") if (p / "summary.json").is_file()]
        started = [p for p in (sweep / "runs").glob("*") if p not in done and list(p.glob("checkpoints/step_*"))]
        if done and started and len(list((sweep / "tune").glob("experiment_state-*.json"))):
            break
        assert driver.poll() is None, "the sweep ended before it could be interrupted"
        time.sleep(0.1)
    else:
        pytest.fail("no trial finished in time")
    import psutil  # (a Ray dependency)

    family = psutil.Process(driver.pid).children(recursive=True)
    os.killpg(driver.pid, signal.SIGKILL)
    for p in family:  # nothing of the first driver lives on
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    driver.wait()
    return sweep


@pytest.mark.slow
def test_planted_pickles_are_refused_and_an_interrupted_sweep_still_resumes(tmp_path):
    sweep = interrupted_sweep(tmp_path, "hostile")
    state = sweep / "tune"
    marker = state / "PWNED"
    assert (sweep / "tune.sig.json").is_file()
    # The key never leaves its file: nothing in the sweep holds it.
    key = (tmp_path / "home" / "tune.key").read_bytes()
    assert stat.S_IMODE((tmp_path / "home" / "tune.key").stat().st_mode) == 0o600
    assert not any(key in p.read_bytes() for p in sweep.rglob("*") if p.is_file())

    saved = tmp_path / "saved"
    shutil.copytree(state, saved)

    def restore() -> None:
        shutil.rmtree(state)
        shutil.copytree(saved, state)

    # 1. tuner.pkl replaced: Tuner.restore unpickles it first.
    plant(state / "tuner.pkl", marker)
    line = refused(tune(["--resume", "--name", "hostile"], tmp_path), f"{state / 'tuner.pkl'}")
    assert "not written by this toolkit" in line
    assert not marker.exists()
    restore()
    # 2. A newer searcher state beside the signed one: Ray loads the newest name.
    planted = state / "basic-variant-state-9999-12-31_23-59-59.json"
    plant(planted, marker)
    refused(tune(["--resume", "--name", "hostile"], tmp_path), f"refusing {planted}: it has no signature")
    assert not marker.exists()
    restore()
    # 3. A signed file's bytes moved to another signed name do not pass (the name is signed too).
    states = sorted(state.glob("experiment_state-*.json"))
    (state / "tuner.pkl").write_bytes(states[0].read_bytes())
    refused(tune(["--resume", "--name", "hostile"], tmp_path), "tuner.pkl")
    restore()
    # 4. Signatures made with another key (another user, or a forged file): refused.
    other = tune(["--resume", "--name", "hostile"], tmp_path, env={"TOOLKIT_TUNE_KEY": str(tmp_path / "other.key")})
    refused(other, "no sweep signing key at")
    (tmp_path / "other.key").write_bytes(os.urandom(32))
    (tmp_path / "other.key").chmod(0o600)
    other = tune(["--resume", "--name", "hostile"], tmp_path, env={"TOOLKIT_TUNE_KEY": str(tmp_path / "other.key")})
    refused(other, "not written by this toolkit")
    # 5. No signatures at all (a sweep from before signing, or the file deleted): refused.
    sigs = (sweep / "tune.sig.json").read_text()
    (sweep / "tune.sig.json").unlink()
    refused(tune(["--resume", "--name", "hostile"], tmp_path), "has no signature")
    (sweep / "tune.sig.json").write_text(sigs)
    assert not marker.exists()

    # Untouched, the interrupted sweep resumes and finishes: the state Ray wrote mid-sweep was signed.
    proc = ok(tune(["--resume", "--name", "hostile"], tmp_path))
    with open(sweep / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(r["status"] == "done" for r in rows), proc.stdout[-2000:]
    assert not marker.exists()
    # And the finished sweep resumes again (what the resumed driver wrote is signed as well).
    ok(tune(["--resume", "--name", "hostile"], tmp_path))


def test_a_key_other_users_can_read_is_refused(tmp_path, monkeypatch):
    from toolkit.tune import load_key

    path = tmp_path / "cfg" / "tune.key"
    monkeypatch.setenv("TOOLKIT_TUNE_KEY", str(path))
    with pytest.raises(ConfigError, match="no sweep signing key"):
        load_key(create=False)  # --resume never makes one
    key = load_key(create=True)
    assert len(key) == 32 and stat.S_IMODE(path.stat().st_mode) == 0o600 and load_key(create=True) == key
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="must be yours alone"):
        load_key(create=False)


def test_what_ray_may_unpickle_is_listed(tmp_path):
    """Every top-level .json/.pkl and the trials' pickles; not PBT's engine checkpoints."""
    from toolkit.tune import ray_state_files

    state = tmp_path / "tune"
    for rel in ("tuner.pkl", "experiment_state-x.json", "basic-variant-state-x.json", ".hidden.pkl",
                "T_00000/params.pkl", "T_00000/error.pkl", "T_00000/result.json", "T_00000/progress.csv",
                "T_00000/checkpoint_000001/random_states_0.pkl", ".validate_storage_marker"):
        (state / rel).parent.mkdir(parents=True, exist_ok=True)
        (state / rel).write_text("x")
    got = sorted(p.relative_to(state).as_posix() for p in ray_state_files(state))
    assert got == [".hidden.pkl", "T_00000/error.pkl", "T_00000/params.pkl", "basic-variant-state-x.json",
                   "experiment_state-x.json", "tuner.pkl"]
    (state / "T_00001").symlink_to(tmp_path)
    with pytest.raises(ConfigError, match="symbolic link"):
        ray_state_files(state)


def test_importing_the_cli_does_not_import_ray():
    code = "import sys, toolkit.tune; assert 'ray' not in sys.modules; toolkit.tune.SignRayState; " \
           "assert toolkit.tune.SignRayState.__module__ == 'toolkit.tune'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(), check=True)
