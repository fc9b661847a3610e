"""The suite's fork server (tests/helpers/forkserver.py) starts a module as `python -m` would.

    python -m pytest tests/test_forkserver.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow  # it starts a server that imports torch (seconds); what it serves is the slow tests

from helpers import child_env, run_module
from helpers import forkserver

PROBE = textwrap.dedent("""
    import atexit, json, os, sys, threading, time
    from pathlib import Path
    if sys.argv[1] == "sleep":
        time.sleep(60)
    atexit.register(lambda: Path("atexit.txt").write_text("ran"))
    threading.Thread(target=lambda: (time.sleep(0.3), Path("thread.txt").write_text("joined"))).start()
    print(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "probe": os.environ.get("PROBE"),
                      "main": __name__, "pid": os.getpid(), "path0": sys.path[0],
                      "gone": "REMOVED_BY_TEST" in os.environ, "torch": "torch" in sys.modules}))
    print("to stderr", file=sys.stderr)
    sys.exit(int(sys.argv[2]))
""")


@pytest.fixture
def probe_dir(tmp_path):
    (tmp_path / "probe.py").write_text(PROBE)
    return tmp_path


def test_a_forked_run_has_its_own_argv_cwd_env_output_exit_code_and_exit(probe_dir, monkeypatch):
    import json

    monkeypatch.setenv("REMOVED_BY_TEST", "1")
    env = child_env({"PROBE": "yes"})
    del env["REMOVED_BY_TEST"]
    assert forkserver.forkable(env)
    proc = forkserver.run_forked("probe", ["run", "3", "a b"], env, probe_dir, timeout=60)
    seen = json.loads(proc.stdout)
    assert proc.returncode == 3 and proc.stderr == "to stderr\n"
    assert seen == {"argv": ["run", "3", "a b"], "cwd": str(probe_dir), "probe": "yes", "main": "__main__",
                    "pid": seen["pid"], "path0": str(probe_dir), "gone": False,
                    "torch": True}  # imported by the server, before the fork
    assert seen["pid"] != os.getpid()
    assert (probe_dir / "atexit.txt").read_text() == "ran"       # the interpreter's exit: atexit handlers
    assert (probe_dir / "thread.txt").read_text() == "joined"    # and non-daemon threads joined first


def test_a_forked_run_past_its_timeout_is_killed_as_subprocess_run_does(probe_dir):
    with pytest.raises(subprocess.TimeoutExpired):
        forkserver.run_forked("probe", ["sleep", "0"], child_env(), probe_dir, timeout=1)
    proc = forkserver.run_forked("probe", ["run", "0"], child_env(), probe_dir, timeout=60)  # still serving
    assert proc.returncode == 0


def test_an_environment_that_imports_read_is_started_as_a_new_interpreter(probe_dir):
    import json

    assert not forkserver.forkable(child_env({"OMP_NUM_THREADS": "1"}))
    assert not forkserver.forkable(child_env({"PYTHONPATH": "/elsewhere"}))
    assert forkserver.forkable(child_env({"TOOLKIT_FAULT_KILL_AT_STEP": "3"}))  # read at run time
    fresh = run_module("probe", ["run", "0"], env={"OMP_NUM_THREADS": "1"}, cwd=probe_dir)
    forked = run_module("probe", ["run", "0"], cwd=probe_dir)
    assert fresh.returncode == forked.returncode == 0
    assert json.loads(fresh.stdout)["torch"] is False and json.loads(forked.stdout)["torch"] is True


def test_an_uncaught_exception_prints_its_traceback_and_exits_1(tmp_path):
    (tmp_path / "boom.py").write_text("raise ValueError('boom')\n")
    proc = forkserver.run_forked("boom", [], child_env(), tmp_path, timeout=60)
    assert proc.returncode == 1 and "ValueError: boom" in proc.stderr and "Traceback" in proc.stderr
    plain = subprocess.run([sys.executable, "-m", "boom"], cwd=tmp_path, capture_output=True, text=True)
    assert plain.returncode == proc.returncode
