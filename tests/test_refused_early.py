"""Errors the run can know before it starts are one line before the run directory exists, and a
finished run leaves no `.lock` behind."""

from __future__ import annotations

import shutil

import pytest

from helpers import DEMO, make_folder, ok, train

FOLDER_ARGS = ["model.name=simple_cnn", "data.name=imagefolder", "data.image_size=32", "data.batch_size=4",
               "data.eval_batch_size=4", "train.epochs=1", "sched.milestones=[]", "log.plots=false",
               "log.tensorboard=false"]


def _refused_before_anything(proc, run, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: config: "), proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    assert not run.exists(), sorted(p.name for p in run.iterdir())


@pytest.mark.slow
def test_one_class_folder_and_empty_split_are_refused_before_the_run_dir(tmp_path):
    data = make_folder(tmp_path / "data", {"train": 3, "val": 1, "test": 1})
    one = tmp_path / "one"
    shutil.copytree(data, one)
    for split in ("train", "val", "test"):
        for name in ("dog", "emu"):
            shutil.rmtree(one / split / name)
    run = tmp_path / "run"
    _refused_before_anything(train(["--config", DEMO, f"run.dir={run}", f"data.root={one}", *FOLDER_ARGS]), run,
                             "1 class(es)", "at least 2")
    for f in (data / "test").rglob("*.*"):  # a test split with no images left
        f.unlink()
    _refused_before_anything(train(["--config", DEMO, f"run.dir={run}", f"data.root={data}", *FOLDER_ARGS]), run,
                             "no images found in", "data/test")


@pytest.mark.slow
def test_batch_and_weights_errors_leave_no_run_dir(tmp_path):
    run = tmp_path / "run"
    base = ["--config", DEMO, f"run.dir={run}", "train.epochs=1", "sched.milestones=[]", "data.limit=40"]
    _refused_before_anything(train([*base, "data.batch_size=64"]), run, "data.batch_size: 64 is larger than")
    bad = tmp_path / "weights.pt"
    bad.write_bytes(b"not a weights file")
    proc = train([*base, "data.batch_size=8", f"model.pretrained={bad}"])
    assert proc.returncode != 0 and str(bad) in proc.stderr, proc.stderr
    assert not run.exists()


@pytest.mark.slow
def test_a_finished_run_leaves_no_lock(tmp_path):
    run = tmp_path / "run"
    ok(train(["--config", DEMO, f"run.dir={run}", "train.epochs=1", "sched.milestones=[]", "data.limit=40",
              "data.batch_size=8", "log.plots=false", "log.tensorboard=false"]))
    assert (run / "summary.json").is_file() and not (run / ".lock").exists()
