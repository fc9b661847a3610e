"""Hyperparameter sweeps on Ray Tune: every trial is the engine of toolkit/train.py.

    python -m toolkit.tune --space lr --config configs/digits_lenet.yaml
    python -m toolkit.tune --space optimizer --config configs/digits_lenet.yaml --scheduler fifo train.epochs=5
    python -m toolkit.tune --space lr --num-samples 16 --scheduler asha --max-concurrent 4
    python -m toolkit.tune --space lr --workers-per-trial 2          # each trial a 2-process DDP job
    python -m toolkit.tune --space lr --address auto                 # join a running Ray cluster
    python -m toolkit.tune --resume --name NAME                      # finish a sweep whose driver died
    toolkit-tune --space lr --config digits_lenet                    # the console command, from any directory

A space is a YAML file in configs/spaces/ (or a path): `grid:` values tried in every combination,
`random:` distributions drawn `--num-samples` times (see configs/spaces/lr.yaml). The sweep
directory SWEEP (sweeps/NAME) holds sweep.json (its settings), runs/TRIAL/ (each trial's run
directory: metrics, TensorBoard, checkpoints, summary), results.csv, best.yaml (a config for
toolkit/train.py), compare.png (every trial's curves), tune/ (Ray Tune's own state) and
tune.sig.json (signatures of Ray's pickles, keyed by ~/.config/toolkit/tune.key or $TOOLKIT_TUNE_KEY:
--resume hands Ray nothing unsigned).
Exit codes: 0 every trial finished (or was stopped early by the scheduler), 1 a trial failed
after its retries, 2 bad input (nothing started).
"""

from __future__ import annotations

import argparse
import csv
import difflib
import hashlib
import hmac
import io
import json
import math
import os
import secrets
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml

from toolkit.clihelp import TRAIN_SECTIONS, config_help, epilog
from toolkit.config import Config, find_config, hparams, load_config, parse_yaml, shipped_names, to_yaml, with_flat
from toolkit.errors import ConfigError, ToolkitError
from toolkit.rundir import RunDir, run_lock, write_atomic_json, write_atomic_text

SCHEDULERS = ("asha", "fifo", "pbt")
# What every epoch reports (engine.fit's row); log.test_every_epoch adds the test pair.
EPOCH_METRICS = ("val_acc", "val_loss", "val_top5", "train_acc", "train_loss")
TEST_METRICS = ("test_acc", "test_loss")
# What population-based training may perturb: it continues another trial's optimizer state,
# and these are the settings that can be changed on a live optimizer.
PBT_KEYS = ("optim.lr", "optim.momentum", "optim.weight_decay")
LOCK_WAIT_S = 120.0  # a trial waits this long for a leftover process to leave its run directory
DISTRIBUTIONS = {"uniform": 2, "loguniform": 2, "randint": 2, "choice": None}


# ------------------------------------------------------------------------------------------
# spaces


@dataclass
class Space:
    name: str
    grid: Dict[str, List[Any]] = field(default_factory=dict)
    random: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    @property
    def keys(self) -> List[str]:
        """The config keys it varies, a bundle's keys spelled out."""
        out = []
        for key, values in self.grid.items():
            out += [f"{key}.{k}" for v in values for k in v] if "." not in key else [key]
        return list(dict.fromkeys([*out, *self.random]))


def expand(flat: Dict[str, Any]) -> Dict[str, Any]:
    """A trial's values as config keys: a bundle {"optim": {"name": "adam", "lr": 0.001}}
    becomes optim.name and optim.lr."""
    out: Dict[str, Any] = {}
    for key, value in flat.items():
        if "." not in key and isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def list_spaces() -> List[str]:
    return shipped_names("spaces")


def load_space(name: str) -> Space:
    """A space by path, or by name (configs/spaces/NAME.yaml, found as `--config` finds a config)."""
    path = Path(find_config(name, "spaces", "--space"))
    try:
        data = parse_yaml(path.read_text()) or {}  # as configs are read: `off`/`no` stay words
    except yaml.YAMLError:
        raise ConfigError(f"--space: {path} is not valid YAML") from None
    if not isinstance(data, dict) or set(data) - {"grid", "random"} or not data:
        raise ConfigError(f"--space: {path} must hold `grid:` and/or `random:` mappings")
    grid, rand = data.get("grid") or {}, data.get("random") or {}
    if not isinstance(grid, dict) or not isinstance(rand, dict):
        raise ConfigError(f"--space: {path}: `grid:` and `random:` must map section.key to values")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"--space: {path}: grid {key}: expected a non-empty list of values")
        if "." not in key and not all(isinstance(v, dict) and v for v in values):
            raise ConfigError(f"--space: {path}: grid {key}: a section name takes a list of mappings "
                              f"(keys set together), else write section.key")
    for key in rand:
        if "." not in key:
            raise ConfigError(f"--space: {path}: random {key}: expected section.key")
    for key, spec in rand.items():
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise ConfigError(f"--space: {path}: random {key}: expected one of "
                              f"{', '.join(f'{{{d}: [...]}}' for d in DISTRIBUTIONS)}")
        kind, args = next(iter(spec.items()))
        want = DISTRIBUTIONS[kind]
        if not isinstance(args, list) or (want and len(args) != want) or not args:
            raise ConfigError(f"--space: {path}: random {key}: {kind} needs "
                              f"{f'[low, high]' if want else 'a non-empty list'}")
        if want and not (args[0] < args[1]) or kind == "loguniform" and args[0] <= 0:
            raise ConfigError(f"--space: {path}: random {key}: {kind} needs 0 < low < high, got {args}")
    return Space(path.stem, grid, rand)


def check_space(space: Space, cfg: Config, use: str) -> None:
    """Every key is a tunable key of the config and every value gives a valid config."""
    tunable = hparams(cfg)
    for key in space.keys:
        if key not in tunable:
            close = difflib.get_close_matches(key, list(tunable), n=1)
            hint = f"did you mean {close[0]}?" if close else "--print-space-keys lists them"
            raise ConfigError(f"--space {space.name}: {key} is not a tunable config key; {hint}")
    values: Dict[str, List[Any]] = {}
    if use == "grid":
        values = dict(space.grid)
    for key, spec in space.random.items():
        kind, args = next(iter(spec.items()))
        values.setdefault(key, list(args) if kind == "choice" else [args[0], args[1]])
    for key, vals in values.items():
        for v in vals:
            try:
                with_flat(cfg, expand({key: v}))
            except ConfigError as e:
                raise ConfigError(f"--space {space.name}: {key}={v!r}: {e}") from None


def search_mode(space: Space, num_samples: Optional[int]) -> str:
    """grid unless --num-samples asks for draws from the space's random section (or it has no grid)."""
    if not space.grid:
        return "random"
    return "random" if num_samples and space.random else "grid"


def param_space(space: Space, mode: str) -> Dict[str, Any]:
    from ray import tune

    if mode == "grid":
        return {k: tune.grid_search(v) for k, v in space.grid.items()}
    out = {}
    for key, spec in space.random.items():
        kind, args = next(iter(spec.items()))
        out[key] = (tune.choice(args) if kind == "choice" else tune.randint(args[0], args[1] + 1)
                    if kind == "randint" else getattr(tune, kind)(args[0], args[1]))
    return out


# ------------------------------------------------------------------------------------------
# the sweep's settings (sweep.json): enough to resume it without the original command line


@dataclass
class Sweep:
    name: str
    dir: str
    config: Optional[str]
    overrides: List[str]
    space: str
    num_samples: Optional[int]
    scheduler: str
    metric: str
    mode: str
    max_concurrent: Optional[int]
    cpus_per_trial: float
    gpus_per_trial: float
    workers_per_trial: int
    max_failures: int
    grace_period: int
    perturbation_interval: int
    seed: int
    # A trial's run directory name: the trial id, or this template over its values
    # ("fold_{data.holdout_fold}": toolkit.clean's fold runs, named alike in both of its modes).
    run_name: Optional[str] = None

    def base_config(self) -> Config:
        return load_config(self.config, self.overrides)


def trial_run_name(sweep: Sweep, flat: Dict[str, Any], trial_id: str) -> str:
    name = sweep.run_name or trial_id
    for key, value in expand(flat).items():
        name = name.replace("{" + key + "}", str(value))
    return name


def trial_config(sweep: Sweep, flat: Dict[str, Any], run_dir: Path, resume: str) -> Config:
    cfg = with_flat(sweep.base_config(), expand(flat))
    return with_flat(cfg, {"run.dir": str(run_dir), "run.name": run_dir.name, "train.resume": resume,
                           "log.progress": "none"})


# ------------------------------------------------------------------------------------------
# what runs inside a trial


def _fault_once(resumed: bool) -> None:
    """TOOLKIT_FAULT_TRIAL_RAISE_AT_STEP=N: the trial raises after step N on its first attempt
    only (a retried trial resumes and must not fail again). For the tests."""
    step = os.environ.get("TOOLKIT_FAULT_TRIAL_RAISE_AT_STEP")
    if step and not resumed:
        os.environ["TOOLKIT_FAULT_RAISE_AT_STEP"] = step
    else:
        os.environ.pop("TOOLKIT_FAULT_RAISE_AT_STEP", None)


def _report_row(row: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_trial(flat: Dict[str, Any], sweep_json: str) -> None:
    """Tune's function trainable: one engine run per trial, reporting every epoch."""
    from ray import tune

    sweep = Sweep(**json.loads(sweep_json))
    run_dir = Path(sweep.dir) / "runs" / trial_run_name(sweep, flat, tune.get_context().get_trial_id())
    donor = tune.get_checkpoint()  # PBT: another trial's state; otherwise this trial's own
    # Without a Tune checkpoint the trial continues from its own run directory (a retry or a
    # resumed sweep), so a checkpoint is never copied unless PBT needs one.
    resume = donor.path if donor is not None else "auto"
    import ray

    run_dir.mkdir(parents=True, exist_ok=True)
    files = RunDir(run_dir)
    with run_lock(run_dir, LOCK_WAIT_S):  # a process left by a killed driver has gone
        finished = _read_json(files.summary)
        if not finished:
            write_atomic_json(files.trial, {  # where it runs (the last attempt)
                "trial_id": run_dir.name, "node_id": ray.get_runtime_context().get_node_id(),
                "hostname": socket.gethostname(), "pid": os.getpid()}, indent=None)
    if finished and donor is None:  # done before the driver died, after Tune last saved its state
        tune.report(_final_row(_epoch_rows(run_dir)[-1:], finished))
        return
    resumed = donor is not None or files.checkpoints.is_dir()
    _fault_once(resumed)
    cfg = trial_config(sweep, flat, run_dir, resume)
    if sweep.workers_per_trial > 1:
        _run_distributed(sweep, cfg, run_dir)
        return
    from toolkit.engine import fit

    last: List[Dict[str, Any]] = []

    def report(row: Dict[str, Any]) -> None:
        if row["last_epoch"]:  # reported after the test, below: a scheduler that stops the trial
            last.append(row)   # at its last report cuts nothing short (early stopping included)
            return
        ckpt = tune.Checkpoint.from_directory(row["checkpoint"]) if sweep.scheduler == "pbt" else None
        tune.report(_report_row(row), checkpoint=ckpt)

    # A resumed sweep may start a trial while the one its killed driver left is still exiting.
    summary = fit(cfg, on_epoch_end=report, optim_from_config=sweep.scheduler == "pbt", lock_wait_s=LOCK_WAIT_S)
    tune.report(_final_row(last, summary))


def _final_row(last: List[Dict[str, Any]], summary: Dict[str, Any]) -> Dict[str, Any]:
    """The last epoch's row with the test result. A run resumed after its last epoch (its
    driver died during the test) has no row left to report; the summary stands in."""
    row = _report_row(last[0]) if last else {"epoch": summary["epochs"], "val_acc": summary["best_val_acc"]}
    row.update(test_acc=summary["test_acc"], test_loss=summary["test_loss"], test_top5=summary["test_top5"])
    return row


def _worker_loop(loop_config: Dict[str, Any]) -> None:
    """One DDP rank of a trial under Ray Train (Ray has formed the process group)."""
    import ray.train

    from toolkit.engine import fit

    cfg = with_flat(load_config(None, []), loop_config["flat"])
    last: List[Dict[str, Any]] = []

    def report(row: Dict[str, Any]) -> None:
        if row["last_epoch"]:
            last.append(row)
        else:
            ray.train.report(_report_row(row))

    summary = fit(cfg, on_epoch_end=report, lock_wait_s=LOCK_WAIT_S)
    ray.train.report(_final_row(last, summary))


def _run_distributed(sweep: Sweep, cfg: Config, run_dir: Path) -> None:
    import uuid

    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from toolkit.config import to_flat

    use_gpu = sweep.gpus_per_trial > 0
    resources = {"CPU": sweep.cpus_per_trial, **({"GPU": sweep.gpus_per_trial} if use_gpu else {})}
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"flat": to_flat(cfg)},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=sweep.workers_per_trial, use_gpu=use_gpu,
                                               resources_per_worker=resources),
        # Each attempt is a fresh Ray Train run; the engine's run directory carries the state.
        run_config=ray.train.RunConfig(name=f"{run_dir.name}-{uuid.uuid4().hex[:8]}",
                                       storage_path=str(Path(sweep.dir) / "train"),
                                       callbacks=[TuneReportCallback()]),
    )
    trainer.fit()


# ------------------------------------------------------------------------------------------
# Ray's state is pickles: --resume hands Ray only what this toolkit signed
#
# Tuner.restore unpickles SWEEP/tune/tuner.pkl, the newest experiment_state-*.json (its trials
# are hex-encoded cloudpickle), basic-variant-state-*.json (a cloudpickle despite its name),
# searcher-/callback-state pickles and the trials' pickled errors; a planted file runs its code.
# So the driver keeps an HMAC (SHA-256) of every such file it writes in SWEEP/tune.sig.json,
# keyed by a per-user secret kept outside the sweep folder, and --resume checks every one of
# them before Ray starts. Ray's experiment state is written during the sweep (every >= 10 s and
# at the end, into a local staging copy that is then uploaded), so a driver killed mid-sweep
# leaves files that are already signed: `SignRayState`, a Tune callback, signs the staging copy
# after each of Ray's steps.

KEY_ENV = "TOOLKIT_TUNE_KEY"  # the key file's path (default ~/.config/toolkit/tune.key)
SIGNATURES = "tune.sig.json"  # SWEEP/tune.sig.json: {relative path: [hmac, ...]}
# Signed versions kept per file: the upload to SWEEP/tune/ may lag the staging copy by a sync
# or two, so a resume must accept a recent version as well as the newest.
SIGN_HISTORY = 8


def key_path() -> Path:
    if os.environ.get(KEY_ENV):
        return Path(os.environ[KEY_ENV]).expanduser()
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "toolkit" / "tune.key"


def _create_key(path: Path) -> None:
    """32 random bytes, mode 0600, made whole before it appears (a link, not a rename, so two
    drivers starting at once cannot replace each other's key)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)  # left by a killed process that had this pid
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another driver made it first: use theirs
    finally:
        tmp.unlink()


def load_key(create: bool) -> bytes:
    """The per-user signing key; made on first use by a new sweep, never by --resume."""
    path = key_path()
    if create and not path.exists():
        try:
            _create_key(path)
        except OSError as e:
            raise ConfigError(f"{path}: cannot create the sweep signing key: {e.strerror}; "
                              f"set {KEY_ENV} to a writable path") from None
    try:
        st, key = path.stat(), path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"--resume: no sweep signing key at {path}; set {KEY_ENV} to the key file "
                          "the sweep was started with") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the sweep signing key: {e.strerror}") from None
    if st.st_uid != os.getuid() or st.st_mode & 0o077:  # another user could forge signatures
        raise ConfigError(f"{path}: the sweep signing key must be yours alone (chmod 600 {path})")
    if len(key) < 32:
        raise ConfigError(f"{path}: not a sweep signing key (expected 32 random bytes)")
    return key


def ray_state_files(tune_dir: Path) -> List[Path]:
    """The files in a Tune experiment folder (SWEEP/tune/, or the driver's staging copy of it)
    that Ray may unpickle: every .json and .pkl at the top (sync-down copies them all, and Ray
    loads the newest name of each kind, so a planted later name would win) and every .pkl in the
    trial folders (params.pkl, error.pkl). Not checkpoint_* folders: under PBT they hold the
    engine's checkpoints, read by the engine (safetensors, torch.load(weights_only=True)).
    A linked folder is refused: what it holds could change under the check."""
    out = [p for p in sorted(tune_dir.iterdir()) if p.suffix in (".json", ".pkl") and not p.is_dir()]
    for top, dirs, files in os.walk(tune_dir):
        for d in list(dirs):
            if os.path.islink(os.path.join(top, d)):
                raise ConfigError(f"--resume: {os.path.join(top, d)} is a symbolic link; Ray's state "
                                  "must be plain files")
            if d.startswith("checkpoint_"):
                dirs.remove(d)
        if Path(top) != tune_dir:
            out += [Path(top, f) for f in sorted(files) if f.endswith(".pkl")]
    return out


def _mac(key: bytes, rel: str, data: bytes) -> str:
    """Binds the file's place to its bytes: a signed file moved to another name does not pass."""
    msg = b"toolkit.tune/1\0" + rel.encode() + b"\0" + hashlib.sha256(data).digest()
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def _read_signatures(sweep_dir: Path) -> Dict[str, List[str]]:
    try:
        files = json.loads((sweep_dir / SIGNATURES).read_text()).get("files", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return {k: v for k, v in files.items() if isinstance(k, str) and isinstance(v, list)} \
        if isinstance(files, dict) else {}


class StateSigner:
    """Adds the HMAC of each of Ray's state files to SWEEP/tune.sig.json (driver side only)."""

    def __init__(self, sweep_dir: Path, key: bytes):
        self.sweep_dir, self.key = sweep_dir, key
        self.signatures = _read_signatures(sweep_dir)  # a resumed sweep keeps what it had
        self.seen: Dict[str, Tuple[int, int]] = {}  # (size, mtime_ns) last signed, per file

    def add(self, rel: str, data: bytes) -> bool:
        mac, kept = _mac(self.key, rel, data), self.signatures.setdefault(rel, [])
        if mac in kept:
            return False
        kept.append(mac)
        del kept[:-SIGN_HISTORY]
        return True

    def sign_tree(self, staging: Path) -> None:
        """Sign what Ray wrote to its staging copy (local to the driver: nobody else writes
        there), which is the bytes it then uploads to SWEEP/tune/."""
        if not staging.is_dir():
            return
        changed = False
        for path in ray_state_files(staging):
            rel, st = path.relative_to(staging).as_posix(), path.stat()
            if self.seen.get(rel) == (st.st_size, st.st_mtime_ns):
                continue
            self.seen[rel] = (st.st_size, st.st_mtime_ns)
            changed |= self.add(rel, path.read_bytes())
        if changed:
            self.save()

    def save(self) -> None:
        write_atomic_json(self.sweep_dir / SIGNATURES, {"version": 1, "files": self.signatures})


def sign_tuner_state(tuner, sweep_dir: Path) -> None:
    """tuner.pkl is written once, by Tuner(), straight to SWEEP/tune/. Sign the bytes the tuner
    pickles to, not the file read back (which someone could have swapped in the meantime);
    Ray's cloudpickle of the same state is byte-identical (checked by the resume test).
    Reaches into Ray 2.60's Tuner: re-check `_local_tuner.__getstate__` when the pin moves."""
    import ray.cloudpickle

    local = getattr(tuner, "_local_tuner", None)
    if local is None:  # Ray Client (ray://): the tuner lives on the cluster
        print("warning: the sweep's tuner.pkl cannot be signed under Ray Client; --resume will refuse it",
              file=sys.stderr, flush=True)
        return
    signer = StateSigner(sweep_dir, load_key(create=True))
    signer.add("tuner.pkl", ray.cloudpickle.dumps(local.__getstate__()))
    signer.save()


def verify_ray_state(sweep_dir: Path) -> None:
    """Before Ray reads SWEEP/tune/: every file it may unpickle carries a signature made with this
    user's key. One line naming the first file that does not, and nothing is unpickled."""
    tune_dir = sweep_dir / "tune"
    if not (tune_dir / "tuner.pkl").is_file():
        raise ConfigError(f"--resume: {tune_dir / 'tuner.pkl'} is missing; the sweep cannot be restored")
    key = load_key(create=False)
    signatures = _read_signatures(sweep_dir)
    for path in ray_state_files(tune_dir):
        rel = path.relative_to(tune_dir).as_posix()
        try:
            mac = _mac(key, rel, path.read_bytes())
        except OSError as e:
            raise ConfigError(f"--resume: {path}: {e.strerror}") from None
        if not any(hmac.compare_digest(mac, str(s)) for s in signatures.get(rel, [])):
            why = "was not written by this toolkit with your key" if rel in signatures else \
                f"has no signature in {sweep_dir / SIGNATURES}"
            raise ConfigError(f"--resume: refusing {path}: it {why}; Ray would unpickle it (run code from it)")


def _define_sign_callback():
    from ray.tune import Callback

    class SignRayState(Callback):
        """Signs Ray's experiment state after every step of the driver's loop (right after Ray
        saves it) and at the end. Ray pickles it into tuner.pkl, so it holds no key: it reads
        the key file where it runs, and finds the sweep from the trials' storage."""

        def __init__(self):
            self._signer: Any = None  # a StateSigner once the first trial exists; False after a failure

        def __getstate__(self):
            return {}

        def __setstate__(self, state):
            self._signer = None

        def _sign(self, trials) -> None:
            if not trials or self._signer is False:
                return
            storage = trials[0].storage
            try:
                if self._signer is None:
                    self._signer = StateSigner(Path(storage.experiment_fs_path).parent, load_key(create=True))
                self._signer.sign_tree(Path(storage.experiment_driver_staging_path))
            except (OSError, ToolkitError) as e:  # the trials go on; only --resume is lost, and it will say so
                print(f"warning: cannot sign Ray's state in {storage.experiment_fs_path} ({e}); "
                      "--resume will refuse this sweep", file=sys.stderr, flush=True)
                self._signer = False

        def on_step_end(self, iteration, trials, **info):
            self._sign(trials)

        def on_experiment_end(self, trials, **info):
            self._sign(trials)

    SignRayState.__module__, SignRayState.__qualname__ = __name__, "SignRayState"
    return SignRayState


def sign_callback_class():
    """`SignRayState` is made on first use, so that importing this module does not import Ray
    (a second); pickles name it toolkit.tune.SignRayState, and unpickling finds it through the
    module's __getattr__."""
    if "SignRayState" not in globals():
        globals()["SignRayState"] = _define_sign_callback()
    return globals()["SignRayState"]


def __getattr__(name: str):
    if name == "SignRayState":
        return sign_callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------------------------------
# the driver


def _parse(argv: Optional[List[str]]) -> argparse.Namespace:
    usage, notes = __doc__.split("\n", 2)[2].split("\n\n", 1)  # the commands, then the prose
    p = argparse.ArgumentParser(prog="python -m toolkit.tune", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=epilog(TRAIN_SECTIONS, usage, "docs/tune.md", notes))
    p.add_argument("overrides", nargs="*", help="section.key=value, applied to every trial")
    p.add_argument("--config", "-c", help="the trials' base config: " + config_help("digits_lenet"))
    p.add_argument("--space", help=f"a shipped space's name ({', '.join(list_spaces())}; toolkit-list spaces) "
                                   "or a YAML path")
    p.add_argument("--num-samples", type=int, help="draws from the space's random section (default: its grid)")
    p.add_argument("--scheduler", choices=SCHEDULERS, default="asha", help="trial scheduler (default asha)")
    p.add_argument("--metric", default="val_acc", help="what the scheduler and the ranking use (default val_acc)")
    p.add_argument("--mode", choices=("max", "min"), help="default: min for *_loss, else max")
    p.add_argument("--max-concurrent", type=int, help="trials running at once (default: as resources allow)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial (per worker with "
                   "--workers-per-trial)")
    p.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPUs per trial or worker; fractions share a GPU")
    p.add_argument("--workers-per-trial", type=int, default=1, help="DDP processes per trial (Ray Train)")
    p.add_argument("--max-failures", type=int, default=2, help="retries of a failed trial (default 2)")
    p.add_argument("--grace-period", type=int, default=1, help="asha: epochs before a trial may be stopped")
    p.add_argument("--perturbation-interval", type=int, default=2, help="pbt: epochs between exploit/explore")
    p.add_argument("--seed", type=int, default=0, help="seed of the random search and of PBT")
    p.add_argument("--name", help="sweep name (default: CONFIG-SPACE-TIMESTAMP)")
    p.add_argument("--storage", default="sweeps", help="where sweep directories go (default sweeps/)")
    p.add_argument("--resume", action="store_true", help="finish the sweep --name (settings from its sweep.json)")
    p.add_argument("--address", help="a running Ray cluster (host:port or auto); default: start a local one")
    p.add_argument("--num-cpus", type=int, help="local Ray only: CPUs to offer (default: all)")
    p.add_argument("--print-space-keys", action="store_true", help="list the tunable keys of --config and exit")
    p.add_argument("--check-only", action="store_true", help="check the inputs (exit 2 on a problem) and exit")
    return p.parse_args(argv)


def _metrics_reported(cfg: Config) -> List[str]:
    return [*EPOCH_METRICS, *(TEST_METRICS if cfg.log.test_every_epoch else ())]


def absolute_path(path: Optional[str]) -> Optional[str]:
    return str(Path(path).absolute()) if path else path


def absolute_overrides(overrides: List[str]) -> List[str]:
    """Paths given relative to the caller's directory, made absolute: trials run elsewhere."""
    out = []
    for o in overrides:
        key, _, value = o.partition("=")
        if key in ("data.root", "model.pretrained", "data.exclude") and value and value not in ("null", "None") and (
                os.sep in value or Path(value).exists()):
            value = absolute_path(value)
        out.append(f"{key}={value}")
    return out


def make_sweep(args: argparse.Namespace) -> Sweep:
    """Everything checked before Ray starts: config, space, metric, scheduler, resources."""
    overrides = absolute_overrides(list(args.overrides))
    for o in overrides:
        if o.partition("=")[0].split(".")[0] == "run" or o.startswith("train.resume="):
            raise ConfigError(f"override {o!r}: each trial sets run.* and train.resume itself")
    config = find_config(args.config) if args.config else None  # a name: the shipped file, stored absolute
    cfg = load_config(config, overrides)
    if args.space is None:
        raise ConfigError(f"--space is required; choose one of: {', '.join(list_spaces())}")
    space_path = absolute_path(find_config(args.space, "spaces", "--space"))  # trials and --resume read it by path
    space = load_space(space_path)
    if args.num_samples is not None and args.num_samples < 1:
        raise ConfigError(f"--num-samples: must be >= 1, got {args.num_samples}")
    mode_ = search_mode(space, args.num_samples)
    check_space(space, cfg, mode_)
    reported = _metrics_reported(cfg)
    if args.metric not in reported:
        raise ConfigError(f"--metric: {args.metric!r} is never reported; trials report: {', '.join(reported)}")
    mode = args.mode or ("min" if args.metric.endswith("_loss") else "max")
    for flag, value, low in (("--cpus-per-trial", args.cpus_per_trial, 0.0), ("--gpus-per-trial", args.gpus_per_trial, 0.0)):
        if not (math.isfinite(value) and value >= low) or (flag == "--cpus-per-trial" and value <= 0):
            raise ConfigError(f"{flag}: must be {'> 0' if flag == '--cpus-per-trial' else '>= 0'}, got {value}")
    if args.gpus_per_trial > 1 and args.gpus_per_trial != int(args.gpus_per_trial):
        raise ConfigError(f"--gpus-per-trial: fractions must be below 1, got {args.gpus_per_trial}")
    for flag, value in (("--workers-per-trial", args.workers_per_trial), ("--max-concurrent", args.max_concurrent),
                        ("--grace-period", args.grace_period), ("--perturbation-interval", args.perturbation_interval)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag}: must be >= 1, got {value}")
    if args.max_failures < 0:
        raise ConfigError(f"--max-failures: must be >= 0, got {args.max_failures}")
    if args.gpus_per_trial > 0 and not args.address:
        import torch

        if torch.cuda.device_count() == 0:
            raise ConfigError(f"--gpus-per-trial {args.gpus_per_trial:g}: this machine has no CUDA GPU; "
                              "use --gpus-per-trial 0 or --address a cluster with GPUs")
    if args.gpus_per_trial == 0 and cfg.train.precision == "fp16":
        raise ConfigError("config: train.precision: fp16 trials need --gpus-per-trial > 0")
    if args.scheduler == "pbt":
        bad = [k for k in space.random if k not in PBT_KEYS]
        if not space.random or bad:
            raise ConfigError(f"--scheduler pbt: the space's random section is what PBT perturbs and may hold "
                              f"only {', '.join(PBT_KEYS)}; space {space.name} has "
                              f"{', '.join(bad) if bad else 'no random section'}")
        if args.workers_per_trial > 1 or cfg.train.stages:
            raise ConfigError("--scheduler pbt: needs --workers-per-trial 1 and a single-stage config")
    name = args.name or f"{Path(config).stem if config else 'default'}-{space.name}-" \
                        f"{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    if os.sep in name or name in ("", ".", ".."):
        raise ConfigError(f"--name: must be a plain directory name, got {name!r}")
    sweep_dir = Path(args.storage).absolute() / name
    if sweep_dir.exists() and any(sweep_dir.iterdir()):
        raise ConfigError(f"--name: {sweep_dir} already holds a sweep; finish it with --resume --name {name} "
                          "or choose another --name")
    return Sweep(name=name, dir=str(sweep_dir), config=absolute_path(config), overrides=overrides,
                 space=space_path, num_samples=args.num_samples, scheduler=args.scheduler,
                 metric=args.metric, mode=mode, max_concurrent=args.max_concurrent,
                 cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
                 workers_per_trial=args.workers_per_trial, max_failures=args.max_failures,
                 grace_period=args.grace_period, perturbation_interval=args.perturbation_interval, seed=args.seed)


def load_sweep(args: argparse.Namespace) -> Sweep:
    if not args.name:
        raise ConfigError("--resume: name the sweep with --name")
    path = Path(args.storage).absolute() / args.name / "sweep.json"
    if not path.is_file():
        raise ConfigError(f"--resume: no sweep at {path.parent} (no sweep.json)")
    try:
        sweep = Sweep(**json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"--resume: {path} is unreadable: {e}") from None
    sweep.base_config()  # the config file may have changed or gone since
    if not (Path(sweep.dir) / "tune").is_dir():
        raise ConfigError(f"--resume: {sweep.dir} has no Tune state (tune/); the sweep never started")
    verify_ray_state(Path(sweep.dir))  # before Ray unpickles anything from the folder
    return sweep


def _scheduler(sweep: Sweep, space: Space, epochs: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    if sweep.scheduler == "asha":
        return ASHAScheduler(time_attr="training_iteration", max_t=epochs,
                             grace_period=min(sweep.grace_period, epochs), reduction_factor=2)
    if sweep.scheduler == "pbt":
        return PopulationBasedTraining(time_attr="training_iteration", perturbation_interval=sweep.perturbation_interval,
                                       hyperparam_mutations=param_space(space, "random"))
    return FIFOScheduler()


def _start_ray(address: Optional[str], num_cpus: Optional[int], runtime_env: Dict[str, Any]) -> None:
    import ray

    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
        return
    # A local instance starts no dashboard. Ray 2.60's own services (GCS, raylet, workers) listen
    # on every interface and accept only clients holding the cluster's token (token auth is on
    # by default since Ray 2.59); Ray has no option to confine them to the loopback interface
    # (it rewrites a 127.0.0.1 node address to the external one). Workers run at normal
    # priority: Ray's default (nice 15) starves trials behind any other process.
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env, log_to_driver=False,
             configure_logging=True, logging_level="warning")


def _check_cluster(sweep: Sweep) -> None:
    import ray

    total = ray.cluster_resources()
    need_gpu = sweep.gpus_per_trial * sweep.workers_per_trial
    if need_gpu > total.get("GPU", 0):
        raise ConfigError(f"--gpus-per-trial {sweep.gpus_per_trial:g}: the Ray cluster has "
                          f"{total.get('GPU', 0):g} GPU(s), a trial needs {need_gpu:g}")
    need_cpu = sweep.cpus_per_trial * sweep.workers_per_trial
    if need_cpu > total.get("CPU", 0):
        raise ConfigError(f"--cpus-per-trial {sweep.cpus_per_trial:g}: the Ray cluster has "
                          f"{total.get('CPU', 0):g} CPU(s), a trial needs {need_cpu:g}")


def run_sweep(sweep: Sweep, resume: bool, address: Optional[str], num_cpus: Optional[int]) -> int:
    import ray
    from ray import tune

    sweep_dir = Path(sweep.dir)
    space = load_space(sweep.space)
    cfg = sweep.base_config()
    load_key(create=not resume)  # a key another user could read is refused before anything starts
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        write_atomic_json(sweep_dir / "sweep.json", asdict(sweep))
    env = {"RAY_CHDIR_TO_TRIAL_DIR": "0", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parent.parent)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    env.update({k: v for k, v in os.environ.items() if k.startswith("TOOLKIT_FAULT_")})
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "1")
    _start_ray(address, num_cpus, {"env_vars": env})
    try:
        _check_cluster(sweep)
        trainable = tune.with_parameters(run_trial, sweep_json=json.dumps(asdict(sweep)))
        if sweep.workers_per_trial > 1:  # the trial itself only drives Ray Train's workers: it takes
            # no CPU (Tune refuses an all-zero request, hence one byte of memory)
            trainable = tune.with_resources(trainable, {"cpu": 0, "memory": 1})
        else:
            trainable = tune.with_resources(trainable, {"cpu": sweep.cpus_per_trial, "gpu": sweep.gpus_per_trial})
        mode_ = search_mode(space, sweep.num_samples)
        if resume:
            tuner = tune.Tuner.restore(str(sweep_dir / "tune"), trainable, resume_unfinished=True,
                                       resume_errored=True)
        else:
            from ray.tune.search import BasicVariantGenerator

            tuner = tune.Tuner(
                trainable, param_space=param_space(space, mode_),
                tune_config=tune.TuneConfig(
                    metric=sweep.metric, mode=sweep.mode, scheduler=_scheduler(sweep, space, cfg.train.epochs),
                    num_samples=(sweep.num_samples or 1) if mode_ == "grid" else (sweep.num_samples or 8),
                    # the generator takes the limit itself (TuneConfig's is not applied to it)
                    search_alg=BasicVariantGenerator(random_state=sweep.seed, max_concurrent=sweep.max_concurrent or 0),
                    trial_dirname_creator=lambda t: trial_run_name(sweep, t.config, t.trial_id)),
                run_config=tune.RunConfig(
                    name="tune", storage_path=str(sweep_dir), verbose=1,
                    failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                    callbacks=[sign_callback_class()()]))
            sign_tuner_state(tuner, sweep_dir)
        t0 = time.perf_counter()
        _quiet_trial_failures()
        try:
            grid, failure = tuner.fit(), None
        except Exception as e:  # noqa: BLE001 (Ray itself failed: the trials' run directories still say what ran)
            grid, failure = None, e
        wall = time.perf_counter() - t0
        return summarize(sweep, grid, wall, failure)
    finally:
        ray.shutdown()


# ------------------------------------------------------------------------------------------
# the end of a sweep: table, results.csv, best.yaml, compare.png


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _epoch_rows(run_dir: Path) -> List[Dict[str, Any]]:
    rows = []
    try:
        for line in RunDir(run_dir).metrics.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("kind") == "epoch":
                rows.append(rec)
    except (OSError, ValueError):
        pass
    return rows


def _one_line(err: Any) -> str:
    """A trial's error as one short line. A worker that died without raising (the OOM killer, a
    signal) says so instead of Ray's paragraph; otherwise the last line, the original exception."""
    text = str(err).strip()
    if "worker process has died" in text or "actor died unexpectedly" in text:
        return ("its process died without an error (killed: out of memory, or a signal; "
                "dmesg tells an OOM kill)")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else type(err).__name__)[:200]


def _grid_results(grid) -> Dict[str, Any]:
    """Trial id -> Ray's result, for as many trials as Ray can still report on."""
    out: Dict[str, Any] = {}
    if grid is None:
        return out
    try:
        for result in grid:
            if result.path:
                out[Path(result.path).name] = result
    except Exception:  # noqa: BLE001 (a half-built result grid: the run directories stand in)
        pass
    return out


def _flat_from_run(run_dir: Path, keys: List[str]) -> Dict[str, Any]:
    """The space's settings as the trial's config.yaml records them (when Ray cannot say)."""
    try:
        cfg = yaml.safe_load(RunDir(run_dir).config.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    out = {}
    for key in keys:
        section, _, name = key.partition(".")
        if isinstance(cfg.get(section), dict) and name in cfg[section]:
            out[key] = cfg[section][name]
    return out


def trial_rows(sweep: Sweep, grid) -> List[Dict[str, Any]]:
    """One row per trial, from the trial's own run directory and what Ray reports on it. Every
    run directory under SWEEP/runs/ gets a row, so the table is whole even when Ray failed
    (grid None) or lost track of a trial."""
    keys = load_space(sweep.space).keys
    results = _grid_results(grid)
    runs_dir = Path(sweep.dir) / "runs"
    on_disk = sorted(p.name for p in runs_dir.iterdir() if p.is_dir()) if runs_dir.is_dir() else []
    rows = []
    for trial_id in [*results, *(t for t in on_disk if t not in results)]:
        result = results.get(trial_id)
        run_dir = runs_dir / trial_id
        summary = _read_json(RunDir(run_dir).summary)
        epochs = _epoch_rows(run_dir)
        values = [r[sweep.metric] for r in epochs if sweep.metric in r]
        best = (max if sweep.mode == "max" else min)(values) if values else None
        error = getattr(result, "error", None)
        status = "error" if error else "done" if summary else "stopped" if result is not None else "unfinished"
        flat = expand(result.config or {}) if result is not None else _flat_from_run(run_dir, keys)
        row = {"trial": trial_id, "status": status,
               **{k: flat.get(k) for k in keys},
               "epochs": len(epochs), sweep.metric: values[-1] if values else None, f"best_{sweep.metric}": best,
               "stopped_early": summary.get("stopped_early") or "",
               "test_acc": summary.get("test_acc"), "train_time_s": summary.get("train_time_s"),
               "wall_s": summary.get("wall_s"), "node": _read_json(RunDir(run_dir).trial).get("node_id", "")[:12],
               "run_dir": str(run_dir), "error": _one_line(error) if error else ""}
        row["_flat"] = flat  # what the trial set (not a csv column)
        rows.append(row)
    sign = -1 if sweep.mode == "max" else 1
    # Finished trials first, by metric: one that early stopping ended is finished, with fewer
    # epochs. Trials a scheduler cut short follow, the longest-lived first.
    rows.sort(key=lambda r: (r[sweep.metric] is None, r["status"] != "done",
                             0 if r["status"] == "done" else -r["epochs"], sign * (r[sweep.metric] or 0)))
    return rows


def _quiet_trial_failures() -> None:
    """Ray Tune logs a failed trial with its whole traceback (tens of lines for a worker the OOM
    killer took) in the middle of the sweep's output. Keep its one line; the traceback stays in
    SWEEP/tune/TRIAL/error.txt and the sweep ends with one `error:` line per failed trial."""
    import logging

    class _NoTraceback(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if record.exc_info:
                record.msg = f"{record.getMessage()} (traceback: the trial's error.txt under SWEEP/tune/)"
                record.args, record.exc_info, record.exc_text = None, None, None
            return True

    logger = logging.getLogger("ray.tune.execution.tune_controller")
    if not any(type(f).__name__ == "_NoTraceback" for f in logger.filters):
        logger.addFilter(_NoTraceback())


def summarize(sweep: Sweep, grid, wall_s: float, failure: Optional[BaseException] = None) -> int:
    """results.csv, the table, best.yaml, compare.png and report.html from the trials' run
    directories, whatever happened to Ray (`failure`: what tuner.fit raised, or None); then one
    `error:` line (stderr) per failed trial and for Ray's own failure."""
    from rich.console import Console
    from rich.table import Table

    from toolkit import report

    sweep_dir = Path(sweep.dir)
    keys = load_space(sweep.space).keys
    rows = trial_rows(sweep, grid)
    columns = ["trial", "status", *keys, "epochs", "stopped_early", sweep.metric, f"best_{sweep.metric}", "test_acc",
               "train_time_s",
               "wall_s", "node", "run_dir", "error"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic_text(sweep_dir / "results.csv", buf.getvalue())
    table = Table(title=f"sweep {sweep.name}: {len(rows)} trials, {sweep.metric} ({sweep.mode}), {wall_s:.0f} s")
    for col in ["trial", "status", *keys, "epochs", sweep.metric, "test_acc"]:
        table.add_column(col, justify="left" if col in ("trial", "status") else "right")
    for r in rows:
        table.add_row(*[("-" if r[c] is None else f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]))
                        for c in ["trial", "status", *keys, "epochs", sweep.metric, "test_acc"]])
    console = Console(width=max(100, Console().width))
    console.print(table)
    finished = [r for r in rows if r["status"] == "done" and r[sweep.metric] is not None]
    if finished:
        best = finished[0]
        flat = best["_flat"]
        cfg = with_flat(sweep.base_config(), {**flat, "run.name": f"{sweep.name}-best"})
        text = (f"# Best trial {best['trial']} of sweep {sweep.name}: {sweep.metric} {best[sweep.metric]:.4g}, "
                f"test_acc {best['test_acc']}\n# accelerate launch toolkit/train.py --config "
                f"{sweep_dir / 'best.yaml'}\n" + to_yaml(cfg))
        write_atomic_text(sweep_dir / "best.yaml", text)
        console.print(f"best: {best['trial']} ({', '.join(f'{k}={v}' for k, v in flat.items())}) -> "
                      f"{sweep_dir / 'best.yaml'}")
    runs = [r for r in rows if RunDir(Path(r["run_dir"])).metrics.is_file()]
    if runs:
        try:  # a trial that did not finish shows its last values, marked by its status
            report.compare([Path(r["run_dir"]) for r in runs], sweep_dir,
                           status={r["run_dir"]: r["status"] for r in runs})
        except Exception as e:  # noqa: BLE001 (the results are written; a plot is not worth the exit code)
            console.print(f"warning: compare.png not written: {e}")
    console.print(f"results: {sweep_dir / 'results.csv'}; curves: {sweep_dir / 'compare.png'}; "
                  f"TensorBoard: tensorboard --logdir {sweep_dir / 'runs'}")
    failed = [r for r in rows if r["status"] == "error"]
    for r in failed:  # plain lines on stderr, last: never wrapped, never buried in the table
        print(f"error: trial {r['trial']} failed after {sweep.max_failures} retries: {r['error']} "
              f"(details: {sweep_dir / 'tune' / r['trial'] / 'error.txt'})", file=sys.stderr, flush=True)
    if failure is not None:
        text = str(failure).strip()
        print(f"error: Ray stopped the sweep: {type(failure).__name__}"
              f"{': ' + text.splitlines()[0][:200] if text else ''}; the results above are what the trials' run "
              f"directories hold; finish it with python -m toolkit.tune --resume --name {sweep.name}",
              file=sys.stderr, flush=True)
    return 1 if failed or failure is not None else 0


def main(argv: Optional[List[str]] = None) -> int:
    args = _parse(argv)
    try:
        if args.print_space_keys:
            print("\n".join(hparams(load_config(args.config, absolute_overrides(args.overrides)))))
            return 0
        sweep = load_sweep(args) if args.resume else make_sweep(args)
        if args.check_only:
            return 0
        return run_sweep(sweep, args.resume, args.address, args.num_cpus)
    except ToolkitError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"error: interrupted; finish the sweep with --resume --name {args.name or '<name>'}",
              file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
