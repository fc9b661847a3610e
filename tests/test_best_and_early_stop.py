"""Best weights (train.monitor -> RUN/model_best.safetensors) and early stopping, through the CLI.

The run below trains two stages; the second's lr (0.5) wrecks the net in its last epoch, so the
best epoch is not the last one and the two weight files differ. Both survive a SIGKILL and
`train.resume=auto` exactly; early stopping stops at the same epoch with or without a kill."""

from __future__ import annotations

import pytest
import torch

from helpers import DEMO, assert_same_weights, metrics, ok, summary, train, weights
from toolkit import checkpoint

BASE = ["--config", DEMO, "data.limit=256", "data.batch_size=32", "sched.milestones=[]", "log.plots=false",
        "log.tensorboard=false", "train.keep_last=4"]
WRECK = "train.stages=[{epochs: 2}, {epochs: 2, optim: {lr: 0.5}}]"  # 8 steps per epoch


@pytest.mark.slow
def test_best_weights_are_kept_tested_and_survive_a_kill(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    ok(train([*BASE, WRECK, f"run.dir={whole}"]))
    s = summary(whole)
    epochs = [r for r in metrics(whole) if r["kind"] == "epoch"]
    best = max(epochs, key=lambda r: r["val_acc"])  # first of equals, as the run keeps it
    assert s["monitor"] == "val_acc" and s["best_epoch"] == best["epoch"] < 4
    assert s["best_metric"] == pytest.approx(best["val_acc"])
    last, kept = weights(whole / "model.safetensors"), weights(whole / "model_best.safetensors")
    assert not all(torch.equal(last[k], kept[k]) for k in last)
    # The best file holds the weights of the best epoch's end: its checkpoint's model.
    ckpt = whole / "checkpoints" / f"step_{best['step']}"
    assert_same_weights(ckpt / "model.safetensors", whole / "model_best.safetensors")
    assert checkpoint.verify(ckpt) is None and (ckpt / "model_best.safetensors").is_file()  # in the checksums
    assert s["tested_weights"] == "last" and s["test_acc_best"] is not None and s["test_acc_best"] != s["test_acc"]
    # Killed in the last epoch, after the best one: the resumed run keeps the same best weights.
    proc = train([*BASE, WRECK, f"run.dir={killed}"], env={"TOOLKIT_FAULT_KILL_AT_STEP": "28"})
    assert proc.returncode != 0
    ok(train([*BASE, WRECK, f"run.dir={killed}", "train.resume=auto"]))
    assert_same_weights(killed / "model_best.safetensors", whole / "model_best.safetensors")
    assert_same_weights(killed / "model.safetensors", whole / "model.safetensors")
    assert summary(killed)["test_acc_best"] == s["test_acc_best"]


@pytest.mark.slow
def test_early_stopping_stops_at_the_same_epoch_with_a_kill_and_per_stage(tmp_path):
    """min_delta 1.0 on val_acc: no epoch can improve by that much, so each stage stops after
    `patience` (1) epochs past its first: stage one (3 epochs) after epoch 2, stage two after
    its second epoch (its last anyway)."""
    stop = ["train.early_stop_patience=1", "train.early_stop_min_delta=1.0",
            "train.stages=[{epochs: 3}, {epochs: 2, optim: {lr: 0.005}}]"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    proc = ok(train([*BASE, *stop, f"run.dir={whole}"]))
    assert "early stop of stage 'stage0' after epoch 2" in proc.stdout
    assert [r["epoch"] for r in metrics(whole) if r["kind"] == "epoch"] == [1, 2, 4, 5]
    # One stage: the run itself stops, and says where.
    one = tmp_path / "one"
    proc = ok(train([*BASE, "train.epochs=4", "train.early_stop_patience=1", "train.early_stop_min_delta=1.0",
                     f"run.dir={one}"]))
    assert "early stop after epoch 2" in proc.stdout and summary(one)["stopped_early"] == 2
    assert [r["epoch"] for r in metrics(one) if r["kind"] == "epoch"] == [1, 2]
    # Killed in epoch 2 (steps 9-16), before the decision: the resumed run decides alike.
    assert train([*BASE, "train.epochs=4", "train.early_stop_patience=1", "train.early_stop_min_delta=1.0",
                  f"run.dir={killed}"], env={"TOOLKIT_FAULT_KILL_AT_STEP": "12"}).returncode != 0
    ok(train([*BASE, "train.epochs=4", "train.early_stop_patience=1", "train.early_stop_min_delta=1.0",
              f"run.dir={killed}", "train.resume=auto"]))
    assert summary(killed)["stopped_early"] == 2
    assert_same_weights(killed / "model.safetensors", one / "model.safetensors")
