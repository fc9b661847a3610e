"""When the toolkit cannot do what was asked, or does something the user likely did not mean, it
says so: DeepSpeed without CUDA is refused in one line (not silently run as gloo DDP without
ZeRO); a frozen backbone without pretrained weights, and a schedule cut to fit a shortened run,
are warnings in the log and the summary."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from helpers import DEMO, launch, ok, summary, train
from toolkit.config import load_config, resolve_stages
from toolkit.engine.fit import run_warnings

SHORT = ["train.epochs=1", "sched.milestones=[]", "data.limit=64", "log.tensorboard=false", "log.plots=false"]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_deepspeed_launch_without_cuda_is_one_line(tmp_path):
    # What `accelerate launch --config_file launch/deepspeed_zero2.yaml` sets in every process.
    proc = train(["--config", DEMO, f"run.dir={tmp_path / 'run'}", *SHORT], env={"ACCELERATE_USE_DEEPSPEED": "true"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: launch: the launch file asks for DeepSpeed, which this toolkit runs on CUDA GPUs only, and no GPU "
        "is visible; on CPUs launch with launch/cpu_ddp.yaml"]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available() or importlib.util.find_spec("deepspeed") is None,
                    reason="needs deepspeed installed (pip install -e '.[deepspeed]') on a machine without CUDA")
def test_deepspeed_launch_file_without_cuda_through_the_launcher(tmp_path):
    proc = launch(["--config", DEMO, f"run.dir={tmp_path / 'run'}", *SHORT], config_file="launch/deepspeed_zero2.yaml",
                  launch_args=["--num_processes", "1"])
    assert proc.returncode != 0 and "asks for DeepSpeed" in proc.stderr
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.slow
def test_frozen_random_backbone_is_a_warning_in_log_and_summary(tmp_path):
    run = tmp_path / "run"
    # Also a shortened run: digits_lenet.yaml's milestone at epoch 15 cannot fire in 1 epoch.
    args = [a for a in SHORT if not a.startswith("sched.milestones")]
    proc = ok(train(["--config", DEMO, f"run.dir={run}", "model.freeze=backbone", *args]))
    want = ["model.freeze=backbone without model.pretrained: the frozen backbone keeps its random initial "
            "weights and only the classifier learns",
            "sched.milestones: [15] at or past the end of the run's 1 epoch(s): dropped"]
    for w in want:
        assert f"warning: {w}" in proc.stdout
    s = summary(run)
    assert s["warnings"] == want
    # One epoch: the steady rate is that epoch's, and the console line does not claim otherwise.
    assert s["images_per_s_from_epoch"] == 1 and s["images_per_s"] == s["images_per_s_whole_run"]
    assert "(from epoch 2)" not in proc.stdout


def test_warnings_only_where_the_backbone_starts_random():
    stages = resolve_stages(load_config(DEMO, ["model.freeze=backbone"]))
    assert run_warnings("weights.safetensors", stages[0]) == []
    assert run_warnings(None, resolve_stages(load_config(DEMO))[0]) == []
    # E4's two-stage triplet run freezes the backbone only in stage 2, after stage 1 trained it.
    two = load_config("configs/digits_triplet_cos.yaml")
    assert run_warnings(None, resolve_stages(two)[0]) == []
    assert [s.cfg.model.freeze for s in resolve_stages(two)][-1] == "backbone"
