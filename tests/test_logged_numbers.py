"""The numbers a run logs are the ones it trained with (E1/E2 read exactly these)."""

from __future__ import annotations

import pytest

from helpers import DEMO, metrics, ok, summary, train

BASE = ["--config", DEMO, "train.epochs=3", "data.limit=128", "data.batch_size=32", "log.every_n_steps=1",
        "log.plots=false"]


@pytest.mark.slow
def test_lr_column_is_the_rate_the_logged_steps_used(tmp_path):
    """Milestone at epoch 2 (lr x0.1 from the third epoch on). Up to the drop, the run trains
    exactly as a run without the milestone, so its rows (loss and lr) must equal that run's; the
    third epoch's rows show the lower rate. TensorBoard gets the same rows (tracking.Tracker)."""
    step, flat = tmp_path / "step", tmp_path / "flat"
    proc = ok(train([*BASE, f"run.dir={step}", "sched.milestones=[2]"]))
    ok(train([*BASE, f"run.dir={flat}", "sched.milestones=[]"]))
    rows = {r["step"]: r for r in metrics(step) if r["kind"] == "train"}
    same = {r["step"]: r for r in metrics(flat) if r["kind"] == "train"}
    epochs = [r for r in metrics(step) if r["kind"] == "epoch"]
    last_before_drop = epochs[1]["step"]
    for s, r in rows.items():
        want = 0.01 if s <= last_before_drop else 0.001
        assert r["lr"] == pytest.approx(want), (s, r["lr"])
        if s <= last_before_drop:
            assert (r["loss"], r["lr"]) == (same[s]["loss"], same[s]["lr"])
    assert [round(r["lr"], 8) for r in epochs] == [0.01, 0.01, 0.001]
    assert epochs[1]["train_loss"] == [r for r in metrics(flat) if r["kind"] == "epoch"][1]["train_loss"]
    # The steady rate leaves the warm-up epoch out; the whole-run rate is there too, and the
    # console line says which one it shows.
    s = summary(step)
    assert s["images_per_s_from_epoch"] == 2 and s["images_per_s"] > 0 and s["images_per_s_whole_run"] > 0
    assert "img/s (from epoch 2)" in proc.stdout


def test_progress_bar_keeps_the_last_logged_loss(tmp_path):
    """The engine passes a loss only on log steps; the bar shows the last one in between (and
    carries it into the next epoch's bar) instead of `-`."""
    from types import SimpleNamespace

    from toolkit.tracking import Tracker

    tracker = Tracker(SimpleNamespace(is_main_process=True, trackers=[]), tmp_path, progress="rich")
    tracker.start_epoch(0, 2, total=10)
    shown = lambda: tracker._progress.tasks[-1].fields["loss"]  # noqa: E731
    assert shown() == "-"
    tracker.advance(1, 100.0, 0.5)
    tracker.advance(1, 100.0, None)
    assert shown() == "0.5000"
    tracker.end_epoch()
    tracker.start_epoch(1, 2, total=10)
    assert shown() == "0.5000"
    tracker.close()
