"""data.decode=device: image-folder JPEGs travel from the workers as bytes and are decoded,
resized and normalised in batches where the batch lands (toolkit.data.device_decode.DeviceDecode).
On the CPU the device decoder is libjpeg-turbo, as in the workers, so both paths must give the
same batches bit for bit; tests/test_gpu.py compares nvJPEG on a GPU with them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import (DEMO, assert_same_weights, build_imagefolder, decode_folder_args, decoded_batches, launch,
                     make_decode_folder, ok, summary, train)
from toolkit.config import load_config
from toolkit.data.base import collate_for
from toolkit.data.device_decode import EncodedBatch
from toolkit.errors import ConfigError

CPU = torch.device("cpu")


def test_jpegs_travel_as_bytes_and_everything_else_decoded(tmp_path):
    ds = build_imagefolder(make_decode_folder(tmp_path)).train
    ds.device_decode(CPU)
    kinds = {}
    for i in range(len(ds)):
        x, _ = ds[i]
        kinds.setdefault(Path(ds.paths[i]).suffix.lower(), set()).add(x.ndim)
        assert x.dtype == torch.uint8 and (x.ndim == 1 or x.shape == (3, 32, 32))
    assert kinds[".jpg"] == {1}  # RGB and L JPEGs: bytes
    assert kinds[".jpeg"] >= {1, 3}  # test_imagefolder's CMYK .JPEG files are decoded in the worker
    assert all(kinds[e] == {3} for e in (".png", ".bmp", ".webp", ".gif", ".tif"))
    items = [ds[i] for i in range(len(ds))]
    x, y = collate_for(ds)(items)
    assert isinstance(x, EncodedBatch) and len(x) == len(ds) and y.tolist() == ds.labels.tolist()
    # two storages whatever the batch size (a worker shares each through one file descriptor)
    jpegs = [i for i, (t, _) in enumerate(items) if t.ndim == 1]
    assert x.jpeg_at == jpegs and x.jpeg.ndim == 1 and x.images.shape == (len(ds) - len(jpegs), 3, 32, 32)
    assert x.jpeg_sizes == [items[i][0].numel() for i in jpegs]
    assert torch.equal(x.jpeg, torch.cat([items[i][0] for i in jpegs]))


@pytest.mark.parametrize("split", ["train", "test"])
def test_device_decode_gives_the_workers_batches_bit_for_bit(tmp_path, split):
    root = make_decode_folder(tmp_path)
    a, b = (decoded_batches(getattr(build_imagefolder(root), split), mode) for mode in ("workers", "device"))
    assert len(a) == len(b) > 1
    for (xa, ya), (xb, yb) in zip(a, b):
        assert xa.dtype == xb.dtype == torch.float32 and xa.shape == xb.shape
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_a_jpeg_the_batched_decoder_refuses_is_decoded_alone_then_by_pillow(tmp_path, monkeypatch):
    import toolkit.data.device_decode as device_decode

    root = make_decode_folder(tmp_path)
    want = decoded_batches(build_imagefolder(root).test, "workers", workers=0)
    calls = []

    def refuse(data, **kw):
        calls.append(type(data))
        raise RuntimeError("not this one")
    monkeypatch.setattr(device_decode, "decode_jpeg", refuse)
    got = decoded_batches(build_imagefolder(root).test, "device", workers=0)
    assert list in calls and torch.Tensor in calls  # the batch, then each image alone
    for (xa, _), (xb, _) in zip(want, got):  # Pillow and libjpeg-turbo decode these alike
        assert (xa - xb).abs().max() <= 2 / 255 / 0.224, (xa - xb).abs().max()


def test_decode_device_is_for_image_folders_only():
    with pytest.raises(ConfigError, match="^config: data.decode: device decodes image-folder JPEGs; "
                                          "data.name=digits has none"):
        load_config(DEMO, ["data.decode=device"])
    with pytest.raises(ConfigError, match="^config: data.decode: unknown mode 'gpu'; choose one of: device, workers"):
        load_config(DEMO, ["data.decode=gpu"])


@pytest.mark.slow
def test_training_with_device_decode_equals_worker_decode(tmp_path):
    """The whole CLI (train, val, test, train-set evaluation) on batches decoded either way:
    the same batches, so the same weights."""
    ok(train(decode_folder_args(tmp_path, "workers")))
    ok(train(decode_folder_args(tmp_path, "device", "data.decode=device")))
    assert_same_weights(tmp_path / "workers" / "model.safetensors", tmp_path / "device" / "model.safetensors")
    a, b = summary(tmp_path / "workers"), summary(tmp_path / "device")
    assert (a["decode"], b["decode"]) == ("workers", "device") and a["test_acc"] == b["test_acc"]


@pytest.mark.slow
def test_device_decode_on_two_processes(tmp_path):
    """Each rank's loader collates its own slice of the global batch (split_batches): the byte
    lists are never cut, and evaluation still counts every image once."""
    ok(launch(decode_folder_args(tmp_path, "ddp", "data.decode=device")))
    s = summary(tmp_path / "ddp")
    n_test = len(build_imagefolder(tmp_path / "data").test)
    assert s["world_size"] == 2 and s["decode"] == "device" and s["num_test_samples"] == n_test


def test_an_image_changed_after_the_check_is_one_line(tmp_path):
    """Files are checked when the dataset is built; one that breaks later fails in the worker
    with the same one line on both paths."""
    ds = build_imagefolder(make_decode_folder(tmp_path)).test
    ds.device_decode(CPU)
    victim = next(i for i in range(len(ds)) if str(ds.paths[i]).endswith(".png"))
    Path(ds.paths[victim]).write_bytes(b"no longer an image")
    with pytest.raises(ConfigError, match="unreadable image"):
        ds[victim]


@pytest.mark.slow
def test_killed_mid_epoch_and_resumed_equals_uninterrupted(tmp_path):
    ok(train(decode_folder_args(tmp_path, "whole", "data.decode=device")))
    args = decode_folder_args(tmp_path, "cut", "data.decode=device", "train.checkpoint_every_steps=1")
    assert train(args, env={"TOOLKIT_FAULT_KILL_AT_STEP": "6"}).returncode != 0  # epoch 2, batch 2 of 4
    ok(train([*args, "train.resume=auto"]))
    assert summary(tmp_path / "cut")["resumed_from"].endswith("step_6")
    assert_same_weights(tmp_path / "whole" / "model.safetensors", tmp_path / "cut" / "model.safetensors")
