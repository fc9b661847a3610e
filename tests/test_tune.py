"""Sweeps: `python -m toolkit.tune` on a local Ray instance, small digits trials on the CPU."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from helpers import DEMO, ROOT, child_env, ok, run_module, summary, train
from toolkit.errors import ConfigError
from toolkit.tune import Space, check_space, expand, load_space, search_mode
from toolkit.config import load_config

# A trial: 240 digits (192 train), 6 updates an epoch, LeNet, no plots.
TINY = ["data.limit=240", "sched.milestones=[]", "log.plots=false", "log.every_n_steps=2"]


def tune(args, tmp_path: Path, env=None, timeout=420) -> subprocess.CompletedProcess:
    return run_module("toolkit.tune", ["--storage", str(tmp_path / "sweeps"), "--num-cpus", "2", *args], env=env,
                      timeout=timeout)


def results(sweep: Path):
    with open(sweep / "results.csv") as f:
        return list(csv.DictReader(f))


# Each sweep starts a local Ray with all CPUs: under pytest-xdist they run one at a time, on the worker
# that runs test_slurm (whose sweeps start Ray too). Two chains side by side (a "ray" and a "slurm"
# group) made the suite slower, not faster: 21 min 8 s vs 20 min 30 s on 2 cores, all of it CPU work.
pytestmark = pytest.mark.xdist_group("clusters")


# --- spaces, no Ray -------------------------------------------------------------------------


def test_every_shipped_space_loads_and_fits_the_demo_config():
    cfg = load_config(DEMO)
    for name in ("lr", "optimizer", "momentum", "weight_decay", "label_noise", "augment", "full"):
        space = load_space(name)
        for mode in {search_mode(space, None), search_mode(space, 4)}:
            check_space(space, cfg, mode)
    assert load_space("optimizer").keys == ["optim.name", "optim.momentum", "optim.lr"]
    assert expand({"optim": {"name": "adam", "lr": 0.001}, "data.augment": "crop"}) == {
        "optim.name": "adam", "optim.lr": 0.001, "data.augment": "crop"}
    assert search_mode(load_space("lr"), None) == "grid" and search_mode(load_space("lr"), 8) == "random"
    assert search_mode(load_space("full"), None) == "random"


@pytest.mark.parametrize("text,needle", [
    ("grid:\n  optim.lrr: [0.1]\n", "optim.lrr is not a tunable config key; did you mean optim.lr?"),
    ("grid:\n  run.seed: [1, 2]\n", "run.seed is not a tunable config key"),
    ("grid:\n  optim.name: [sgd, lion]\n", "optim.name='lion'"),
    ("grid:\n  optim.lr: [0.1, -1]\n", "optim.lr=-1"),
    ("random:\n  optim.lr: {loguniform: [0, 1]}\n", "needs 0 < low < high"),
    ("random:\n  optim.lr: {normal: [0, 1]}\n", "expected one of"),
    ("grid:\n  optim: [adam]\n", "a section name takes a list of mappings"),
    ("grid:\n  optim: [{name: adam, lrr: 1}]\n", "optim.lrr is not a tunable config key"),
    ("lr: [1]\n", "must hold `grid:` and/or `random:`"),
])
def test_bad_spaces_are_named(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        space = load_space(str(path))
        check_space(space, load_config(DEMO), search_mode(space, None))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_space_values_are_read_as_configs_are(tmp_path):
    """`no`/`off` in a space file are the words, as in a config file (YAML 1.1 would make them false)."""
    path = tmp_path / "precision.yaml"
    path.write_text("grid:\n  train.precision: [no, bf16]\n  log.progress: [off, plain]\n")
    space = load_space(str(path))
    assert space.grid == {"train.precision": ["no", "bf16"], "log.progress": ["off", "plain"]}


@pytest.mark.parametrize("args,needle", [
    (["--space", "nope"], "--space: unknown space 'nope'; choose one of: augment, full, label_noise, lr,"),
    (["--space", "lr", "--metric", "val_f1"], "--metric: 'val_f1' is never reported; trials report: val_acc,"),
    (["--space", "lr", "--metric", "test_acc"], "--metric: 'test_acc' is never reported"),
    (["--space", "lr", "--gpus-per-trial", "1"], "--gpus-per-trial 1: this machine has no CUDA GPU"),
    (["--space", "lr", "--workers-per-trial", "0"], "--workers-per-trial: must be >= 1"),
    (["--space", "lr", "--scheduler", "pbt"], "--scheduler pbt: the space's random section"),
    (["--space", "full", "--scheduler", "pbt"], "may hold only optim.lr"),
    (["--space", "lr", "optim.lrr=1"], "optim.lrr"),
    (["--space", "lr", "run.dir=/tmp/x"], "each trial sets run.* and train.resume itself"),
    (["--space", "lr", "--resume"], "--resume: name the sweep with --name"),
    (["--resume", "--name", "never"], "--resume: no sweep at"),
])
def test_bad_input_fails_in_one_line_before_ray_starts(tmp_path, capsys, args, needle):
    if "--gpus-per-trial" in args and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    if "--scheduler" in args and "lr" in args:  # the lr space with its random section is PBT's
        space = tmp_path / "grid_only.yaml"
        space.write_text("grid:\n  optim.lr: [0.1, 0.01]\n")
        args = ["--space", str(space), "--scheduler", "pbt"]
    import ray

    from toolkit.tune import main

    assert main(["--storage", str(tmp_path / "sweeps"), "--config", DEMO, *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
    assert not ray.is_initialized() and not any((tmp_path / "sweeps").glob("*/sweep.json"))


@pytest.mark.slow
def test_the_cli_exits_2_with_one_line(tmp_path):
    proc = tune(["--config", DEMO, "--space", "nope"], tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: --space: unknown space 'nope'; choose one of: augment, full, label_noise, lr, momentum, optimizer, "
        f"weight_decay (or a YAML path)"]


@pytest.mark.slow
def test_a_sweep_name_in_use_is_refused(tmp_path):
    (tmp_path / "sweeps" / "taken" / "runs").mkdir(parents=True)
    proc = tune(["--config", DEMO, "--space", "lr", "--name", "taken"], tmp_path)
    assert proc.returncode == 2 and "already holds a sweep; finish it with --resume --name taken" in proc.stderr


def test_pbt_exploit_keeps_the_schedule_and_takes_the_new_lr():
    """apply_optim_hparams on a loaded optimizer: the lr (and everything the schedule keeps) is
    rescaled, momentum and weight decay replaced, no-decay groups left at zero."""
    from toolkit.config import OptimConfig
    from toolkit.engine import apply_optim_hparams
    from toolkit.optim import SCHEDULERS

    for name in ("multistep", "cosine", "onecycle"):
        p = [nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(2))]
        opt = torch.optim.SGD([{"params": p[:1], "weight_decay": 5e-4}, {"params": p[1:], "weight_decay": 0.0}],
                              lr=0.1, momentum=0.9)
        sched = SCHEDULERS.build(name, optimizer=opt, steps_per_epoch=5, epochs=6, milestones=[2], warmup_epochs=1)
        ref_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
        ref = SCHEDULERS.build(name, optimizer=ref_opt, steps_per_epoch=5, epochs=6, milestones=[2], warmup_epochs=1)
        for _ in range(12):
            opt.step(), sched.step(), ref_opt.step(), ref.step()
        apply_optim_hparams(opt, sched, OptimConfig(lr=0.05, momentum=0.5, weight_decay=1e-3), saved_lr=0.1)
        assert opt.param_groups[0]["weight_decay"] == 1e-3 and opt.param_groups[1]["weight_decay"] == 0.0
        assert all(g["momentum"] == 0.5 for g in opt.param_groups)
        for _ in range(10):
            assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * ref_opt.param_groups[0]["lr"]), name
            opt.step(), sched.step(), ref_opt.step(), ref.step()


# --- sweeps on a local Ray instance ---------------------------------------------------------

@pytest.mark.slow
def test_lr_sweep_with_asha_writes_results_best_yaml_and_curves(tmp_path):
    # One trial at a time, the strongest first, so that ASHA's rungs have something to cut.
    proc = ok(tune(["--config", DEMO, "--space", str(_space(tmp_path, [0.1, 0.05, 0.001, 0.0005])), "--name", "lr",
                    "--scheduler", "asha", "--max-concurrent", "1", "train.epochs=4", *TINY, "data.limit=600"],
                   tmp_path))
    sweep = tmp_path / "sweeps" / "lr"
    rows = results(sweep)
    assert sorted(float(r["optim.lr"]) for r in rows) == [0.0005, 0.001, 0.05, 0.1]
    assert {r["status"] for r in rows} <= {"done", "stopped"} and rows[0]["status"] == "done"
    assert any(r["status"] == "stopped" and int(r["epochs"]) < 4 for r in rows), "ASHA stopped no trial"
    for r in rows:  # each trial is a full run directory, TensorBoard included
        run = Path(r["run_dir"])
        assert run.parent == sweep / "runs" and list((run / "tb").rglob("events.out.tfevents.*"))
        epochs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()
                  if json.loads(x).get("kind") == "epoch"]
        assert len(epochs) == int(r["epochs"])
    spans = sorted(((Path(r["run_dir"]) / "config.yaml").stat().st_mtime,
                    (Path(r["run_dir"]) / "metrics.jsonl").stat().st_mtime) for r in rows)
    assert all(start >= end for (_, end), (start, _) in zip(spans, spans[1:])), "--max-concurrent 1 overlapped"
    assert (sweep / "compare.png").stat().st_size > 10_000 and "optim.lr" in proc.stdout
    best = rows[0]
    assert float(best["val_acc"]) == max(float(r["val_acc"]) for r in rows if r["status"] == "done")
    cfg = yaml.safe_load((sweep / "best.yaml").read_text())
    assert cfg["optim"]["lr"] == float(best["optim.lr"]) and cfg["run"]["dir"] is None
    assert cfg["train"]["resume"] == "none" and cfg["data"]["limit"] == 600
    # best.yaml retrains to the accuracy the sweep reported: same engine, seed and data, and one
    # thread as in a 1-CPU trial (a thread count changes float sums, which lr 0.1 amplifies).
    ok(train(["--config", str(sweep / "best.yaml"), f"run.dir={tmp_path / 'best'}"], env={"OMP_NUM_THREADS": "1"}))
    assert summary(tmp_path / "best")["test_acc"] == pytest.approx(float(best["test_acc"]), abs=0.01)


@pytest.mark.slow
def test_optimizer_space_runs_all_five_optimizers_and_early_stopping_ends_trials(tmp_path):
    # No val_acc can beat the last by 1.0: early stopping ends every trial after epoch 2 of 5,
    # and each trial reports that epoch's row with its test result.
    ok(tune(["--config", DEMO, "--space", "optimizer", "--name", "opt", "--scheduler", "fifo",
             "train.epochs=5", "train.early_stop_patience=1", "train.early_stop_min_delta=1.0", *TINY], tmp_path))
    rows = results(tmp_path / "sweeps" / "opt")
    for r in rows:
        s = summary(Path(r["run_dir"]))
        assert int(r["epochs"]) == 2 and int(r["stopped_early"]) == 2 and s["stopped_early"] == 2, r
        assert float(r["test_acc"]) == s["test_acc"]
    assert sorted((r["optim.name"], float(r["optim.momentum"] or 0)) for r in rows
                  if r["optim.name"] != "adam") == [("adagrad", 0.0), ("rmsprop", 0.0), ("sgd", 0.0), ("sgd", 0.9)]
    assert [r["optim.name"] for r in rows].count("adam") == 1 and len(rows) == 5
    assert all(r["status"] == "done" for r in rows)
    for r in rows:
        saved = yaml.safe_load((Path(r["run_dir"]) / "config.yaml").read_text())
        assert saved["optim"]["name"] == r["optim.name"] and saved["optim"]["lr"] == float(r["optim.lr"])


@pytest.mark.slow
def test_a_trial_that_raises_once_is_retried_from_its_checkpoint(tmp_path):
    # Each trial raises after update 8 (in epoch 2) on its first attempt only.
    ok(tune(["--config", DEMO, "--space", str(_space(tmp_path, [0.01, 0.05])), "--name", "retry",
             "--scheduler", "fifo", "--max-failures", "1", "train.epochs=3", *TINY], tmp_path,
            env={"TOOLKIT_FAULT_TRIAL_RAISE_AT_STEP": "8"}))
    rows = results(tmp_path / "sweeps" / "retry")
    assert len(rows) == 2 and all(r["status"] == "done" and r["epochs"] == "3" for r in rows)
    for r in rows:
        run = Path(r["run_dir"])
        s = summary(run)  # resumed at the end of epoch 1 (7 updates an epoch), not restarted
        assert s["steps"] == 21 and s["resumed_from"].endswith("checkpoints/step_7")
        errors = list((tmp_path / "sweeps" / "retry" / "tune" / r["trial"]).glob("error*.txt"))
        assert errors and "injected failure" in errors[0].read_text()


@pytest.mark.slow
def test_a_killed_driver_resumes_without_rerunning_finished_trials(tmp_path):
    args = ["--config", DEMO, "--space", str(_space(tmp_path, [0.01, 0.02, 0.05])), "--name", "kill",
            "--scheduler", "fifo", "--max-concurrent", "1", "train.epochs=3", *TINY]
    cmd = [sys.executable, "-m", "toolkit.tune", "--storage", str(tmp_path / "sweeps"), "--num-cpus", "2", *args]
    driver = subprocess.Popen(cmd, cwd=ROOT, env=child_env({"TOOLKIT_FAULT_STEP_SLEEP": "0.15"}),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    runs = tmp_path / "sweeps" / "kill" / "runs"
    deadline = time.time() + 300
    while time.time() < deadline:  # wait for one trial to finish and the next to have a checkpoint
        done = [p for p in runs.glob("*") if (p / "summary.json").is_file()]
        started = [p for p in runs.glob("*") if p not in done and list(p.glob("checkpoints/step_*"))]
        if done and started:
            break
        assert driver.poll() is None, "the sweep ended before it could be interrupted"
        time.sleep(0.1)
    else:
        pytest.fail("no trial finished in time")
    import psutil  # (a Ray dependency)

    family = psutil.Process(driver.pid).children(recursive=True)  # the local Ray instance, trials included
    os.killpg(driver.pid, signal.SIGKILL)
    for p in family:  # as if the machine went down: nothing of the first driver lives on
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    driver.wait()
    def files(run):  # RUN/.lock is taken and released by every look at a run
        return {f.name: f.stat().st_mtime_ns for f in run.rglob("*") if f.is_file() and f.name != ".lock"}

    finished = {p.name: files(p) for p in done}
    ok(tune(["--resume", "--name", "kill"], tmp_path))
    rows = results(tmp_path / "sweeps" / "kill")
    assert len(rows) == 3 and all(r["status"] == "done" for r in rows)
    for name, before in finished.items():  # untouched: not rerun
        assert files(runs / name) == before
    resumed = [r for r in rows if r["trial"] == started[0].name][0]
    assert summary(Path(resumed["run_dir"]))["resumed_from"] is not None


@pytest.mark.slow
def test_workers_per_trial_runs_each_trial_as_a_ddp_job(tmp_path):
    # One trial: what is checked is how a trial runs, the same for every trial of the sweep.
    ok(tune(["--config", DEMO, "--space", str(_space(tmp_path, [0.05])), "--name", "ddp",
             "--scheduler", "fifo", "--workers-per-trial", "2", "--max-concurrent", "1", "train.epochs=2",
             *TINY], tmp_path))
    rows = results(tmp_path / "sweeps" / "ddp")
    assert len(rows) == 1 and all(r["status"] == "done" for r in rows)
    for r in rows:
        s = summary(Path(r["run_dir"]))
        assert s["world_size"] == 2 and s["distributed_type"] == "MULTI_CPU"


@pytest.mark.slow
def test_pbt_sweep_finishes_and_exploits(tmp_path):
    space = tmp_path / "pbt.yaml"
    space.write_text("random:\n  optim.lr: {loguniform: [0.0005, 0.2]}\n")
    ok(tune(["--config", DEMO, "--space", str(space), "--name", "pbt", "--scheduler", "pbt", "--num-samples", "4",
             "--perturbation-interval", "1", "train.epochs=2", *TINY], tmp_path))
    rows = results(tmp_path / "sweeps" / "pbt")
    assert len(rows) == 4 and all(r["status"] == "done" and r["epochs"] == "2" for r in rows)
    exploited = [r for r in rows if summary(Path(r["run_dir"]))["resumed_from"]]
    assert exploited, "PBT never continued a trial from another's checkpoint"


def _space(tmp_path: Path, lrs) -> Path:
    path = tmp_path / "lrs.yaml"
    path.write_text(f"grid:\n  optim.lr: {list(lrs)}\n")
    return path


def test_check_only_validates_and_starts_nothing(tmp_path, capsys):
    import ray

    from toolkit.tune import main

    assert main(["--storage", str(tmp_path / "sweeps"), "--config", DEMO, "--space", "lr", "--check-only"]) == 0
    assert main(["--storage", str(tmp_path / "sweeps"), "--config", DEMO, "--space", "lr", "--metric", "f1",
                 "--check-only"]) == 2
    assert not ray.is_initialized() and not (tmp_path / "sweeps").exists()
