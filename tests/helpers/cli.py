"""Run the real CLIs in subprocesses, and read what they wrote into a run directory.

    from helpers import DEMO, ok, summary, train
    ok(train(["--config", DEMO, f"run.dir={run}"]))
    assert summary(run)["test_acc"] > 0.9
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from safetensors.torch import load_file

from toolkit.config import SHIPPED

from . import forkserver

ROOT = Path(__file__).resolve().parents[2]  # the repository: tests/helpers/cli.py -> ../..
DEMO = str(SHIPPED / "digits_lenet.yaml")  # where the package keeps it (ROOT/configs is a symlink to SHIPPED)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """This process's environment for a child: no TOOLKIT_FAULT_* left over from the caller's
    shell, unbuffered output (a killed child's last lines still arrive), plus EXTRA.
    (Not called `env`: every runner below takes an `env=` argument, which would shadow it.)"""
    env = dict(os.environ)
    for k in list(env):
        if k.startswith("TOOLKIT_FAULT"):
            del env[k]
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def run_module(module: str, args: Sequence[str], env: Optional[Dict[str, str]] = None, timeout: int = 300,
               cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` in CWD, output captured as text (toolkit.extract, toolkit.report, ...).
    Started as a fork of a server that has torch and the rest imported (helpers/forkserver.py)
    unless ENV changes what an import reads, or TOOLKIT_TEST_FORK=0."""
    full_env = child_env(env)
    if forkserver.enabled() and forkserver.forkable(full_env):
        return forkserver.run_forked(module, args, full_env, cwd, timeout)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def train(args: List[str], env: Optional[Dict[str, str]] = None, timeout: int = 300,
          cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`python -m toolkit.train ARGS` (one process)."""
    return run_module("toolkit.train", args, env=env, timeout=timeout, cwd=cwd)


def launch(args: List[str], config_file: str = "launch/cpu_ddp.yaml", env: Optional[Dict[str, str]] = None,
           timeout: int = 300, script: str = "toolkit/train.py",
           launch_args: Sequence[str] = ()) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file CONFIG_FILE toolkit/train.py ARGS`, on a free port."""
    launcher = ["--config_file", config_file, *launch_args]
    if "ddp" in config_file:
        launcher += ["--main_process_port", str(free_port())]
    # The launcher (a fork, see run_module) starts the script's processes as new interpreters.
    return run_module("accelerate.commands.launch", [*launcher, script, *args], env=env, timeout=timeout)


def imported_by(module: str, argv: Sequence[str], names: Sequence[str], cwd: Path, exit_code: int = 0) -> List[bool]:
    """Run `python -m MODULE ARGV` in a new interpreter (never the fork server: it has torch loaded)
    and say which of NAMES it imported. The command must exit with EXIT_CODE. The names are read
    by an atexit handler: a CLI may end the process itself (toolkit.errors.leave), which still
    runs the atexit handlers."""
    code = (f"import atexit, runpy, sys\n"
            f"atexit.register(lambda: print(*[n in sys.modules for n in {list(names)!r}], flush=True))\n"
            f"sys.argv = [{module!r}, *{list(argv)!r}]\n"
            f"runpy.run_module({module!r}, run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=child_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == exit_code, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}"
    return [word == "True" for word in proc.stdout.strip().splitlines()[-1].split()]


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}"
    return proc


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def metrics(run_dir: Path) -> List[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(path: Path) -> Dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"parameters differ: {different}"


def refused_in_process(capsys, main, argv, *needles) -> str:
    """Run a CLI's `main(argv)` in this process: exit 2 and exactly one `error:` line on stderr
    holding every needle. Returns the line."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (code, err)
    for n in needles:
        assert n in err[0], err[0]
    return err[0]
