"""Edge cases of runs that continue, rewind or restart in a used run directory."""

from __future__ import annotations

import os

import pytest
import torch

from helpers import DEMO, assert_same_weights, launch, metrics, ok, summary, train, weights
from toolkit import checkpoint
from toolkit.config import load_config
from toolkit.data import DATASETS
from toolkit.engine import make_loaders
from toolkit.errors import ConfigError

TWO = ["--config", DEMO, "train.epochs=2", "sched.milestones=[]", "log.tensorboard=false"]


@pytest.mark.slow
def test_a_fresh_run_refuses_a_used_run_directory(tmp_path):
    run = tmp_path / "run"
    ok(train([*TWO, f"run.dir={run}"]))
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    proc = train([*TWO, f"run.dir={run}"], timeout=120)
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: config: run.dir: {run} is not empty (it holds model.safetensors, summary.json, "
                           "checkpoints, ") and line.endswith(
        "a new run writes only into an empty directory: continue that run with train.resume=auto, "
        "or choose an empty or new run.dir")
    assert before == {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}  # nothing touched


@pytest.mark.slow
def test_resuming_a_finished_run_changes_nothing_and_logs_the_test_once(tmp_path):
    run = tmp_path / "run"
    ok(train([*TWO, f"run.dir={run}"]))
    first = weights(run / "model.safetensors")
    ok(train([*TWO, f"run.dir={run}", "train.resume=auto"]))
    assert [r["kind"] for r in metrics(run)].count("test") == 1
    assert all(torch.equal(first[k], v) for k, v in weights(run / "model.safetensors").items())


@pytest.mark.slow
def test_rewinding_to_an_older_checkpoint_moves_newer_ones_aside(tmp_path):
    run = tmp_path / "run"
    ok(train([*TWO, f"run.dir={run}"]))
    (tmp_path / "first.safetensors").write_bytes((run / "model.safetensors").read_bytes())
    proc = ok(train([*TWO, f"run.dir={run}", f"train.resume={run / 'checkpoints' / 'step_39'}"]))
    assert "moved step_78 aside to step_78.stale" in proc.stdout
    assert (run / "checkpoints" / "step_78.stale").is_dir()
    assert [c.name for c in checkpoint.list_checkpoints(run / "checkpoints")] == ["step_78", "step_39"]
    assert_same_weights(tmp_path / "first.safetensors", run / "model.safetensors")


@pytest.mark.slow
def test_resume_on_more_processes_than_saved_with(tmp_path):
    """Saved by 1 process, resumed by 2: the new rank takes rank 0's RNG state, so the run
    still matches the uninterrupted one (to float rounding, as 1 vs 2 processes do)."""
    args = ["--config", DEMO, "train.epochs=3", "sched.milestones=[2]", "train.checkpoint_every_steps=25",
            "log.tensorboard=false"]
    ok(train([*args, f"run.dir={tmp_path / 'u'}"]))
    killed = train([*args, f"run.dir={tmp_path / 'r'}"], env={"TOOLKIT_FAULT_KILL_AT_STEP": "60"})
    assert killed.returncode != 0
    ok(launch([*args, f"run.dir={tmp_path / 'r'}", "train.resume=auto"]))
    assert summary(tmp_path / "r")["world_size"] == 2
    a, b = weights(tmp_path / "u" / "model.safetensors"), weights(tmp_path / "r" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)


def test_padded_last_batch_on_several_processes_is_refused():
    splits = DATASETS.build("digits", split_seed=0, limit=None)
    with pytest.raises(ConfigError, match="data.drop_last: false would pad"):
        make_loaders(splits, 32, 256, 0, False, 0, world=2)
    make_loaders(splits, 32, 256, 0, False, 0, world=1)  # one process: no padding, fine
    make_loaders(splits, 32, 256, 0, True, 0, world=2)


@pytest.mark.parametrize("override,key", [("run.seed=-1", "run.seed"), ("run.seed=4294967296", "run.seed"),
                                          ("data.split_seed=-1", "data.split_seed"),
                                          ("train.dist_timeout_s=100000000000000", "train.dist_timeout_s")])
def test_seed_and_timeout_bounds(override, key):
    with pytest.raises(ConfigError, match=f"^config: {key}: "):
        load_config(DEMO, [override])


@pytest.mark.slow
def test_fewer_model_classes_than_the_dataset_is_refused(tmp_path):
    proc = train(["--config", DEMO, "model.num_classes=2", f"run.dir={tmp_path / 'run'}"], timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: config: model.num_classes: 2 is fewer than the dataset's 10 classes"
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_run_directory_in_use_is_refused_with_the_holders_pid(tmp_path):
    """Two processes training into one run directory would overwrite each other's checkpoints."""
    from toolkit.rundir import run_lock

    run = tmp_path / "run"
    run.mkdir()
    with run_lock(run):
        proc = train(["--config", DEMO, f"run.dir={run}", "train.resume=auto", "train.epochs=1", "data.limit=100",
                      "sched.milestones=[]"])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (f"error: config: run.dir: {run} is in use by another process "
                                                   f"(pid {os.getpid()}); wait for it to end or choose another run.dir")
    assert not (run / "checkpoints").exists()
    ok(train(["--config", DEMO, f"run.dir={run}", "train.resume=auto", "train.epochs=1", "data.limit=100",
              "sched.milestones=[]"]))  # released: the next run goes ahead
