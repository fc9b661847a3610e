"""Start the toolkit's CLIs for the tests without paying for `import torch` every time.

    from helpers.forkserver import run_forked
    proc = run_forked("toolkit.train", ["--config", DEMO, ...], env, cwd, timeout)  # a CompletedProcess

Most of a short CLI run in this suite is start-up: a new interpreter imports torch, Accelerate,
the engine and matplotlib (~2 s of CPU on the 2-core CI machine, for each of the hundreds of
runs the suite makes). A fork server imports them once; each run is a fork of it: its own process
and pid, its own environment, working directory, argv and output files, started as
`python -m MODULE` starts it (runpy, `__name__ == "__main__"`) and ended by the interpreter's
normal exit (atexit handlers, thread joins), so the CLI under test is the real one from its
`__main__` block on. What differs from `python -m` is only that these modules were imported
before the run's environment was set: a run whose environment names a variable read at import
time (thread counts, CUDA, Python's own) is not forked but started as a new interpreter, by
`helpers.cli`. The server itself runs nothing of the toolkit: it is never a run's parent state.

One server per pytest process (each xdist worker has its own), started on first use, talking
JSON lines over its stdin/stdout. TOOLKIT_TEST_FORK=0 turns it off (every run a new interpreter).
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

# Read when a library is imported or first initialised, so a forked run could not honour them.
IMPORT_TIME_VARS = ("OMP_", "MKL_", "OPENBLAS_", "PYTHON", "CUDA_", "NCCL_", "LD_", "KMP_", "GOMP_",
                    "TORCH_", "PYTORCH_", "MPLBACKEND", "MPLCONFIGDIR")
# What the toolkit's CLIs import on their way to work (measured with -X importtime); nothing
# here may start a thread or touch a device, or the fork would inherit it.
PRELOAD = ("torch", "torchvision", "accelerate", "safetensors.torch", "numpy", "PIL.Image", "yaml", "omegaconf",
           "rich.console", "rich.progress", "matplotlib", "sklearn.model_selection")

_lock = threading.Lock()
_server = None  # a _Server, started on first use


def enabled() -> bool:
    return os.environ.get("TOOLKIT_TEST_FORK", "1") != "0"


def forkable(env: Dict[str, str]) -> bool:
    """False when ENV differs from this process's in a variable read at import time."""
    for key in set(env) | set(os.environ):
        if key.startswith(IMPORT_TIME_VARS) and env.get(key) != os.environ.get(key):
            if key == "PYTHONUNBUFFERED":  # the forked run's output is unbuffered anyway
                continue
            return False
    return True


class _Server:
    """The server process and a line reader over its stdout's raw pipe (a buffered file object
    could hold a reply that `select` on the pipe no longer sees)."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-u", __file__], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, bufsize=0)
        self.buffer = b""
        hello = self.reply(120)
        if not hello or hello.get("ready") is not True:
            raise RuntimeError(f"the fork server did not start: {hello!r}")

    def send(self, request: dict) -> None:
        self.proc.stdin.write((json.dumps(request) + "\n").encode())

    def reply(self, timeout: Optional[float]) -> Optional[dict]:
        """The next JSON line, or None after TIMEOUT seconds without one."""
        deadline = None if timeout is None else time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError("the fork server died")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return json.loads(line)


def _server_process() -> _Server:
    global _server
    if _server is None or _server.proc.poll() is not None:
        _server = _Server()
    return _server


def run_forked(module: str, args: Sequence[str], env: Dict[str, str], cwd: Path,
               timeout: Optional[float]) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` in CWD with exactly ENV, as a fork of the server; output captured as text."""
    with _lock, tempfile.TemporaryDirectory(prefix="forked-") as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        server = _server_process()
        request = {"module": module, "args": list(map(str, args)), "env": env, "cwd": str(cwd),
                   "stdout": str(out), "stderr": str(err)}
        server.send(request)
        pid = server.reply(60)["pid"]
        reply = server.reply(timeout)
        if reply is None:  # as subprocess.run does on a timeout: kill, wait, raise
            os.kill(pid, 9)
            server.reply(60)
            raise subprocess.TimeoutExpired([sys.executable, "-m", module, *args], timeout,
                                            output=out.read_text(errors="replace"), stderr=err.read_text(errors="replace"))
        return subprocess.CompletedProcess([sys.executable, "-m", module, *args], reply["code"],
                                           out.read_text(errors="replace"), err.read_text(errors="replace"))


# --- the server ------------------------------------------------------------------------------


def _serve() -> dict:
    """Answer requests until stdin closes; return (in a forked child) the request it is to run."""
    import importlib
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in PRELOAD:
            try:
                importlib.import_module(name)
            except ImportError:
                pass
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            return request
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)
    sys.exit(0)


def _become(request: dict) -> None:
    """In the forked child: take the run's environment, directory, output files and argv."""
    import runpy
    import traceback

    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(f, fd)
        os.close(f)
    sys.stdin = open(0, "r")
    sys.stdout = open(1, "w", buffering=1)
    sys.stderr = open(2, "w", buffering=1)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    sys.path.insert(0, request["cwd"])  # what `python -m` puts first
    sys.argv = [request["module"], *request["args"]]  # runpy sets argv[0] to the module's file
    try:
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = _exit_code(e.code)
    except BaseException:  # as the interpreter reports an uncaught exception
        traceback.print_exc()
        code = 1
    _leave(code)


def _exit_code(value) -> int:
    """SystemExit's argument as the interpreter turns it into an exit status."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value & 0xFF
    print(value, file=sys.stderr)
    return 1


def _leave(code: int) -> None:
    """The interpreter's exit without tearing down every module: a new interpreter that imported
    torch exits in a blink when it fails early, while a fork that finalizes them all spends
    seconds. What an exit does that a run can observe still happens: non-daemon threads are
    joined, atexit handlers run (Ray's shutdown, logging's flush), the streams are flushed."""
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    sys.path.pop(0)  # this file's folder (tests/helpers) is not on a CLI's path
    _become(_serve())
