"""Ctrl-C, a full disk, and what a DDP run exposes on the network (issue 17, items 3, 4 and 10).

    pytest -p no:xdist tests/test_interrupts.py
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import (DEMO, ROOT, assert_same_weights, child_env, free_port, metrics, ok, summary, train)
from toolkit import checkpoint
from toolkit.errors import DiskFullError, disk_full
from toolkit.rundir import append_text, write_atomic_text

ARGS = ["--config", DEMO, "data.limit=400", "train.epochs=3", "sched.milestones=[]", "log.plots=false",
        "train.preempt_check_steps=2", "train.resume=auto", "log.every_n_steps=1"]


def _sigint_as_in_a_terminal() -> None:
    # A test runner started in the background of a non-interactive shell (CI, `cmd &`) ignores
    # SIGINT, and children inherit that; the toolkit then (rightly) leaves it ignored. The user
    # at a terminal has it at its default: give the child that.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(cmd, env=None) -> subprocess.Popen:
    """A slowed-down run (0.2 s a step) to interrupt, with SIGINT at its default as in a terminal."""
    return subprocess.Popen(cmd, cwd=ROOT, env=child_env({"TOOLKIT_FAULT_STEP_SLEEP": "0.2", **(env or {})}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_sigint_as_in_a_terminal)


def wait_for(cond, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    pytest.fail(f"the run never got to {what}")


def train_rows(run: Path) -> int:
    path = run / "metrics.jsonl"
    return path.read_text().count('"kind": "train"') if path.is_file() else 0


def leftovers(run: Path):
    """Temp files and half-written checkpoints anywhere in the run directory."""
    return sorted(str(p.relative_to(run)) for p in run.rglob("*")
                  if p.name.startswith((".tmp-", ".old-")) or p.name.endswith(".tmp"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted-then-resumed run must end equal to."""
    run = tmp_path_factory.mktemp("ref") / "run"
    ok(train([*ARGS, f"run.dir={run}"]))
    return run


# ------------------------------------------------------------------------------------------
# 3. Ctrl-C


@pytest.mark.slow
def test_first_ctrl_c_saves_exits_130_and_resumes_exactly(tmp_path, reference):
    run = tmp_path / "run"
    proc = start([sys.executable, "-m", "toolkit.train", *ARGS, f"run.dir={run}"])
    wait_for(lambda: train_rows(run) >= 3, proc, "its third step")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("interrupted: stopped on Ctrl-C after saving ") and "train.resume=auto" in line, err[-2000:]
    assert "Traceback" not in err
    saved, _ = checkpoint.find_resumable(run / "checkpoints")
    assert saved is not None and checkpoint.read_state(saved)["batch"] > 0  # mid-epoch: the epoch is kept
    assert not (run / "summary.json").exists()
    ok(train([*ARGS, f"run.dir={run}"]))
    assert summary(run)["resumed_from"] is not None
    assert_same_weights(run / "model.safetensors", reference / "model.safetensors")


@pytest.mark.slow
def test_second_ctrl_c_stops_at_once(tmp_path):
    """The second Ctrl-C lands before the first one's checkpoint is taken (during a slow step):
    the run ends at once, with the one line of an interrupt."""
    run = tmp_path / "run"
    proc = start([sys.executable, "-m", "toolkit.train", *ARGS, "train.preempt_check_steps=1000",
                  f"run.dir={run}"], env={"TOOLKIT_FAULT_STEP_SLEEP": "1"})
    wait_for(lambda: train_rows(run) >= 1, proc, "its first step")
    time.sleep(0.2)  # now inside step 1's 1 s sleep, after its stop check
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)  # still inside it: the first request is pending, nothing saved yet
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == "error: interrupted", err[-2000:]
    assert "Traceback" not in err
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())


# ------------------------------------------------------------------------------------------
# 4. A full disk


def test_disk_full_recognises_what_each_writer_raises(tmp_path, monkeypatch):
    # Python's own writes: errno.
    assert disk_full(OSError(errno.ENOSPC, "No space left on device"), tmp_path / "x").reason == \
        "no space left on device"
    # safetensors (Rust): the message.
    rust = Exception("Error while serializing: I/O error: No space left on device (os error 28)")
    assert str(disk_full(rust, tmp_path / "m.safetensors")) == f"{tmp_path / 'm.safetensors'}: no space left on device"
    # torch.save (C++): no errno and no word about space; a nearly full filesystem decides.
    cxx = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    monkeypatch.setattr("toolkit.errors.free_bytes", lambda path: 4096)
    assert disk_full(cxx, tmp_path / "optimizer.bin") is not None
    monkeypatch.setattr("toolkit.errors.free_bytes", lambda path: 10 << 30)
    assert disk_full(cxx, tmp_path / "optimizer.bin") is None
    assert disk_full(OSError(errno.EACCES, "Permission denied"), tmp_path) is None


def test_atomic_writes_on_a_full_disk_leave_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLKIT_FAULT_NO_SPACE", "summary.json")
    (tmp_path / "summary.json").write_text("old\n")
    with pytest.raises(DiskFullError, match="summary.json: no space left on device"):
        write_atomic_text(tmp_path / "summary.json", "new\n")
    assert (tmp_path / "summary.json").read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no .summary.json.tmp


def test_an_append_cut_short_leaves_no_torn_line(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    append_text(path, '{"a": 1}\n')
    real_write = os.write

    def half_then_full(fd, data):  # what a filling disk does: a short write, then ENOSPC
        if len(data) > 4:
            return real_write(fd, bytes(data[:4]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(DiskFullError, match="metrics.jsonl: no space left on device"):
        append_text(path, '{"b": 2}\n')
    monkeypatch.undo()
    assert path.read_text() == '{"a": 1}\n'


@pytest.mark.slow
@pytest.mark.parametrize("target", ["checkpoints/step_8", "metrics.jsonl#10", "summary.json"])
def test_a_full_disk_is_one_line_and_resume_continues_exactly(tmp_path, reference, target):
    run = tmp_path / "run"
    args = [*ARGS, "train.checkpoint_every_steps=4", f"run.dir={run}"]
    proc = train(args, env={"TOOLKIT_FAULT_NO_SPACE": target})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    name = target.partition("#")[0]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {run / name}: no space left on device"), proc.stderr[-2000:]
    assert leftovers(run) == []
    kept = checkpoint.list_checkpoints(run / "checkpoints")
    assert kept and all(checkpoint.verify(p) is None for p in kept)  # earlier checkpoints intact
    ok(train(args))  # space freed (the fault is gone)
    assert summary(run)["resumed_from"] is not None
    assert_same_weights(run / "model.safetensors", reference / "model.safetensors")
    assert [r["step"] for r in metrics(run) if r["kind"] == "train"] == \
        [r["step"] for r in metrics(reference) if r["kind"] == "train"]


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.slow
def test_a_really_full_disk_mid_checkpoint(tmp_path, reference):
    """A real full filesystem (a small tmpfs, where the suite runs as root): the checkpoint's
    model file still fits, torch.save's optimizer file does not, and torch says only
    "unexpected pos": the one-line error must still say the disk is full."""
    disk = tmp_path / "disk"
    if not _tmpfs(disk, "8m"):
        pytest.skip("needs root and mount(8) for a small tmpfs")
    try:
        run = disk / "run"
        args = [*ARGS, "train.checkpoint_every_steps=4", "log.tensorboard=false", f"run.dir={run}"]
        proc = start([sys.executable, "-m", "toolkit.train", *args])
        wait_for(lambda: (run / "checkpoints" / "step_4" / checkpoint.MARKER).is_file(), proc, "its first checkpoint")
        free = shutil.disk_usage(disk).free
        ballast = disk / "ballast"
        with open(ballast, "wb") as f:  # leave room for metrics rows and one model file, not a checkpoint
            f.write(b"\0" * (free - (320 << 10)))
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 1, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        line = err.strip().splitlines()[-1]
        assert line.startswith("error: ") and "no space left on device" in line and str(run) in line, err[-2000:]
        assert leftovers(run) == []
        assert checkpoint.verify(run / "checkpoints" / "step_4") is None
        ballast.unlink()  # space freed
        ok(train(args))
        assert_same_weights(run / "model.safetensors", reference / "model.safetensors")
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


# ------------------------------------------------------------------------------------------
# 10. What a single-node DDP run listens on


def _listening(pids):
    import psutil

    found = []
    for pid in pids:
        try:
            for c in psutil.Process(pid).net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    found.append((pid, c.laddr.ip, c.laddr.port))
        except psutil.Error:
            continue
    return found


@pytest.mark.slow
def test_a_single_node_ddp_run_listens_on_loopback_only(tmp_path):
    """launch/cpu_ddp.yaml picks the toolkit-loopback rendezvous (toolkit/rendezvous.py): torchrun's
    store on 127.0.0.1, and GLOO_SOCKET_IFNAME=lo for the ranks. With torchrun's own static
    rendezvous the agent's store listens on '::' and this fails."""
    psutil = pytest.importorskip("psutil")
    run = tmp_path / "run"
    proc = start([sys.executable, "-m", "accelerate.commands.launch", "--config_file", "launch/cpu_ddp.yaml",
                  "--main_process_port", str(free_port()), "toolkit/train.py", *ARGS, f"run.dir={run}"])
    try:
        wait_for(lambda: train_rows(run) >= 2, proc, "training")  # every rank is up and connected
        tree = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
        sockets = _listening(tree)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    assert sockets, "found no listening socket: the test no longer sees the run's sockets"
    assert any(pid == proc.pid for pid, _, _ in sockets), f"the launcher's rendezvous store is not among {sockets}"
    exposed = [s for s in sockets if not (s[1].startswith("127.") or s[1] == "::1")]
    assert not exposed, f"listening beyond loopback: {exposed}"
