"""End-to-end: the real `accelerate launch toolkit/train.py` / `python -m toolkit.train` CLIs,
in temp dirs, checking the files they write."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch

from helpers import DEMO, assert_same_weights, launch, metrics, ok, summary, train, weights
from toolkit import checkpoint

pytestmark = pytest.mark.slow  # every test here launches the CLI

# Three short epochs (39 steps each) with a checkpoint every 25 steps.
SHORT = ["--config", DEMO, "train.epochs=3", "sched.milestones=[2]", "train.checkpoint_every_steps=25",
         "log.tensorboard=false"]


def test_demo_reaches_97_and_writes_the_run_directory(demo_single):
    run = demo_single
    s = summary(run)
    assert s["test_acc"] >= 0.97, s
    assert s["num_test_samples"] == 360 and s["world_size"] == 1 and s["epochs"] == 20
    for key in ("best_val_acc", "images_per_s", "wall_s", "train_time_s", "per_class_acc"):
        assert key in s
    assert s["images_per_s"] > 0 and s["wall_s"] > 0
    assert (run / "config.yaml").read_text().startswith("run:")
    assert "lenet" in (run / "config.yaml").read_text()
    assert weights(run / "model.safetensors")["classifier.weight"].shape == (10, 84)
    ckpts = checkpoint.list_checkpoints(run / "checkpoints")
    assert ckpts and all(checkpoint.verify(c) is None for c in ckpts)
    assert (ckpts[0] / "config.yaml").read_text() == (run / "config.yaml").read_text()
    epochs = [r for r in metrics(run) if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == list(range(1, 21))
    assert all(0 <= r["val_acc"] <= 1 and math.isfinite(r["train_loss"]) for r in epochs)
    confusion = (run / "confusion_test.csv").read_text().splitlines()
    assert len(confusion) == 11
    assert sum(int(v) for row in confusion[1:] for v in row.split(",")[1:]) == 360
    # TensorBoard: the epoch scalars are readable from the event file.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((run / "tb").rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events[0].parent)).Reload() if events else None
    assert acc is not None and "epoch/val_acc" in acc.Tags()["scalars"]
    assert len(acc.Scalars("epoch/val_acc")) == 20


def test_ddp_two_processes_matches_one_and_only_rank0_writes(demo_single, tmp_path):
    run = tmp_path / "ddp"
    proc = ok(launch(["--config", DEMO, f"run.dir={run}"]))
    s, s1 = summary(run), summary(demo_single)
    assert s["world_size"] == 2 and s["distributed_type"] == "MULTI_CPU"
    assert s["num_test_samples"] == 360
    assert abs(s["test_acc"] - s1["test_acc"]) <= 0.01, (s["test_acc"], s1["test_acc"])
    # Only rank 0 writes: one final line, one TensorBoard event file, no duplicated rows.
    assert proc.stdout.count("test accuracy:") == 1 and proc.stdout.count("best weights (epoch ") == 1
    assert s["weights_sha256"].keys() == {"model.safetensors", "model_best.safetensors"}
    writers = {p.name.split(".")[-2] for p in (run / "tb").rglob("events.out.tfevents.*")}
    assert len(writers) == 1, writers  # the pid in the event file names: one process wrote them
    rows = [(r["kind"], r["step"]) for r in metrics(run)]
    assert len(rows) == len(set(rows))
    # ...apart from each rank's own RNG state inside the checkpoint, which resume needs.
    newest = checkpoint.list_checkpoints(run / "checkpoints")[0]
    assert {p.name for p in newest.glob("random_states_*.pkl")} == {"random_states_0.pkl",
                                                                     "random_states_1.pkl"}


def test_ddp_evaluation_counts_every_sample_once(tmp_path):
    """101 samples in batches of 16 over 2 ranks: the sampler pads; the metrics must not."""
    run = tmp_path / "odd"
    ok(launch(["--config", DEMO, f"run.dir={run}", "data.limit=101", "data.eval_batch_size=16",
               "train.epochs=1", "sched.milestones=[]", "log.tensorboard=false"]))
    assert summary(run)["num_test_samples"] == 101
    confusion = (run / "confusion_test.csv").read_text().splitlines()[1:]
    assert sum(int(v) for row in confusion for v in row.split(",")[1:]) == 101


def test_one_vs_two_processes_take_the_same_steps(tmp_path):
    """The global batch is split across ranks and augmented as a whole: 2 ranks = 1 rank."""
    args = ["--config", DEMO, "train.epochs=2", "sched.milestones=[]",
            "log.tensorboard=false"]
    ok(train([*args, f"run.dir={tmp_path / 'one'}"]))
    ok(launch([*args, f"run.dir={tmp_path / 'two'}"]))
    w1, w2 = weights(tmp_path / "one" / "model.safetensors"), weights(tmp_path / "two" / "model.safetensors")
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-3, atol=1e-4)


def _kill_and_resume(tmp_path: Path, runner, kill_env: dict) -> Path:
    uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    ok(runner([*SHORT, f"run.dir={uninterrupted}"]))
    killed = runner([*SHORT, f"run.dir={resumed}"], env=kill_env)
    assert killed.returncode != 0, "the injected SIGKILL did not stop the run"
    assert not (resumed / "model.safetensors").exists()
    newest = checkpoint.list_checkpoints(resumed / "checkpoints")[0]
    assert newest.name == "step_50" and checkpoint.read_state(newest)["batch"] == 11  # mid-epoch 2
    proc = ok(runner([*SHORT, f"run.dir={resumed}", "train.resume=auto"]))
    assert "resumed from" in proc.stdout and "step_50" in proc.stdout
    assert_same_weights(uninterrupted / "model.safetensors", resumed / "model.safetensors")
    a, b = summary(uninterrupted), summary(resumed)
    assert a["test_acc"] == b["test_acc"] and a["steps"] == b["steps"] == 117
    # metrics.jsonl: the rows logged after step 50 by the killed run were replaced, not repeated.
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("time", "images_per_s")} for r in rows]
    assert strip(metrics(resumed)) == strip(metrics(uninterrupted))
    return resumed


def test_sigkill_mid_epoch_then_resume_is_exact(tmp_path):
    _kill_and_resume(tmp_path, train, {"TOOLKIT_FAULT_KILL_AT_STEP": "60"})


def test_ddp_rank_killed_mid_epoch_then_resume_is_exact(tmp_path):
    _kill_and_resume(tmp_path, launch, {"TOOLKIT_FAULT_KILL_AT_STEP": "60@1"})


def test_truncated_newest_checkpoint_is_skipped(tmp_path):
    run = tmp_path / "run"
    args = ["--config", DEMO, "train.epochs=2", "sched.milestones=[]", "log.tensorboard=false",
            f"run.dir={run}"]
    ok(train(args))
    first_final = tmp_path / "first.safetensors"
    first_final.write_bytes((run / "model.safetensors").read_bytes())
    newest = run / "checkpoints" / "step_78"
    model_file = newest / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:1000])  # truncated mid-write
    proc = ok(train([*args, "train.resume=auto"]))
    assert "skipping checkpoint step_78: model.safetensors is truncated" in proc.stdout
    assert "resumed from" in proc.stdout and "step_39" in proc.stdout
    assert (run / "checkpoints" / "step_78.bad").is_dir()  # kept for inspection
    assert checkpoint.verify(run / "checkpoints" / "step_78") is None  # written again, whole
    assert_same_weights(first_final, run / "model.safetensors")


def test_resume_auto_without_checkpoint_starts_fresh(tmp_path):
    run = tmp_path / "run"
    proc = ok(train(["--config", DEMO, "train.epochs=1", "sched.milestones=[]", f"run.dir={run}",
                     "train.resume=auto", "log.tensorboard=false"]))
    assert "no complete checkpoint" in proc.stdout and "starting fresh" in proc.stdout
    assert summary(run)["resumed_from"] is None


def test_explicit_resume_from_a_corrupt_checkpoint_fails_clearly(tmp_path):
    run = tmp_path / "run"
    ok(train(["--config", DEMO, "train.epochs=1", "sched.milestones=[]", f"run.dir={run}",
              "log.tensorboard=false"]))
    ckpt = run / "checkpoints" / "step_39"
    (ckpt / "optimizer.bin").write_bytes(b"\0" * (ckpt / "optimizer.bin").stat().st_size)
    proc = train(["--config", DEMO, "train.epochs=2", "sched.milestones=[]", f"run.dir={run}",
                  f"train.resume={ckpt}"])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: config: train.resume: {ckpt} is not a usable checkpoint: optimizer.bin fails its checksum")


BAD = [
    (["optim.lrr=0.1"], "optim.lrr"),
    (["optim.lr=fast"], "optim.lr"),
    (["optim.lr=-0.1"], "optim.lr: must be > 0 and finite"),
    (["data.batch_size=0"], "data.batch_size: must be >= 1"),
    (["train.epochs=0"], "train.epochs: must be >= 1"),
    (["sched.milestones=[0]"], "sched.milestones: milestone 0 must be > 0"),
    (["model.name=resnet1"], "config: model.name: unknown model 'resnet1'; choose one of: base_cnn, lenet,"),
    (["train.resume=/nonexistent/ckpt"], "train.resume: no such checkpoint directory"),
    (["data.root=/nonexistent/data"], "data.root: no such directory"),
    (["trainepochs=3"], "must look like section.key=value"),
]


@pytest.mark.parametrize("override,expected", BAD, ids=[b[0][0] for b in BAD])
def test_bad_config_exits_with_one_line_before_any_work(tmp_path, override, expected):
    run = tmp_path / "run"
    proc = train(["--config", DEMO, f"run.dir={run}", *override], timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr
    assert not run.exists()  # nothing was started


def test_bad_paths_exit_with_one_line(tmp_path):
    proc = train(["--config", str(tmp_path / "missing.yaml")], timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: --config: no such file: {tmp_path / 'missing.yaml'}"
    afile = tmp_path / "afile"
    afile.write_text("x")
    proc = train(["--config", DEMO, f"run.dir={afile}"], timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().endswith("exists and is not a directory")
    assert afile.read_text() == "x"


def test_bad_config_under_accelerate_launch_fails_before_training(tmp_path):
    proc = launch(["--config", DEMO, f"run.dir={tmp_path / 'run'}", "optim.lr=0"], timeout=180)
    assert proc.returncode != 0
    assert "error: config: optim.lr: must be > 0 and finite, got 0.0" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_nonfinite_losses_are_skipped(tmp_path):
    run = tmp_path / "run"
    proc = ok(train(["--config", DEMO, "train.epochs=1", "sched.milestones=[]", f"run.dir={run}",
                     "log.tensorboard=false"], env={"TOOLKIT_FAULT_NONFINITE_STEPS": "5-7"}))
    assert "non-finite loss at step 5: skipped (1/10 in a row)" in proc.stdout
    assert summary(run)["nonfinite_steps"] == 3
    assert all(torch.isfinite(w).all() for w in weights(run / "model.safetensors").values())
    assert all(math.isfinite(r.get("loss", 0.0)) for r in metrics(run))


def test_a_run_of_nonfinite_losses_aborts_and_keeps_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    proc = train(["--config", DEMO, "train.epochs=3", "sched.milestones=[]", f"run.dir={run}",
                  "train.max_nonfinite=5", "log.tensorboard=false"],
                 env={"TOOLKIT_FAULT_NONFINITE_STEPS": "45-1000"})
    assert proc.returncode == 3
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: loss was non-finite for 5 steps in a row (train.max_nonfinite=5)")
    ckpts = checkpoint.list_checkpoints(run / "checkpoints")
    assert [c.name for c in ckpts] == ["step_39"]  # the end of epoch 1, nothing after it
    assert checkpoint.verify(ckpts[0]) is None
    assert all(torch.isfinite(w).all() for w in weights(ckpts[0] / "model.safetensors").values())
    assert not (run / "model.safetensors").exists() and not (run / "summary.json").exists()


@pytest.mark.parametrize("ranks", [1, 2])
def test_nonfinite_stop_ends_the_run_with_only_checkpoints_from_before(tmp_path, ranks):
    """train.nonfinite=stop: no per-step check, so the NaN at step 43 (on rank 1 only, with 2
    ranks: DDP's gradient all-reduce spreads it) poisons the weights; the checkpoint due at step
    45 checks first and stops the run, on every rank, leaving steps 39 and 40."""
    run = tmp_path / "run"
    args = ["--config", DEMO, "train.epochs=3", "sched.milestones=[]", f"run.dir={run}",
            "train.nonfinite=stop", "train.checkpoint_every_steps=5", "log.tensorboard=false"]
    env = {"TOOLKIT_FAULT_NONFINITE_STEPS": "43" if ranks == 1 else "43@1"}
    proc = train(args, env=env) if ranks == 1 else launch(args, env=env)
    assert proc.returncode == 3 if ranks == 1 else proc.returncode != 0
    losses = 3 if ranks == 1 else 5  # steps 43-45 on rank 1, 44-45 on rank 0
    assert (f"error: loss was non-finite between steps 41 and 45 ({losses} non-finite micro-batch losses "
            f"over {ranks} rank(s); train.nonfinite=stop); stopped at step 45" in proc.stderr), proc.stderr[-3000:]
    ckpts = checkpoint.list_checkpoints(run / "checkpoints")
    assert [c.name for c in ckpts] == ["step_40", "step_39"]
    for c in ckpts:
        assert checkpoint.verify(c) is None
        assert all(torch.isfinite(w).all() for w in weights(c / "model.safetensors").values())
    assert not (run / "model.safetensors").exists() and not (run / "summary.json").exists()
    assert all(math.isfinite(r.get("loss", 0.0)) for r in metrics(run))  # the log at step 40 was before it


def test_a_rank_that_raises_ends_the_whole_job_quickly(tmp_path):
    t0 = time.monotonic()
    proc = launch(["--config", DEMO, f"run.dir={tmp_path / 'run'}", "train.dist_timeout_s=60",
                   "log.tensorboard=false"], env={"TOOLKIT_FAULT_RAISE_AT_STEP": "5@1"}, timeout=150)
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0
    assert "error: rank 1: RuntimeError: injected failure on rank 1 at step 5" in proc.stderr
    assert elapsed < 120, f"job took {elapsed:.0f} s to die"


def test_bf16_accumulation_clipping_channels_last_on_cpu(tmp_path):
    run = tmp_path / "run"
    ok(train(["--config", DEMO, "train.epochs=4", "sched.milestones=[]", f"run.dir={run}",
              "optim.lr=0.05", "train.precision=bf16", "train.grad_accum_steps=2",
              "train.clip_grad_norm=1.0", "train.channels_last=true", "log.progress=rich"]))
    s = summary(run)
    assert s["precision"] == "bf16" and s["steps"] == 4 * 20  # ceil(39 / 2) updates per epoch
    assert s["test_acc"] > 0.8, s["test_acc"]


def test_accumulation_equals_the_full_batch(tmp_path):
    """batch 32 in one step == two micro-batches of 16 accumulated (same samples, same order)."""
    base = ["--config", DEMO, "data.augment=none", "train.epochs=1", "sched.milestones=[]",
            "log.tensorboard=false", "optim.weight_decay=0"]
    ok(train([*base, f"run.dir={tmp_path / 'full'}"]))
    ok(train([*base, f"run.dir={tmp_path / 'acc'}", "data.batch_size=16", "train.grad_accum_steps=2"]))
    w1, w2 = weights(tmp_path / "full" / "model.safetensors"), weights(tmp_path / "acc" / "model.safetensors")
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-3, atol=1e-4)


def test_fp16_without_cuda_is_a_config_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: fp16 is valid here")
    proc = train(["--config", DEMO, f"run.dir={tmp_path / 'run'}", "train.precision=fp16"], timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: config: train.precision: fp16 needs a CUDA GPU; use bf16 on CPU"


def test_print_config_shows_the_resolved_config():
    proc = ok(train(["--config", DEMO, "optim.lr=0.2", "--print-config"], timeout=120))
    import yaml

    cfg = yaml.safe_load(proc.stdout)
    assert cfg["optim"]["lr"] == 0.2 and cfg["run"]["name"] == "digits_lenet"
    assert json.dumps(cfg)  # plain data only


def test_compile_with_the_feature_plots_and_ema_on_cpu(tmp_path):
    """torch.compile does not run hooks added after tracing: the feature tap of the final
    evaluation must still see the penultimate features (and the EMA copy is not compiled)."""
    run = tmp_path / "run"
    ok(train(["--config", DEMO, f"run.dir={run}", "train.compile=true", "train.epochs=1", "sched.milestones=[]",
              "train.ema_decay=0.9", "log.tensorboard=false"], timeout=900))
    assert (run / "embeddings.safetensors").is_file() and (run / "embedding_pca.png").is_file()
    assert summary(run)["num_test_samples"] == 360
