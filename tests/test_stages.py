"""Multi-stage training (E4's two-stage triplet recipe): config resolution, what each stage
trains, and resume across a stage boundary (1 process and 2 DDP processes)."""

from __future__ import annotations

import pytest
import torch

from helpers import DEMO, assert_same_weights, launch, metrics, ok, summary, train, weights
from toolkit import checkpoint
from toolkit.config import load_config, resolve_stages, stage_at, with_flat
from toolkit.errors import ConfigError

TWO_STAGES = ("train.stages=[{name: features, epochs: 2, freeze: classifier, loss: {name: triplet}, "
              "data: {sampler: pk, pk_k: 4}}, "
              "{name: head, epochs: 2, freeze: backbone, loss: {name: cross_entropy}, "
              "optim: {lr: 0.05, momentum: 0.0}, sched: {name: multistep, milestones: [1]}}]")
BASE = ["--config", DEMO, "sched.milestones=[]", "log.tensorboard=false", "train.keep_last=20"]


def test_stages_resolve_onto_the_top_level_settings():
    cfg = load_config(DEMO, ["sched.milestones=[]", TWO_STAGES])
    assert cfg.train.epochs == 4  # derived from the stages
    a, b = resolve_stages(cfg)
    assert (a.name, a.start, a.end, a.cfg.train.epochs) == ("features", 0, 2, 2)
    assert (a.cfg.loss.name, a.cfg.model.freeze, a.cfg.data.sampler, a.cfg.optim.lr) == ("triplet", "classifier", "pk", 0.01)
    assert (b.name, b.start, b.end) == ("head", 2, 4)
    assert (b.cfg.loss.name, b.cfg.model.freeze, b.cfg.data.sampler) == ("cross_entropy", "backbone", "random")
    assert (b.cfg.optim.lr, b.cfg.optim.momentum, b.cfg.sched.milestones) == (0.05, 0.0, [1])
    assert b.cfg.optim.weight_decay == cfg.optim.weight_decay  # unset keys come from the top level
    assert [stage_at([a, b], e).name for e in range(5)] == ["features", "features", "head", "head", "head"]
    (only,) = resolve_stages(load_config(DEMO))
    assert (only.name, only.start, only.end) == ("main", 0, 20)


def test_a_sweep_can_replace_the_stages():
    cfg = load_config(DEMO, ["sched.milestones=[]", TWO_STAGES])
    new = with_flat(cfg, {"train.stages": [{"epochs": 3}]})
    assert new.train.epochs == 3 and resolve_stages(new)[0].name == "stage0"


def test_a_stage_drops_its_milestones_past_its_end():
    cfg = load_config(DEMO, ["sched.milestones=[]", "train.stages=[{epochs: 2, sched: {milestones: [2]}}]"])
    (stage,) = resolve_stages(cfg)
    assert stage.cfg.sched.milestones == [] and stage.notes == [
        "train.stages[0].sched.milestones: [2] at or past the end of the run's 2 epoch(s): dropped"]


@pytest.mark.parametrize("override, expected", [
    ("train.stages=[{epochs: 0}]", "config: train.stages[0].epochs: must be >= 1, got 0"),
    ("train.stages=[{epochs: 2, loss: {nme: x}}]", "config: train.stages[0].loss.nme: Key 'nme' not in 'LossConfig'"),
    ("train.stages=[{epochs: 2, freeze: x}]", "config: train.stages[0].freeze: unknown mode 'x'"),
    ("train.stages=[{epochs: 2, optim: {name: lbfgs}}]", "config: train.stages[0].optim.name: unknown optimizer 'lbfgs'"),
    ("train.stages=[{epochs: 2, data: {batch_size: 8}}]", "config: train.stages[0].data: a stage may set only"),
    ("train.stages=[{epochs: 2, sched: {milestones: [0]}}]", "config: train.stages[0].sched.milestones: milestone 0"),
    ("train.stages=[{epochs: 2, bogus: 1}]", "config: train.stages: unknown key 'bogus' in a stage"),
    ("train.stages=[{name: a, epochs: 1}, {name: a, epochs: 1}]", "config: train.stages[1].name: 'a' is used"),
])
def test_bad_stages_are_one_line_errors(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(DEMO, ["sched.milestones=[]", override])
    assert str(e.value).startswith(expected), str(e.value)
    assert "\n" not in str(e.value)


def test_train_epochs_that_disagree_with_the_stages_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="train.epochs: 3 disagrees with train.stages"):
        load_config(None, ["train.stages=[{epochs: 2}]", "train.epochs=3"])
    yaml = tmp_path / "c.yaml"
    yaml.write_text("train:\n  epochs: 5\n  stages:\n    - {epochs: 2}\n    - {epochs: 3}\n")
    assert load_config(str(yaml)).train.epochs == 5
    # A config whose train.epochs predates stages given on the command line: the stages decide.
    assert load_config(DEMO, ["sched.milestones=[]", "train.stages=[{epochs: 3}]"]).train.epochs == 3


def _ckpt_weights(run, step):
    return weights(run / "checkpoints" / f"step_{step}" / "model.safetensors")


@pytest.mark.slow
def test_two_stages_train_what_each_stage_says(tmp_path):
    run = tmp_path / "run"
    proc = ok(train([*BASE, TWO_STAGES, f"run.dir={run}"]))
    assert "stage 1/2 'features'" in proc.stdout and "stage 2/2 'head'" in proc.stdout
    epochs = [r for r in metrics(run) if r["kind"] == "epoch"]
    assert [r["stage"] for r in epochs] == ["features", "features", "head", "head"]
    steps = [r["step"] for r in epochs]
    # the lr each logged step trained with, rounded
    lrs = {r["step"]: round(r["lr"], 8) for r in metrics(run) if r["kind"] == "train"}
    assert {lrs[s] for s in lrs if s <= steps[1]} == {0.01}  # stage 1: the top-level lr
    assert {lrs[s] for s in lrs if steps[1] < s <= steps[2]} == {0.05}  # stage 2's own lr
    assert {lrs[s] for s in lrs if s > steps[2]} == {0.005}  # its milestone, 1 epoch in
    assert [round(r["lr"], 8) for r in epochs] == [0.01, 0.01, 0.05, 0.005]
    e1, e2, final = _ckpt_weights(run, steps[0]), _ckpt_weights(run, steps[1]), weights(run / "model.safetensors")
    head = [k for k in final if k.startswith("classifier.")]
    body = [k for k in final if not k.startswith("classifier.")]
    # Stage 1 (classifier frozen): the classifier does not move, the features do.
    assert all(torch.equal(e1[k], e2[k]) for k in head)
    assert not all(torch.equal(e1[k], e2[k]) for k in body)
    # Stage 2 (backbone frozen): the features stay as stage 1 left them, the classifier learns.
    assert all(torch.equal(e2[k], final[k]) for k in body)
    assert not all(torch.equal(e2[k], final[k]) for k in head)
    s = summary(run)
    assert s["epochs"] == 4 and s["num_trainable_params"] == sum(final[k].numel() for k in head)


def _kill_and_resume_across_stages(tmp_path, runner, extra, kill_at):
    uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    ok(runner([*BASE, TWO_STAGES, *extra, f"run.dir={uninterrupted}"]))
    epoch_steps = [r["step"] for r in metrics(uninterrupted) if r["kind"] == "epoch"]
    step = kill_at(epoch_steps)
    killed = runner([*BASE, TWO_STAGES, *extra, f"run.dir={resumed}"],
                    env={"TOOLKIT_FAULT_KILL_AT_STEP": str(step)})
    assert killed.returncode != 0 and not (resumed / "model.safetensors").exists()
    proc = ok(runner([*BASE, TWO_STAGES, *extra, f"run.dir={resumed}", "train.resume=auto"]))
    assert "resumed from" in proc.stdout
    assert_same_weights(uninterrupted / "model.safetensors", resumed / "model.safetensors")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("time", "images_per_s")} for r in rows]
    assert strip(metrics(resumed)) == strip(metrics(uninterrupted))
    return epoch_steps, proc


@pytest.mark.slow
def test_killed_just_after_the_stage_boundary_resumes_into_stage_two(tmp_path):
    """The checkpoint at the boundary holds stage 2's fresh optimizer and schedule."""
    epoch_steps, proc = _kill_and_resume_across_stages(
        tmp_path, train, [], lambda steps: steps[1] + 5)
    assert f"step_{epoch_steps[1]}" in proc.stdout
    state = checkpoint.read_state(tmp_path / "uninterrupted" / "checkpoints" / f"step_{epoch_steps[1]}")
    assert state["epoch"] == 2 and state["batch"] == 0


@pytest.mark.slow
def test_ddp_killed_mid_stage_one_resumes_through_the_boundary(tmp_path):
    """2 processes: a rank dies mid-epoch in stage 1; the resumed run crosses into stage 2
    (re-wrapping DDP for the new set of trainable parameters) and ends where an uninterrupted
    run does."""
    epoch_steps, proc = _kill_and_resume_across_stages(
        tmp_path, launch, ["train.checkpoint_every_steps=10"], lambda steps: steps[0] + 12)
    resumed_at = (epoch_steps[0] + 12) // 10 * 10  # the last mid-epoch checkpoint before the kill
    assert epoch_steps[0] < resumed_at < epoch_steps[1] and f"step_{resumed_at} " in proc.stdout
    assert summary(tmp_path / "resumed")["world_size"] == 2
