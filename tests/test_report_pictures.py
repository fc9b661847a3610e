"""What the report's pictures and pages show (issue 18, item 5) and how it treats corrupt run files
(item 9): report functions on run directories written by hand, one small training run through
the CLI, and one small sweep whose trial worker is SIGKILLed (as the OOM killer would)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import DEMO, ROOT, child_env, metrics, ok, train
from toolkit import report


# --- run directories written by hand ---------------------------------------------------------

def write_run(path: Path, *, optim=None, sched=None, data=None, steps_per_epoch=10, epochs=3, lrs=None,
              every=2, summary=True, val=lambda e: 0.5 + 0.04 * e, loss=lambda x: 2.3 / (1 + 3 * x)) -> Path:
    """A run directory as the engine leaves it: config.yaml, metrics.jsonl (train rows every
    `every` updates with their 0-based `epoch`, epoch rows counted from 1) and summary.json."""
    path.mkdir(parents=True)
    cfg = {"run": {"name": path.name, "seed": 0},
           "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": False, "weight_decay": 5e-4,
                     "betas": [0.9, 0.999], "eps": None, "alpha": 0.99, "no_decay_norm_bias": False, **(optim or {})},
           "sched": {"name": "multistep", "milestones": [], "gamma": 0.1, "step_size": 1, "warmup_epochs": 0.0,
                     "min_lr_factor": 0.0, "pct_start": 0.25, **(sched or {})},
           "data": {"name": "digits", "batch_size": 32, **(data or {})}}
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    rows, step = [], 0
    for e in range(epochs):
        lr = lrs[e] if lrs else cfg["optim"]["lr"]
        for _ in range(steps_per_epoch):
            step += 1
            if step % every == 0:
                rows.append({"kind": "train", "step": step, "loss": loss(step / steps_per_epoch), "lr": lr,
                             "epoch": e})
        rows.append({"kind": "epoch", "step": step, "epoch": e + 1, "train_loss": loss(e + 1), "train_acc": val(e),
                     "val_loss": loss(e + 1) + 0.1, "val_acc": val(e), "val_top5": 0.99, "lr": lr})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary:
        (path / "summary.json").write_text(json.dumps({"test_acc": 0.9722, "test_top5": 0.9981,
                                                       "best_val_acc": max(val(e) for e in range(epochs)),
                                                       "epochs": epochs, "wall_s": 12.5}))
    return path


@pytest.fixture
def figures(monkeypatch):
    """The figures the report draws, kept open (its _save writes a PNG and closes them)."""
    kept = {}
    save = report._save

    def keep(fig, out):
        fig.canvas.draw()  # ticks and labels as they go into the PNG
        kept[Path(out).name] = fig  # closed by _save, still readable
        return save(fig, out)

    monkeypatch.setattr(report, "_save", keep)
    return kept


def _vertical_lines(ax):
    return [line for line in ax.lines if len(set(line.get_xdata())) == 1 and len(line.get_xdata()) == 2]


def test_runs_are_labelled_only_by_settings_their_optimizer_uses(tmp_path):
    """The optimizer space sets momentum 0.9 in the base config; Adam and Adagrad never read it."""
    dirs = [write_run(tmp_path / "a", optim={"name": "sgd", "momentum": 0.0}),
            write_run(tmp_path / "b", optim={"name": "sgd", "momentum": 0.9}),
            write_run(tmp_path / "c", optim={"name": "adam", "lr": 0.001}),
            write_run(tmp_path / "d", optim={"name": "adagrad", "lr": 0.01}),
            write_run(tmp_path / "e", optim={"name": "rmsprop", "lr": 0.001, "momentum": 0.0})]
    labels = report._label_runs([report.load_run(d) for d in dirs])
    assert "optim.name=adam" in labels[2] and "optim.lr=0.001" in labels[2] and "momentum" not in labels[2]
    assert "optim.name=adagrad" in labels[3] and "momentum" not in labels[3]
    assert labels[:2] == ["optim.lr=0.1, optim.momentum=0, optim.name=sgd",
                          "optim.lr=0.1, optim.momentum=0.9, optim.name=sgd"]
    assert "optim.momentum=0," in labels[4]  # RMSprop takes momentum
    assert len(set(labels)) == 5


def test_curves_mark_each_lr_change_with_the_new_rate(tmp_path, figures):
    """E1: milestones at epochs 5 and 8 (the lr column holds the rate each epoch trained with):
    dashed lines at 5 and 8 labelled with the new rate; a cosine schedule gets no forest of lines."""
    run = write_run(tmp_path / "step", epochs=10, lrs=[0.1] * 5 + [0.01] * 3 + [0.001] * 2)
    report.run_report(run)
    fig = figures["curves.png"]
    for ax in fig.axes[:2]:
        assert sorted(line.get_xdata()[0] for line in _vertical_lines(ax)) == [5, 8]
    texts = [t.get_text().strip() for t in fig.axes[0].texts]
    assert "lr 0.01" in texts and "lr 0.001" in texts
    assert report.lr_changes(report.load_run(run)) == [(5.0, 0.01), (8.0, 0.001)]

    cosine = write_run(tmp_path / "cos", epochs=10, lrs=[0.1 * (10 - e) / 10 for e in range(10)])
    report.run_report(cosine)
    assert not _vertical_lines(figures["curves.png"].axes[0])


def test_runs_with_different_batch_sizes_line_up_in_epochs(tmp_path, figures):
    """Batch 32 takes 10 updates an epoch, batch 64 takes 5: both loss curves span 3 epochs."""
    a = write_run(tmp_path / "b32", data={"batch_size": 32}, steps_per_epoch=10)
    b = write_run(tmp_path / "b64", data={"batch_size": 64}, steps_per_epoch=5, every=1)
    report.compare([a, b], tmp_path / "out")
    ax_loss = figures["compare.png"].axes[0]
    assert ax_loss.get_xlabel() == "epoch"
    spans = [(min(line.get_xdata()), max(line.get_xdata())) for line in ax_loss.lines if len(line.get_xdata()) > 1]
    assert spans == [(0.2, 3.0), (0.2, 3.0)]
    # the same loss at the same share of training lands at the same place
    xs = [report.step_epochs(report.load_run(d)) for d in (a, b)]
    assert xs[0][:3] == pytest.approx([0.2, 0.4, 0.6]) and xs[1][:3] == pytest.approx([0.2, 0.4, 0.6])


def test_fractional_epochs_follow_each_epochs_own_length(tmp_path):
    """A second stage with a larger batch (fewer updates an epoch), and an unfinished last epoch."""
    run = write_run(tmp_path / "r", steps_per_epoch=10, epochs=2, every=5)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rows += [{"kind": "train", "step": 22, "loss": 1.0, "lr": 0.1, "epoch": 2},
             {"kind": "train", "step": 24, "loss": 1.0, "lr": 0.1, "epoch": 2},
             {"kind": "epoch", "step": 24, "epoch": 3, "val_acc": 0.5, "train_loss": 1.0, "lr": 0.1},
             {"kind": "train", "step": 26, "loss": 1.0, "lr": 0.1, "epoch": 3}]  # epoch 4 not done
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert report.step_epochs(report.load_run(run)) == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5])


def test_loss_axis_ticks_are_plain_numbers(tmp_path, figures):
    """Losses from 2.3 down to ~0.02: a log axis whose labels read 0.05, 0.1, 0.2 ... (no 10^-1)."""
    a = write_run(tmp_path / "a", loss=lambda x: 2.3 * 0.2 ** x)
    b = write_run(tmp_path / "b", optim={"lr": 0.01})
    report.compare([a, b], tmp_path / "out")
    ax = figures["compare.png"].axes[0]
    low, high = ax.get_ylim()
    shown = [(t.get_position()[1], t.get_text()) for t in ax.get_yticklabels() if low <= t.get_position()[1] <= high]
    labels = [text for _, text in shown if text]
    assert len(labels) >= 3, shown
    for text in labels:
        float(text)  # "0.05", not "$\\mathdefault{10^{-1}}$"
    assert not [t for t in ax.get_yminorticklabels() if t.get_text()]


def test_stopped_trials_show_their_last_values_marked_stopped(tmp_path, figures):
    """An ASHA-stopped trial (1 epoch, no summary): a visible marker in both panels, and its last
    values in the table and page, with status `stopped`; no `None` anywhere; accuracies in %."""
    done = write_run(tmp_path / "done", epochs=4)
    stopped = write_run(tmp_path / "stopped", optim={"lr": 0.001}, epochs=1, summary=False, val=lambda e: 0.3125)
    # without a status (python -m toolkit.report SWEEP): a run with no test result is "unfinished"
    report.compare([done, stopped], tmp_path / "plain")
    page = (tmp_path / "plain" / "report.html").read_text()
    assert "None" not in page and "unfinished" in page and "31.25%" in page
    out = tmp_path / "sweep"  # a sweep says which trials ASHA stopped
    report.compare([done, stopped], out, status={str(stopped): "stopped", str(done): "done"})
    page = (out / "report.html").read_text()
    assert "None" not in page and "stopped" in page and "31.25%" in page
    assert "0.3125" not in page  # a fraction where the console prints %
    rows = list(csv.DictReader((out / "compare.csv").open()))
    row = [r for r in rows if r["dir"] == str(stopped)][0]
    assert row["status"] == "stopped" and float(row["val_acc"]) == 0.3125 and float(row["best_val_acc"]) == 0.3125
    md = (out / "compare.md").read_text()
    assert "stopped" in md and "31.25%" in md and "None" not in md
    fig = figures["compare.png"]
    for ax in fig.axes[:2]:
        marks = [line for line in ax.lines if line.get_marker() == "X"]
        assert len(marks) == 1 and marks[0].get_markersize() >= 8  # visible at its last point
    legend = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert any("stopped after epoch 1" in t for t in legend)


def test_report_page_shows_percent_and_the_config(tmp_path):
    run = write_run(tmp_path / "run", optim={"name": "adam", "lr": 0.003})
    report.run_report(run)
    page = (run / "report.html").read_text()
    assert "97.22%" in page and "99.81%" in page  # test_acc, test_top5
    assert "0.9722" not in page
    assert "<details>" in page and "name: adam" in page and "lr: 0.003" in page


def test_corrupt_run_files_are_skipped_in_one_line_each(tmp_path, capsys):
    """`python -m toolkit.report RUN` draws what it can; each file it cannot read is one
    `warning:` line naming it; no traceback."""
    run = write_run(tmp_path / "run")
    (run / "confusion_train.csv").write_text(",0,1\n0,5,1\n1,2,7\n")
    (run / "confusion_test.csv").write_text(",0,1\n0,5\n\x00garbage")
    (run / "embeddings.safetensors").write_bytes(b"not safetensors")
    (run / "summary.json").write_text('{"test_acc": 0.9')  # torn
    assert report.main([str(run)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3, err
    for name in ("summary.json", "confusion_test.csv", "embeddings.safetensors"):
        assert sum(name in line for line in err) == 1, (name, err)
    assert all(line.startswith("warning: report: skipped ") for line in err)
    assert (run / "curves.png").is_file() and (run / "confusion_train.png").is_file()
    assert not (run / "confusion_test.png").exists() and (run / "report.html").is_file()
    # a comparison skips them the same way
    write_run(tmp_path / "other")
    assert report.main([str(tmp_path)]) == 0
    assert (tmp_path / "compare" / "compare.png").is_file()


def test_tensorboard_gets_the_hparams_in_the_run_itself(tmp_path):
    """No second run named by a timestamp under tb/: the hparams are in tb/'s own event file."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    from toolkit.tracking import Tracker

    acc = Accelerator(cpu=True, log_with="tensorboard",
                      project_config=ProjectConfiguration(project_dir=str(tmp_path), logging_dir=str(tmp_path)))
    tracker = Tracker(acc, tmp_path, "none")
    tracker.start_trackers(["tensorboard"], {"optim.lr": 0.1, "optim.name": "sgd", "sched.milestones": [5, 8]})
    tracker.log("epoch", 3, {"val_acc": 0.5})
    acc.end_training()
    assert [p.name for p in (tmp_path / "tb").iterdir() if p.is_dir()] == []
    runs = EventMultiplexer().AddRunsFromDirectory(str(tmp_path / "tb"))
    runs.Reload()
    assert list(runs.Runs()) == ["."]
    assert "_hparams_/session_start_info" in runs.PluginRunToTagToContent("hparams")["."]
    assert "epoch/val_acc" in runs.GetAccumulator(".").Tags()["scalars"]


def test_the_sweep_driver_writes_its_results_from_the_run_directories_when_ray_fails(tmp_path, capsys):
    """tuner.fit raised (Ray itself failed): results.csv, best.yaml, compare.png and report.html
    still come from SWEEP/runs/*, and the output ends with one line for the failure, exit 1."""
    from toolkit.tune import Sweep, summarize

    sweep_dir = tmp_path / "sweep"
    space = tmp_path / "lrs.yaml"
    space.write_text("grid:\n  optim.lr: [0.1, 0.01]\n")
    write_run(sweep_dir / "runs" / "t_00000", optim={"lr": 0.1}, val=lambda e: 0.9)
    write_run(sweep_dir / "runs" / "t_00001", optim={"lr": 0.01}, epochs=1, summary=False, val=lambda e: 0.4)
    sweep = Sweep(name="s", dir=str(sweep_dir), config=DEMO, overrides=[], space=str(space), num_samples=None,
                  scheduler="asha", metric="val_acc", mode="max", max_concurrent=None, cpus_per_trial=1.0,
                  gpus_per_trial=0.0, workers_per_trial=1, max_failures=2, grace_period=1,
                  perturbation_interval=2, seed=0)
    assert summarize(sweep, None, 3.0, RuntimeError("the raylet died\nmore Ray detail")) == 1
    rows = {r["trial"]: r for r in csv.DictReader((sweep_dir / "results.csv").open())}
    assert rows["t_00000"]["status"] == "done" and float(rows["t_00000"]["optim.lr"]) == 0.1
    assert rows["t_00001"]["status"] == "unfinished" and float(rows["t_00001"]["val_acc"]) == 0.4
    assert yaml.safe_load((sweep_dir / "best.yaml").read_text())["optim"]["lr"] == 0.1
    assert (sweep_dir / "compare.png").is_file() and "unfinished" in (sweep_dir / "report.html").read_text()
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: Ray stopped the sweep: RuntimeError: the raylet died; the results above are what the "
                   "trials' run directories hold; finish it with python -m toolkit.tune --resume --name s"]


# --- through the CLIs ------------------------------------------------------------------------

@pytest.mark.slow
def test_a_trained_run_marks_its_lr_drop_and_leaves_one_tensorboard_run(tmp_path):
    """A real run with a milestone: curves.png's lines sit where metrics.jsonl's lr changes, the
    page shows % and the config, and tb/ holds one run (its hparams included)."""
    run = tmp_path / "run"
    ok(train(["--config", DEMO, "train.epochs=3", "sched.milestones=[2]", "data.limit=300", "log.embed_max=50",
              f"run.dir={run}"]))
    epochs = [r for r in metrics(run) if r["kind"] == "epoch"]
    changes = report.lr_changes(report.load_run(run))
    # milestone 2: the third epoch trained at the new rate, marked after epoch 2
    assert changes == [(2.0, pytest.approx(epochs[-1]["lr"]))] and epochs[-1]["lr"] < epochs[0]["lr"]
    page = (run / "report.html").read_text()
    assert "%" in page and "<details>" in page and "milestones" in page
    assert [p for p in (run / "tb").iterdir() if p.is_dir()] == []  # no `tb/<timestamp>/` run
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 1


@pytest.mark.slow
@pytest.mark.xdist_group("clusters")  # a local Ray instance, as tests/test_tune.py
def test_a_sweep_whose_trial_worker_is_killed_still_writes_its_results(tmp_path):
    """SIGKILL of a trial's worker process (what the OOM killer does): the sweep writes
    results.csv, compare.png and report.html from the trials' run directories, prints no Ray
    traceback, and ends with one `error:` line for the trial, exit 1."""
    space = tmp_path / "lrs.yaml"
    space.write_text("grid:\n  optim.lr: [0.01, 0.05]\n")
    cmd = [sys.executable, "-m", "toolkit.tune", "--storage", str(tmp_path / "sweeps"), "--num-cpus", "2",
           "--config", DEMO, "--space", str(space), "--name", "oom", "--scheduler", "fifo", "--max-concurrent", "1",
           "--max-failures", "0", "train.epochs=3", "data.limit=240", "sched.milestones=[]", "log.plots=false",
           "log.every_n_steps=2"]
    driver = subprocess.Popen(cmd, cwd=ROOT, env=child_env({"TOOLKIT_FAULT_STEP_SLEEP": "0.15"}),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    sweep = tmp_path / "sweeps" / "oom"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:  # the first trial, past its first epoch
            ready = [p for p in (sweep / "runs").glob("*/trial.json") if list(p.parent.glob("checkpoints/step_*"))]
            if ready:
                break
            assert driver.poll() is None, "the sweep ended before its trial could be killed"
            time.sleep(0.1)
        else:
            pytest.fail("no trial reached its first checkpoint in time")
        killed = ready[0].parent.name
        os.kill(json.loads(ready[0].read_text())["pid"], signal.SIGKILL)
        out, err = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    assert driver.returncode == 1, err[-2000:]
    assert "Traceback" not in out + err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: trial {killed} failed after 0 retries: its process died"), last
    rows = {r["trial"]: r for r in csv.DictReader((sweep / "results.csv").open())}
    assert rows[killed]["status"] == "error" and int(rows[killed]["epochs"]) >= 1 and rows[killed]["val_acc"]
    assert [r["status"] for t, r in rows.items() if t != killed] == ["done"]
    assert (sweep / "compare.png").stat().st_size > 10_000
    page = (sweep / "report.html").read_text()
    assert "error" in page and "None" not in page
