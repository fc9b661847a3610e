"""toolkit.rundir: atomic writes, checksums, directory swaps, the run lock, the writable check."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from toolkit import rundir
from toolkit.errors import ConfigError
from toolkit.rundir import (RunDir, ensure_writable, replace_dir, run_lock, sha256, temp_path, write_atomic,
                            write_atomic_bytes, write_atomic_json, write_atomic_text)

ROOT = Path(__file__).resolve().parents[1]


def test_run_dir_names(tmp_path):
    run = RunDir(tmp_path)
    assert run.metrics == tmp_path / "metrics.jsonl"
    assert run.summary == tmp_path / "summary.json"
    assert run.config == tmp_path / "config.yaml"
    assert run.checkpoints == tmp_path / "checkpoints"
    assert run.confusion("test") == tmp_path / "confusion_test.csv"
    assert temp_path(run.summary) == tmp_path / ".summary.json.tmp"


@pytest.mark.parametrize("existed", [True, False])
def test_write_atomic_failure_leaves_old_file_and_no_temp(tmp_path, existed):
    target = tmp_path / "summary.json"
    if existed:
        target.write_text("old\n")

    def half_then_fail(tmp: Path) -> None:
        with open(tmp, "w") as f:
            f.write('{"test_acc": 0.')  # half a file, then the disk fills
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomic(target, half_then_fail)
    assert [p.name for p in tmp_path.iterdir()] == (["summary.json"] if existed else [])
    if existed:
        assert target.read_text() == "old\n"


def test_round_trips(tmp_path):
    assert write_atomic_text(tmp_path / "a.txt", "héllo\n").read_text() == "héllo\n"
    assert write_atomic_bytes(tmp_path / "b.bin", b"\x00\xff" * 3).read_bytes() == b"\x00\xff" * 3
    data = {"test_acc": 0.5, "classes": ["a", "b"], "nested": {"n": 1}}
    path = write_atomic_json(tmp_path / "c.json", data)
    assert json.loads(path.read_text()) == data
    assert path.read_text() == json.dumps(data, indent=1) + "\n"
    assert write_atomic_json(tmp_path / "d.json", data, indent=None).read_text() == json.dumps(data) + "\n"
    write_atomic_text(tmp_path / "a.txt", "replaced")  # over an existing file
    assert (tmp_path / "a.txt").read_text() == "replaced"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin", "c.json", "d.json"]


def test_sha256(tmp_path):
    path = write_atomic_bytes(tmp_path / "x", b"abc")
    assert sha256(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    big = write_atomic_bytes(tmp_path / "big", b"z" * (3 << 20))  # more than one 1 MiB chunk
    assert sha256(big) == hashlib.sha256(b"z" * (3 << 20)).hexdigest()


def test_replace_dir(tmp_path):
    final, old = tmp_path / "out", tmp_path / ".old-out"
    for content in ("first", "second"):  # into nothing, then over an existing directory
        tmp = tmp_path / ".tmp-out"
        tmp.mkdir()
        (tmp / "f").write_text(content)
        replace_dir(tmp, final, old)
        assert (final / "f").read_text() == content
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_run_lock_refuses_a_second_holder_in_this_process(tmp_path):
    # flock belongs to the open file description: a second os.open of the same file conflicts
    with run_lock(tmp_path):
        assert (tmp_path / rundir.LOCK).read_text().strip().isdigit()
        with pytest.raises(ConfigError, match="is in use by another process") as e:
            with run_lock(tmp_path):
                pass
        assert "\n" not in str(e.value)
    with run_lock(tmp_path):  # released on exit
        pass


def test_run_lock_refuses_while_another_process_holds_it(tmp_path):
    code = ("import sys; from pathlib import Path; from toolkit.rundir import run_lock\n"
            "with run_lock(Path(sys.argv[1])):\n    print('held', flush=True); sys.stdin.read()\n")
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=rf"\(pid {child.pid}\)"):
            with run_lock(tmp_path):
                pass
    finally:
        child.stdin.close()  # the child leaves its `with` and exits
        assert child.wait(timeout=30) == 0
    with run_lock(tmp_path, wait_s=5):
        pass


def test_a_killed_holders_forked_children_do_not_keep_the_lock(tmp_path):
    # A run killed while its DataLoader workers (forks) live on for a few seconds: the resume that
    # follows at once must find the run free.
    code = ("import os, sys, time; from pathlib import Path; from toolkit.rundir import run_lock\n"
            "with run_lock(Path(sys.argv[1])):\n"
            "    if os.fork() == 0:\n        os.write(1, b'forked\\n'); time.sleep(30); os._exit(0)\n"
            "    os.write(1, b'held\\n'); sys.stdin.read()\n")  # one write each: the lines never interleave
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
    try:
        # both running: the forked child has run its at-fork handlers by the time it prints
        assert {child.stdout.readline().strip(), child.stdout.readline().strip()} == {"held", "forked"}
        child.kill()  # the holder dies; its forked child sleeps on
        child.wait(timeout=30)
        with run_lock(tmp_path):
            pass
    finally:
        os.killpg(child.pid, signal.SIGKILL)


def test_ensure_writable(tmp_path):
    assert ensure_writable(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert list((tmp_path / "a" / "b").iterdir()) == []  # the probe file is gone
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError) as e:
        ensure_writable(blocker / "run")  # works as root too, unlike a read-only folder
    msg = str(e.value)
    assert msg.startswith(f"config: run.dir: cannot write to {blocker / 'run'}: ")
    assert "\n" not in msg and "Errno" not in msg
