"""GPU-only paths: fp16 with the gradient scaler, DeepSpeed ZeRO, the device loader, extraction
and image-folder decoding on the GPU. Skipped without CUDA."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from helpers import (DEMO, assert_same_weights, build_imagefolder, decode_folder_args, decoded_batches, launch,
                     make_decode_folder, ok, run_module, summary, train)

pytestmark = pytest.mark.slow  # every test here launches a CLI (and needs CUDA)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.gpu
def test_fp16_trains_on_one_gpu(tmp_path):
    run = tmp_path / "run"
    ok(train(["--config", DEMO, f"run.dir={run}", "train.precision=fp16"]))
    s = summary(run)
    assert s["precision"] == "fp16" and s["test_acc"] >= 0.97


@cuda
@pytest.mark.gpu
def test_bf16_channels_last_compile_on_one_gpu(tmp_path):
    run = tmp_path / "run"
    ok(train(["--config", DEMO, f"run.dir={run}", "train.precision=bf16", "train.channels_last=true",
              "train.compile=true"], timeout=900))
    assert summary(run)["test_acc"] >= 0.97


@cuda
@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="pip install -e '.[deepspeed]'")
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_one_gpu(tmp_path, stage):
    run = tmp_path / "run"
    ok(launch(["--config", DEMO, f"run.dir={run}", "train.epochs=2", "sched.milestones=[]"],
              config_file=f"launch/deepspeed_zero{stage}.yaml", launch_args=["--num_processes", "1"],
              timeout=900))
    s = summary(run)
    assert s["distributed_type"] == "DEEPSPEED" and s["num_test_samples"] == 360


@cuda
@pytest.mark.gpu
def test_device_loader_is_chosen_on_the_gpu_and_matches_the_dataloader(tmp_path):
    """auto puts the digits on the GPU; the batches (and so the weights) are those of the
    DataLoader path, which normalises on the CPU and copies each batch over."""
    args = ["--config", DEMO, "train.epochs=2", "sched.milestones=[]", "log.plots=false", "log.tensorboard=false"]
    ok(train([*args, f"run.dir={tmp_path / 'dev'}"]))
    ok(train([*args, f"run.dir={tmp_path / 'dl'}", "data.loader=dataloader"]))
    assert summary(tmp_path / "dev")["loader"] == "device" and summary(tmp_path / "dl")["loader"] == "dataloader"
    assert_same_weights(tmp_path / "dev" / "model.safetensors", tmp_path / "dl" / "model.safetensors")


@cuda
@pytest.mark.gpu
def test_ema_and_flip_tta_under_bf16_on_one_gpu(tmp_path):
    run = tmp_path / "run"
    ok(train(["--config", DEMO, f"run.dir={run}", "train.precision=bf16", "train.channels_last=true",
              "train.ema_decay=0.99", "train.tta=flip", "data.augment=flip_crop", "log.plots=false"]))
    s = summary(run)
    assert s["ema_decay"] == 0.99 and s["tta"] == "flip" and s["test_acc"] >= 0.9


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("loader", ["device", "dataloader"])
def test_extraction_on_the_gpu_writes_the_cpu_features(tmp_path, loader):
    """Shards are copied to pinned host memory and written on the background thread
    (toolkit.extract.ShardWriter): on the GPU they must hold what the CPU computes."""
    from toolkit.features import load_features

    base = ["data.name=digits", "data.split=test", "model.name=lenet", "extract.shard_size=40"]
    runs = {}
    for name, env in (("gpu", None), ("cpu", {"CUDA_VISIBLE_DEVICES": ""})):
        args = [*base, f"run.dir={tmp_path / name}", f"data.loader={loader if name == 'gpu' else 'auto'}",
                "data.num_workers=1"]
        proc = run_module("toolkit.extract", args, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert ("device cuda" in proc.stdout) == (name == "gpu"), proc.stdout
        runs[name] = load_features(tmp_path / name / "features")
    gpu, cpu = runs["gpu"], runs["cpu"]
    assert gpu.features.shape == (360, 84) and torch.equal(gpu.index, cpu.index)
    # L2-normalised rows; cuDNN convolutions may run in TF32 on the GPU (~1e-3 relative)
    torch.testing.assert_close(gpu.features, cpu.features, atol=3e-3, rtol=0)
    assert (gpu.features * cpu.features).sum(1).min() > 0.9999  # cosine per row


@cuda
@pytest.mark.gpu
def test_device_decode_on_the_gpu_matches_the_workers(tmp_path):
    """data.decode=device on a GPU: nvJPEG decodes, the resize runs on the GPU. Its batches are
    close to the workers' libjpeg-turbo + CPU resize ones (the IDCTs and resize kernels differ
    by a few levels), and a training run with it completes."""
    from toolkit.data.base import collate_for

    root = make_decode_folder(tmp_path)
    ds_w, ds_d = build_imagefolder(root).test, build_imagefolder(root).test
    want = decoded_batches(ds_w, "workers")
    norm = ds_d.device_decode(torch.device("cuda"))
    got = [norm(x) for x, _ in torch.utils.data.DataLoader(ds_d, batch_size=5, num_workers=2,
                                                           collate_fn=collate_for(ds_d))]
    for (xw, _), xd in zip(want, got):
        assert xd.device.type == "cuda" and xd.shape == xw.shape
        diff = (xd.cpu() - xw).abs() * 0.224 * 255  # in uint8 levels (roughly)
        assert diff.mean() < 1.5 and diff.max() < 24, (diff.mean(), diff.max())
    ok(train(decode_folder_args(tmp_path, "run", "data.decode=device")))
    assert summary(tmp_path / "run")["decode"] == "device"
