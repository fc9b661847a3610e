"""Stop requests: SIGUSR1, RUN/.preempt and SIGTERM make a run save and stop; resume is exact."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import DEMO, ROOT, assert_same_weights, child_env, free_port, ok, summary, train

ARGS = ["--config", DEMO, "data.limit=400", "train.epochs=3", "sched.milestones=[]", "log.plots=false",
        "train.preempt_check_steps=2", "train.resume=auto"]


def start(cmd, run: Path, env=None) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=child_env({"TOOLKIT_FAULT_STEP_SLEEP": "0.2", **(env or {})}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_steps(run: Path, proc: subprocess.Popen, n: int = 3) -> None:
    deadline = time.time() + 120
    while time.time() < deadline:
        path = run / "metrics.jsonl"
        if path.is_file() and path.read_text().count('"kind": "train"') >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    pytest.fail("the run made no progress")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ref") / "run"
    ok(train([*ARGS, "log.every_n_steps=1", f"run.dir={run}"]))
    return run


@pytest.mark.slow
@pytest.mark.parametrize("how,code", [("usr1", 4), ("file", 4), ("term", 143)])
def test_a_stop_request_saves_exits_and_resumes_exactly(tmp_path, reference, how, code):
    run = tmp_path / "run"
    proc = start([sys.executable, "-m", "toolkit.train", *ARGS, "log.every_n_steps=1", f"run.dir={run}"], run)
    wait_for_steps(run, proc)
    if how == "file":
        (run / ".preempt").write_text("")
    else:
        proc.send_signal(signal.SIGUSR1 if how == "usr1" else signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("preempted: stopped on ") and "train.resume=auto" in line, err[-2000:]
    assert not (run / ".preempt").exists() and not (run / "summary.json").exists()
    ok(train([*ARGS, "log.every_n_steps=1", f"run.dir={run}"]))
    assert summary(run)["resumed_from"] is not None
    assert_same_weights(run / "model.safetensors", reference / "model.safetensors")


@pytest.mark.slow
def test_two_ranks_stop_after_the_same_step_on_a_preempt_file(tmp_path, reference):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "launch/cpu_ddp.yaml",
           "--main_process_port", str(free_port()), "toolkit/train.py", *ARGS, "log.every_n_steps=1",
           f"run.dir={run}"]
    proc = start(cmd, run)
    wait_for_steps(run, proc)
    (run / ".preempt").write_text("")
    out, err = proc.communicate(timeout=180)
    assert proc.returncode != 0 and "preempted: stopped on a preemption request" in err, err[-3000:]
    ok(subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300))
    s = summary(run)
    assert s["resumed_from"] is not None and s["world_size"] == 2
