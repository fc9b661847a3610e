"""The SLURM templates on a real local 2-node cluster (slurm/dev/cluster.sh), gloo on the CPU.

The cluster needs slurm-wlm and munge (the script installs them as root through apt-get); where
that cannot happen, these tests skip with the reason."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from helpers import DEMO, ROOT, assert_same_weights, summary

CLUSTER = ROOT / "slurm" / "dev" / "cluster.sh"
TINY = ["data.limit=400", "train.epochs=3", "sched.milestones=[]", "log.plots=false", "log.progress=plain",
        "train.preempt_check_steps=1"]

# One SLURM cluster per module. Under pytest-xdist this module and test_tune (local Ray) share one
# worker: they never run beside each other (a SLURM test once lost its controller while they did).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("clusters")]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "TOOLKIT_SLURM_DIR": str(state / "cluster"), "TOOLKIT_SLURM_PORT": "17300"}
    up = subprocess.run(["bash", str(CLUSTER), "up", "--nodes", "2"], env=env, capture_output=True, text=True,
                        timeout=600)
    if up.returncode != 0:
        pytest.skip(f"no local SLURM cluster: {(up.stderr or up.stdout).strip().splitlines()[-1:]}")
    env["SLURM_CONF"] = str(state / "cluster" / "slurm.conf")
    env.pop("TOOLKIT_FAULT_STEP_SLEEP", None)
    yield env, state
    subprocess.run(["bash", str(CLUSTER), "down"], env=env, capture_output=True, text=True, timeout=120)


def sbatch(env, args, extra_env=None) -> str:
    """`sbatch ARGS` as the README writes it: no --cpus-per-task (the local nodes have 1 CPU each;
    a template that asked for more would never start, see wait_done)."""
    proc = subprocess.run(["sbatch", "--parsable", *args], cwd=ROOT,
                          env={**env, **(extra_env or {})}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def job(env, jid) -> dict:
    out = subprocess.run(["scontrol", "show", "job", jid, "-o"], env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
# PENDING for one of these reasons: the request exceeds what the partition's nodes have (a template's
# --cpus-per-task=4 on 1-CPU nodes was one), so the job would wait for ever
NEVER_STARTS = ("PartitionConfig", "PartitionNodeLimit", "BadConstraints")


def wait_done(env, jid, timeout=300) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job(env, jid)
        if info.get("JobState") in ENDED:
            return info
        if info.get("JobState") == "PENDING" and info.get("Reason") in NEVER_STARTS:
            subprocess.run(["scancel", jid], env=env)
            pytest.fail(f"job {jid} can never start here: PENDING, Reason={info['Reason']} "
                        f"(NumCPUs={info.get('NumCPUs')}, MinCPUsNode={info.get('MinCPUsNode')})")
        time.sleep(0.25)
    subprocess.run(["scancel", jid], env=env)
    pytest.fail(f"job {jid} did not end in {timeout} s: {job(env, jid).get('JobState')}")


def start_requeued_now(env, jid, timeout=120) -> None:
    """Once job JID has requeued itself, let it start again at once. SLURM holds a requeued job
    PENDING (Reason=BeginTime) for AuthInfo's cred_expire + 1 s, 121 s by default, so that its old
    launch credentials die first; on this otherwise idle cluster that is most of the test's time.
    If the job ends instead of requeueing, return and let the caller's checks say what happened."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job(env, jid)
        if info.get("JobState") == "PENDING" and int(info.get("Restarts", 0)) >= 1:
            # slurmd takes a credential dated no later than the old run's revocation (whole
            # seconds) for a revoked one: start the new run a second after we saw it requeued
            time.sleep(1)
            subprocess.run(["scontrol", "update", f"JobId={jid}", "StartTime=now"], env=env, check=True)
            return
        if info.get("JobState") in ENDED:
            return
        time.sleep(0.25)


def log(jid) -> str:
    return (ROOT / f"toolkit-train-{jid}.out").read_text() if (ROOT / f"toolkit-train-{jid}.out").exists() else ""


@pytest.fixture
def logs():
    made = []
    yield made
    for jid in made:  # the job logs land in the submit directory, as a user's would
        for p in ROOT.glob(f"toolkit-*-{jid}.out"):
            p.unlink()


def test_two_nodes_train_with_world_size_2(cluster, logs, tmp_path):
    env, _ = cluster
    run = tmp_path / "run"
    jid = sbatch(env, ["-N2", "slurm/train.sh", DEMO, *TINY, f"run.dir={run}"])
    logs.append(jid)
    info = wait_done(env, jid)
    text = log(jid)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-3000:]
    assert "toolkit: 2 machine(s), world size 2" in text and "2 process(es), MULTI_CPU" in text
    assert "1 CPU(s) per node" in text  # what SLURM gave each node, not a fixed request
    s = summary(run)
    assert s["world_size"] == 2 and s["epochs"] == 3
    ref = subprocess.run([str(ROOT / ".venv/bin/python"), "-m", "toolkit.train", "--config", DEMO, *TINY,
                          f"run.dir={tmp_path / 'one'}"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-2000:]
    assert abs(s["test_acc"] - summary(tmp_path / "one")["test_acc"]) <= 0.01


def test_usr1_checkpoints_requeues_and_resumes_to_the_same_weights(cluster, logs, tmp_path):
    env, _ = cluster
    ref = tmp_path / "ref"
    jid = sbatch(env, ["-N2", "slurm/train.sh", DEMO, *TINY, f"run.dir={ref}"])
    logs.append(jid)
    assert wait_done(env, jid)["JobState"] == "COMPLETED", log(jid)[-3000:]

    run = tmp_path / "run"
    jid = sbatch(env, ["-N2", "slurm/train.sh", DEMO, *TINY, f"run.dir={run}"], {"TOOLKIT_FAULT_STEP_SLEEP": "0.3"})
    logs.append(jid)
    deadline = time.time() + 180
    while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().count('"kind": "epoch"') >= 1):
        assert time.time() < deadline, log(jid)[-3000:]
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", jid], env=env, check=True)
    start_requeued_now(env, jid)
    info = wait_done(env, jid, timeout=400)
    text = log(jid)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) == 1, text[-4000:]
    assert "SIGUSR1: checkpoint and requeue" in text and f"requeueing job {jid}" in text
    assert "preempted: stopped on a preemption request" in text and "resumed from" in text
    assert summary(run)["resumed_from"] is not None
    assert_same_weights(run / "model.safetensors", ref / "model.safetensors")


def test_two_node_extraction_equals_one_process(cluster, logs, tmp_path):
    import torch

    from toolkit.features import load_features

    env, _ = cluster
    args = ["data.name=digits", "data.split=test", "model.name=lenet", "extract.shard_size=40"]
    extract = ROOT / "configs" / "extract_digits.yaml"
    jid = sbatch(env, ["-N2", "slurm/extract.sh", str(extract), *args, f"run.dir={tmp_path / 'two'}"])
    logs.append(jid)
    info = wait_done(env, jid)
    text = (ROOT / f"toolkit-extract-{jid}.out").read_text()
    assert info["JobState"] == "COMPLETED", text[-3000:]
    assert "world size 2" in text and "2 process(es)" in text
    one = subprocess.run([str(ROOT / ".venv/bin/python"), "-m", "toolkit.extract", "--config", str(extract), *args,
                          f"run.dir={tmp_path / 'one'}"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    a, b = load_features(tmp_path / "one" / "features"), load_features(tmp_path / "two" / "features")
    assert torch.equal(a.index, b.index) and torch.equal(a.labels, b.labels) and len(a.index) == 360
    assert torch.allclose(a.features, b.features, atol=1e-6)


@pytest.mark.parametrize("args,extra_env,needle", [
    (["slurm/train.sh", "configs/nope.yaml"], {}, "error: --config: no such file: configs/nope.yaml"),
    (["slurm/train.sh", DEMO, "optim.lrr=1"], {}, "error: config: optim.lrr"),
    (["slurm/train.sh", DEMO], {"GPUS_PER_NODE": "1"}, "error: GPUS_PER_NODE=1 but"),
    (["slurm/extract.sh", "configs/extract_digits.yaml", "extract.layerr=x"], {}, "extract.layerr"),
    # the model's weights are loaded before any node starts, not by every rank after they did
    (["slurm/extract.sh", "configs/extract_digits.yaml", "model.name=lenet", "model.pretrained=no/such.safetensors"],
     {}, "model.pretrained: state-dict file 'no/such.safetensors' does not exist"),
])
def test_bad_input_fails_fast_without_requeue(cluster, logs, args, extra_env, needle):
    env, _ = cluster
    jid = sbatch(env, ["-N1", *args], extra_env)
    logs.append(jid)
    info = wait_done(env, jid, timeout=120)
    text = "".join(p.read_text() for p in ROOT.glob(f"toolkit-*-{jid}.out"))
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0" and info["Restarts"] == "0", text[-2000:]
    assert needle in text, text[-2000:]
    assert "world size" not in text and "Traceback" not in text, text[-2000:]  # no node was started


def test_extract_check_only_loads_the_weights_and_creates_nothing(tmp_path, capsys):
    """What slurm/extract.sh runs before any node starts (no cluster needed): the model's weights
    read and loaded, one line and exit 2 when they are missing or unusable, nothing written."""
    import json

    from safetensors.torch import save_file

    from toolkit.extract import main
    from toolkit.models import MODELS

    run = tmp_path / "run"  # a finished digits training run, as model.run sees one
    run.mkdir()
    (run / "config.yaml").write_text(Path(DEMO).read_text())
    (run / "data.json").write_text(json.dumps({"image_size": 32, "mean": [0.2] * 3, "std": [0.3] * 3}))
    save_file(MODELS.build("lenet", num_classes=10).state_dict(), str(run / "model.safetensors"))
    extract = ["--check-only", "--config", str(ROOT / "configs" / "extract_digits.yaml")]

    assert main([*extract, f"model.run={run}"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(run / "features")
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "data.json", "model.safetensors"]

    (tmp_path / "other.safetensors").write_bytes((run / "model.safetensors").read_bytes())
    save_file(MODELS.build("base_cnn", num_classes=10).state_dict(), str(run / "model.safetensors"))
    cases = [([f"model.run={run}"], "does not fit lenet"),  # another model's weights
             ([f"model.run={tmp_path / 'other.safetensors'}"], "is not a finished training run"),
             (["model.name=lenet", f"model.pretrained={tmp_path / 'no.safetensors'}"], "does not exist"),
             (["model.name=lenet", f"model.pretrained={run / 'data.json'}"], "model.pretrained")]  # not weights
    for args, needle in cases:
        assert main([*extract, *args, f"run.dir={tmp_path / 'out'}"]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], (args, err)
    (run / "model.safetensors").unlink()
    assert main([*extract, f"model.run={run}"]) == 2  # the weights file gone
    assert "needs config.yaml and model.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (run / "features").exists()


# ------------------------------------------------------------------------------------------
# slurm/sweep.sh: a Ray cluster inside the allocation, then toolkit.tune against it

SWEEP = ["--space", "lr", "--num-samples", "2", "--scheduler", "fifo", "--cpus-per-trial", "1", "--config", DEMO]
SWEEP_TINY = ["data.limit=300", "sched.milestones=[]", "log.plots=false", "log.progress=plain"]


def sweep_log(jid) -> str:
    path = ROOT / f"toolkit-sweep-{jid}.out"
    return path.read_text() if path.exists() else ""


def ray_left(jid) -> list:
    """What is left of job JID's Ray on this host: processes that carry the mark sweep.sh exports to
    everything it starts (TOOLKIT_SWEEP_JOB), or whose command line names the job's Ray temp dirs,
    and those temp dirs (environ is readable for the user's own processes: the jobs run as that user)."""
    left = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"TOOLKIT_SWEEP_JOB={jid}".encode() in env or f"/ray-{jid}-" in cmd:
            left.append(f"{proc.name}: {cmd[:150]}")
    return left + [str(p) for p in Path("/tmp").glob(f"ray-{jid}-*")]


def assert_no_ray_left(jid, timeout=20):
    deadline = time.time() + timeout  # the job has ended; Ray's workers may take a moment to see their raylet go
    while (left := ray_left(jid)) and time.time() < deadline:
        time.sleep(0.5)
    assert not left, left


def test_two_node_sweep_runs_trials_on_both_nodes_and_leaves_no_ray_behind(cluster, logs, tmp_path):
    env, _ = cluster
    jid = sbatch(env, ["-N2", "slurm/sweep.sh", *SWEEP, "--storage", str(tmp_path / "sweeps"), *SWEEP_TINY,
                       "train.epochs=1"])
    logs.append(jid)
    info = wait_done(env, jid, timeout=240)
    text = sweep_log(jid)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-4000:]
    assert "2 node(s), 2 CPU(s), 0 GPU(s)" in text and "Ray on" not in text, text[-4000:]
    with open(tmp_path / "sweeps" / f"sweep-{jid}" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(r["status"] == "done" and r["epochs"] == "1" for r in rows), rows
    # one CPU per node and per trial: the two trials ran at once, one on each Ray node
    assert len({r["node"] for r in rows}) == 2 and all(r["node"] for r in rows), rows
    assert_no_ray_left(jid)


def test_a_cancelled_sweep_stops_ray_on_every_node_and_resumes(cluster, logs, tmp_path):
    env, _ = cluster
    storage = tmp_path / "sweeps"
    jid = sbatch(env, ["-N2", "slurm/sweep.sh", *SWEEP, "--storage", str(storage), *SWEEP_TINY, "train.epochs=3"],
                 {"TOOLKIT_FAULT_STEP_SLEEP": "0.3"})
    logs.append(jid)
    runs = storage / f"sweep-{jid}" / "runs"
    deadline = time.time() + 180
    while len(list(runs.glob("*/trial.json"))) < 2:  # both trials running, one per node
        state = job(env, jid).get("JobState")
        assert time.time() < deadline and state in ("PENDING", "RUNNING"), sweep_log(jid)[-3000:]
        time.sleep(0.5)
    subprocess.run(["scancel", jid], env=env, check=True)
    info = wait_done(env, jid, timeout=120)
    assert info["JobState"] == "CANCELLED", sweep_log(jid)[-3000:]
    assert_no_ray_left(jid)

    again = sbatch(env, ["-N2", "slurm/sweep.sh", "--resume", "--name", f"sweep-{jid}", "--storage", str(storage)])
    logs.append(again)
    info = wait_done(env, again, timeout=240)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", sweep_log(again)[-4000:]
    with open(storage / f"sweep-{jid}" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(r["status"] == "done" and r["epochs"] == "3" for r in rows), rows
    assert_no_ray_left(again)


@pytest.mark.parametrize("args,needle", [
    (["--space", "nope", "--config", DEMO], "error: --space: unknown space 'nope'; choose one of: "),
    (["--space", "lr", "--config", DEMO, "optim.lrr=0.1"], "error: config: optim.lrr"),
    (["--space", "lr", "--address", "auto"], "error: --address: slurm/sweep.sh sets up the Ray cluster itself"),
    ([], "error: usage: sbatch [-N NODES] slurm/sweep.sh --space NAME"),
])
def test_sweep_bad_input_fails_fast_in_one_line_without_requeue(cluster, logs, args, needle):
    env, _ = cluster
    jid = sbatch(env, ["-N2", "slurm/sweep.sh", *args])
    logs.append(jid)
    info = wait_done(env, jid, timeout=120)
    text = sweep_log(jid)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0" and info["Restarts"] == "0", text
    assert text.strip().startswith(needle) and len(text.strip().splitlines()) == 1, text
    assert not ray_left(jid)
