"""toolkit.clean: folds, the subset, data.exclude, the out-of-fold probabilities, resume, --parallel."""

from __future__ import annotations

import csv
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import DEMO, ROOT, build_imagefolder, child_env, make_folder, ok, refused_in_process, run_module, summary
from toolkit import clean, rundir
from toolkit.config import load_config, with_flat
from toolkit.data.base import TensorImageDataset
from toolkit.data.imagefolder import ImageFolderDataset
from toolkit.data.subset import source_index, take
from toolkit.engine.fit import load_data
from toolkit.engine.holdout import assign_folds, check_folds, read_exclusions, select_training
from toolkit.errors import ConfigError, ToolkitError

# A clean job small enough for the suite: 240 training digits, 3 folds of one epoch, 30% noise.
FOLDS = 3
TINY = ["data.limit=240", "train.epochs=1", "sched.milestones=[]", "log.plots=false", "data.label_noise=0.3",
        "data.batch_size=32"]


def clean_cli(args, env=None, timeout=300):
    return run_module("toolkit.clean", [str(a) for a in args], env=env, timeout=timeout)


def rows(path: Path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --- folds, subsets, exclusions: no CLI ------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3, 5])
def test_folds_cover_every_sample_once_and_are_stratified(k):
    labels = torch.tensor([c for c, n in enumerate([7, 12, 5, 30]) for _ in range(n)])[torch.randperm(54)]
    folds = assign_folds(labels, k, seed=3)
    assert folds.shape == labels.shape and set(folds.tolist()) == set(range(k))  # one fold per sample
    sizes = torch.bincount(folds, minlength=k)
    assert int(sizes.max() - sizes.min()) <= 1
    for c in range(4):  # each class spread as evenly as its size allows
        per = torch.bincount(folds[labels == c], minlength=k)
        assert int(per.max() - per.min()) <= 1, (c, per)
    assert torch.equal(folds, assign_folds(labels, k, seed=3))  # seeded
    assert not torch.equal(folds, assign_folds(labels, k, seed=4))


def test_more_folds_than_the_smallest_class_is_one_line():
    labels = torch.tensor([0] * 9 + [1] * 2 + [2] * 5)
    check_folds(labels, 2, ["a", "b", "c"])
    with pytest.raises(ConfigError) as e:
        check_folds(labels, 3, ["a", "b", "c"])
    assert "class 'b' has 2" in str(e.value) and "\n" not in str(e.value)


def test_take_keeps_a_tensor_set_what_the_engine_needs():
    images = torch.arange(6 * 3 * 4 * 4, dtype=torch.uint8).view(6, 3, 4, 4)
    ds = TensorImageDataset(images, torch.tensor([0, 1, 2, 0, 1, 2]), mean=[0.5] * 3, std=[0.25] * 3)
    ds._device_copy = ("cpu", None, None, ds.labels)
    sub = take(ds, torch.tensor([1, 4, 5]))
    assert isinstance(sub, TensorImageDataset) and len(sub) == 3  # the device loader's isinstance check
    assert torch.equal(sub.labels, torch.tensor([1, 1, 2])) and torch.equal(sub.images, images[[1, 4, 5]])
    assert not hasattr(sub, "_device_copy") and len(ds) == 6 and hasattr(ds, "_device_copy")
    x, y = sub.__getitems__([0, 2])
    assert torch.equal(x, ds.__getitems__([1, 5])[0]) and torch.equal(y, torch.tensor([1, 2]))
    assert sub.device_items() is sub.norm and sub.raw_items and not ds.raw_items  # its own switch
    assert torch.equal(source_index(take(sub, torch.tensor([2, 0]))), torch.tensor([5, 1]))  # composes


def test_take_keeps_an_image_folder_paths(tmp_path):
    splits = build_imagefolder(make_folder(tmp_path / "f"))
    sub = take(splits.train, torch.tensor([0, 7]))
    assert isinstance(sub, ImageFolderDataset)
    assert list(sub.paths) == [splits.train.paths[0], splits.train.paths[7]]
    assert torch.equal(sub.labels, splits.train.labels[[0, 7]])
    assert torch.equal(sub[1][0], splits.train[7][0])
    with pytest.raises(ValueError):  # the labels setter still checks against the subset's paths
        sub.labels = torch.zeros(5, dtype=torch.int64)


def _issues(tmp_path: Path, lines):
    path = tmp_path / "issues.csv"
    path.write_text("rank,index,path,given,score\n" + "".join(f"{r},{i},,{g},0.1\n" for r, (i, g) in enumerate(lines, 1)))
    return path


def test_exclusions_are_read_checked_and_recorded(tmp_path):
    labels = torch.tensor([0, 1, 2, 0, 1])
    path = _issues(tmp_path, [(4, 1), (0, 0), (2, 2)])
    rec = read_exclusions(str(path), None, labels)
    assert rec["index"] == [0, 2, 4] and rec["num_excluded"] == 3 and rec["sha256"] == rundir.sha256(path)
    assert read_exclusions(str(path), 2, labels)["index"] == [0, 4]  # the first (most suspect) rows
    for lines, needle in (([(5, 0)], "outside the training split"), ([(1, 0)], "made for other data")):
        with pytest.raises(ConfigError) as e:
            read_exclusions(str(_issues(tmp_path, lines)), None, labels)
        assert needle in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="no such file"):
        read_exclusions(str(tmp_path / "missing.csv"), None, labels)
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ConfigError, match="no `index` column"):
        read_exclusions(str(tmp_path / "other.csv"), None, labels)


@pytest.mark.parametrize("override,needle", [
    ("data.holdout_folds=1", "data.holdout_folds: must be 0 (off) or >= 2"),
    ("data.holdout_fold=3", "data.holdout_fold: must be in [0, data.holdout_folds=0)"),
    ("data.exclude_top=5", "data.exclude_top: must be >= 1 and needs data.exclude"),
])
def test_bad_holdout_and_exclude_settings_are_one_line(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(DEMO, [override])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_select_training_drops_the_fold_and_the_excluded_after_the_noise(tmp_path):
    cfg = load_config(DEMO, ["data.limit=240", "data.label_noise=0.3"])
    whole, _, noise, _ = load_data(cfg.data, None, clean.NoAccelerator())
    labels = whole.train.labels  # the noisy labels: folds are cut by what the run trains with
    path = _issues(tmp_path, [(i, int(labels[i])) for i in (0, 1, 2, 3)])
    d = with_flat(cfg, {"data.holdout_folds": 3, "data.holdout_fold": 1, "data.exclude": str(path)}).data
    splits, _, noise2, sel = load_data(d, None, clean.NoAccelerator())
    assert noise2 == noise
    held = set(torch.nonzero(assign_folds(labels, 3, 0) == 1).flatten().tolist())
    assert set(source_index(sel.holdout).tolist()) == held
    assert torch.equal(sel.holdout.labels, labels[sorted(held)])
    trained = set(source_index(splits.train).tolist())
    assert trained == set(range(240)) - held - {0, 1, 2, 3}
    assert sel.summary_fields() == {"num_excluded": 4, "holdout_folds": 3, "holdout_fold": 1,
                                    "num_held_out": len(held)}


# --- bad input: one line, exit 2, nothing written ----------------------------------------------


def test_clean_refuses_bad_input_in_one_line(capsys, tmp_path):
    out = tmp_path / "c"
    refused_in_process(capsys, clean.main, ["--config", DEMO, "--folds", 1, "--dir", out], "--folds: must be >= 2")
    refused_in_process(capsys, clean.main, ["--config", DEMO, "--folds", 5, "--dir", out, "data.limit=20"],
                       "data.holdout_folds: 5 folds need at least 5 training samples of every class")
    refused_in_process(capsys, clean.main, ["--config", DEMO, "--dir", out, f"run.dir={tmp_path}"],
                       "toolkit.clean sets run.*")
    refused_in_process(capsys, clean.main, ["--config", DEMO, "--dir", out, "data.exclude=x.csv"], "no data.exclude")
    assert not out.exists()
    folder = make_folder(tmp_path / "noval", {"train": 6, "test": 2})
    refused_in_process(capsys, clean.main, ["--config", DEMO, "--folds", 2, "--dir", out, "data.name=imagefolder",
                                            f"data.root={folder}", "data.image_size=32"], "val not found")
    assert not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    refused_in_process(capsys, clean.main, ["--config", DEMO, "--folds", 2, "--dir", out, *TINY],
                       "not a toolkit.clean directory")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_sequential_folds_train_with_the_threads_of_a_parallel_trial(monkeypatch, tmp_path):
    """CPU kernels sum in a thread-count-dependent order: the sequential mode pins torch's threads
    to --cpus-per-trial (what Ray gives a trial), so both modes compute alike, then restores them."""
    fit_module = importlib.import_module("toolkit.engine.fit")  # (toolkit.engine's `fit` is the function)

    seen = []
    monkeypatch.setattr(fit_module, "fit", lambda cfg: seen.append(
        (torch.get_num_threads(), cfg.data.holdout_folds, cfg.data.holdout_fold, Path(cfg.run.dir).name,
         cfg.train.resume)) or {"test_acc": 0.5})
    sweep, _ = clean.make_sweep(clean.parse_args(["--config", DEMO, "--folds", "2", "--dir", str(tmp_path / "c")]))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(ToolkitError, match="did not finish"):  # the stand-in wrote no probabilities
            clean.run_folds(sweep, 2, parallel=False, num_cpus=None)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert seen == [(1, 2, 0, "fold_0", "auto"), (1, 2, 1, "fold_1", "auto")]


# --- one clean job, shared by the checks below --------------------------------------------------


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "job"
    proc = ok(clean_cli(["--config", DEMO, "--folds", FOLDS, "--dir", out, "--top", 16, *TINY]))
    return out, proc


@pytest.mark.slow
def test_every_training_sample_is_predicted_once_by_a_model_that_did_not_train_on_it(job):
    out, _ = job
    seen = []
    for k in range(FOLDS):
        run = out / rundir.CLEAN_RUNS / f"fold_{k}"
        held = load_file(str(run / rundir.HOLDOUT_PROBS))
        # what that run trained on, rebuilt from its own config.yaml
        splits, _, _, _ = load_data(load_config(str(run / rundir.CONFIG)).data, None, clean.NoAccelerator())
        trained = set(source_index(splits.train).tolist())
        assert not trained & set(held["index"].tolist())
        assert len(trained) + len(held["index"]) == 240 and summary(run)["num_held_out"] == len(held["index"])
        assert torch.allclose(held["probs"].sum(dim=1), torch.ones(len(held["index"])), atol=1e-5)
        seen += held["index"].tolist()
    assert sorted(seen) == list(range(240))
    oof = load_file(str(out / rundir.OOF_PROBS))
    assert torch.equal(oof["index"], torch.arange(240))


@pytest.mark.slow
def test_the_csv_ranks_the_flagged_and_the_summary_scores_them_against_the_noise(job):
    out, proc = job
    table = rows(out / rundir.LABEL_ISSUES)
    s = json.loads((out / rundir.SUMMARY).read_text())
    noise = json.loads((out / rundir.CLEAN_RUNS / "fold_0" / rundir.LABEL_NOISE).read_text())
    oof = load_file(str(out / rundir.OOF_PROBS))
    assert len(table) == s["num_flagged"] > 0
    assert [int(r["rank"]) for r in table] == list(range(1, len(table) + 1))
    scores = [float(r["score"]) for r in table]
    assert scores == sorted(scores)  # self-confidence, lowest first
    for r in table[:5]:
        i = int(r["index"])
        assert int(r["given"]) == int(oof["labels"][i]) and int(r["suggested"]) == int(oof["probs"][i].argmax())
        assert float(r["score"]) == pytest.approx(float(oof["probs"][i, int(r["given"])]), abs=1e-5)
    flagged = {int(r["index"]) for r in table}
    hit = len(flagged & set(noise["index"]))
    assert s["label_noise"]["precision"] == pytest.approx(hit / len(flagged))
    assert s["label_noise"]["recall"] == pytest.approx(hit / len(noise["index"]))
    assert (out / rundir.LABEL_ISSUES_GRID).stat().st_size > 1000
    assert "precision" in proc.stdout and "data.exclude=" in proc.stdout


@pytest.mark.slow
def test_data_exclude_trains_without_the_flagged_and_records_them(job, tmp_path):
    out, _ = job
    run = tmp_path / "run"
    ok(run_module("toolkit.train", ["--config", DEMO, *TINY, f"run.dir={run}",
                                    f"data.exclude={out / rundir.LABEL_ISSUES}", "data.exclude_top=10"]))
    rec = json.loads((run / rundir.EXCLUDED).read_text())
    top = [int(r["index"]) for r in rows(out / rundir.LABEL_ISSUES)[:10]]
    assert rec["index"] == sorted(top) and rec["sha256"] == rundir.sha256(out / rundir.LABEL_ISSUES)
    assert summary(run)["num_excluded"] == 10


@pytest.mark.slow
def test_a_killed_clean_resumes_and_redoes_no_finished_fold(tmp_path):
    out = tmp_path / "job"
    cmd = [sys.executable, "-m", "toolkit.clean", "--config", DEMO, "--folds", FOLDS, "--dir", out, *TINY,
           "train.checkpoint_every_steps=2"]
    driver = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=child_env({"TOOLKIT_FAULT_STEP_SLEEP": "0.2"}),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    runs = out / rundir.CLEAN_RUNS
    deadline = time.time() + 240
    while time.time() < deadline:  # fold 0 finished, fold 1 has a checkpoint
        if clean.fold_done(runs / "fold_0") and list(runs.glob("fold_1/checkpoints/step_*")):
            break
        assert driver.poll() is None, "the job ended before it could be interrupted"
        time.sleep(0.05)
    else:
        pytest.fail("fold 1 never reached a checkpoint")
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()

    def files(run):  # RUN/.lock is taken and released by every look at a run
        return {f.name: f.stat().st_mtime_ns for f in run.rglob("*") if f.is_file() and f.name != ".lock"}

    before = files(runs / "fold_0")
    proc = ok(clean_cli(["--config", DEMO, "--folds", FOLDS, "--dir", out, *TINY, "train.checkpoint_every_steps=2"]))
    assert f"fold 1/{FOLDS}: finished, kept" in proc.stdout
    assert files(runs / "fold_0") == before
    assert summary(runs / "fold_1")["resumed_from"] is not None
    assert len(rows(out / rundir.LABEL_ISSUES)) > 0
    # the same directory for other settings is refused, not mixed
    bad = clean_cli(["--config", DEMO, "--folds", FOLDS, "--dir", out, *TINY])
    assert bad.returncode == 2 and "holds a clean job of other settings" in bad.stderr


@pytest.mark.slow
def test_an_image_folder_job_lists_paths(tmp_path):
    folder = make_folder(tmp_path / "f", {"train": 8, "val": 2, "test": 2})
    out = tmp_path / "job"
    ok(clean_cli(["--config", DEMO, "--folds", 2, "--dir", out, "data.name=imagefolder", f"data.root={folder}",
                  "data.image_size=32", "data.batch_size=4", "data.eval_batch_size=8", "train.epochs=1",
                  "log.plots=false", "data.augment=none"]))
    oof = load_file(str(out / rundir.OOF_PROBS))
    assert len(oof["index"]) == 24
    for r in rows(out / rundir.LABEL_ISSUES):
        assert Path(r["path"]).is_file() and Path(r["path"]).is_relative_to(folder)


@pytest.mark.slow
@pytest.mark.xdist_group("clusters")
def test_parallel_folds_give_the_same_csv_as_one_after_another(tmp_path):
    # Its own small pair (2 folds of 160 digits), so the Ray chain does not wait for the module's job.
    small = [*TINY, "data.limit=160"]
    seq, par = tmp_path / "seq", tmp_path / "par"
    ok(clean_cli(["--config", DEMO, "--folds", 2, "--dir", seq, *small]))
    proc = ok(clean_cli(["--config", DEMO, "--folds", 2, "--dir", par, "--parallel", "--num-cpus", 2, *small],
                        timeout=420))
    assert (par / rundir.LABEL_ISSUES).read_text() == (seq / rundir.LABEL_ISSUES).read_text()
    a, b = load_file(str(seq / rundir.OOF_PROBS)), load_file(str(par / rundir.OOF_PROBS))
    assert len(a["index"]) == 160 and torch.allclose(a["probs"], b["probs"], atol=1e-5)
    assert sorted(p.name for p in (par / rundir.CLEAN_RUNS).iterdir()) == ["fold_0", "fold_1"]
    assert (par / "results.csv").is_file() and "flagged" in proc.stdout  # toolkit.tune's machinery ran it
