"""What a fresh run may write into, and which config a resumed run continues with.

- A fresh run writes only into an empty or absent run.dir: a user's files, another run's
  weights or summary are named in one line and left untouched.
- `train.resume=auto run.dir=X` (what the stop hint prints) continues with the run's own config,
  taken from its checkpoint: no --config needed. Overrides that would change what the checkpoint
  means are refused with the keys named; more epochs, logging and saving cadence may change.
- `${...}` interpolations in values are refused: the run records exactly what the user wrote.
"""

from __future__ import annotations

import pytest
import yaml

from helpers import DEMO, assert_same_weights, ok, summary, train
from toolkit.config import load_config
from toolkit.errors import ConfigError

SHORT = ["train.epochs=2", "sched.milestones=[]", "data.limit=128", "log.tensorboard=false", "log.plots=false",
         "data.batch_size=32"]


def _one_error_line(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.mark.slow
def test_fresh_run_refuses_a_directory_with_files_it_did_not_write(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    (run / "summary.json").write_text('{"test_acc": 0.5}')
    line = _one_error_line(train(["--config", DEMO, f"run.dir={run}", *SHORT]), "notes.txt", "summary.json")
    assert "not empty" in line
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt", "summary.json"]
    assert (run / "summary.json").read_text() == '{"test_acc": 0.5}'


@pytest.mark.slow
def test_fresh_run_never_overwrites_the_weights_it_starts_from(tmp_path):
    """model.pretrained pointing into run.dir: the run would overwrite the weights it loads."""
    first = tmp_path / "first"
    ok(train(["--config", DEMO, f"run.dir={first}", *SHORT]))
    weights = (first / "model.safetensors").read_bytes()
    proc = train(["--config", DEMO, f"run.dir={first}", f"model.pretrained={first / 'model.safetensors'}",
                  *SHORT])
    _one_error_line(proc, "model.safetensors", "train.resume=auto")
    assert (first / "model.safetensors").read_bytes() == weights
    # Also with train.resume=auto and the checkpoints gone: summary and weights are not a new run's.
    import shutil
    shutil.rmtree(first / "checkpoints")
    _one_error_line(train(["--config", DEMO, f"run.dir={first}", "train.resume=auto", *SHORT]),
                    "model.safetensors", "summary.json")
    assert (first / "model.safetensors").read_bytes() == weights


@pytest.mark.slow
def test_resume_without_the_config_continues_the_run_it_was(tmp_path):
    """The stop hint's command, exactly: no --config. The run keeps its batch size, augmentation
    and schedule; more epochs are applied and recorded; the weights equal an uninterrupted run."""
    run, whole = tmp_path / "run", tmp_path / "whole"
    ok(train(["--config", DEMO, f"run.dir={run}", *SHORT]))
    proc = ok(train(["train.resume=auto", f"run.dir={run}", "train.epochs=3"]))
    assert "resume: the checkpoint's config, with train.epochs: 2 -> 3" in proc.stdout
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["batch_size"] == 32 and saved["data"]["augment"] == "crop"
    assert saved["train"]["epochs"] == 3 and saved["run"]["name"] == "digits_lenet"
    assert saved["run"]["dir"] == str(run)  # where it ran, not null
    assert summary(run)["epochs"] == 3
    ok(train(["--config", DEMO, f"run.dir={whole}", *SHORT, "train.epochs=3"]))
    assert_same_weights(run / "model.safetensors", whole / "model.safetensors")


@pytest.mark.slow
def test_resume_refuses_overrides_that_change_what_the_checkpoint_means(tmp_path):
    run = tmp_path / "run"
    ok(train(["--config", DEMO, f"run.dir={run}", *SHORT]))
    before = (run / "config.yaml").read_bytes()
    line = _one_error_line(train(["train.resume=auto", f"run.dir={run}", "data.batch_size=64", "optim.lr=0.1",
                                  "train.epochs=3"]),
                           "data.batch_size (32 -> 64)", "optim.lr (0.01 -> 0.1)")
    assert "train.epochs" not in line  # allowed to change: not named
    _one_error_line(train(["train.resume=auto", f"run.dir={run}", "train.epochs=1"]),
                    "train.epochs: 1 is fewer than the 2 epochs")
    # The same config file and overrides again (a requeued job) is not a change.
    ok(train(["--config", DEMO, f"run.dir={run}", *SHORT, "train.resume=auto"]))
    assert (run / "config.yaml").read_bytes().replace(b"resume: auto", b"resume: none") == before


@pytest.mark.parametrize("override", ["data.root=${oc.env:HOME}", "run.name=x${run.seed}",
                                      "train.stages=[{name: '${oc.env:USER}'}]"])
def test_interpolation_is_refused(override):
    with pytest.raises(ConfigError, match=r"looks like an interpolation"):
        load_config(DEMO, [override])


def test_interpolation_in_a_config_file_is_refused(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  root: ${oc.env:HOME}/data\n")
    with pytest.raises(ConfigError, match=r"^config: data.root: '\$\{oc.env:HOME\}/data' looks like an interp"):
        load_config(str(f))


@pytest.mark.slow
def test_a_checkpoint_from_another_version_is_one_line(tmp_path):
    """trainer_state.json with a key this version does not know: the file and the key are named."""
    import json

    from toolkit import checkpoint

    run = tmp_path / "run"
    ok(train(["--config", DEMO, f"run.dir={run}", *SHORT, "train.epochs=1"]))
    (ckpt,) = checkpoint.list_checkpoints(run / "checkpoints")
    state_file = ckpt / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["from_the_future"] = 1
    state_file.write_text(json.dumps(state))
    marker = json.loads((ckpt / "COMPLETE.json").read_text())  # as a future version would have written it
    marker["files"]["trainer_state.json"] = {"size": state_file.stat().st_size, "sha256": checkpoint.sha256(state_file)}
    (ckpt / "COMPLETE.json").write_text(json.dumps(marker))
    proc = train([f"run.dir={run}", "train.resume=auto", "train.epochs=2"])
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: cannot resume from {ckpt}: {state_file} has key(s) from_the_future that this version of the "
        "toolkit does not know (written by another version?)"]
