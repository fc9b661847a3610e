"""CIFAR-10/100 loaders on small files written here in torchvision's on-disk format
(CIFAR itself cannot be downloaded on these machines)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ok, summary, train
from toolkit.data import DATASETS
from toolkit.errors import ConfigError


def _batch(n: int, num_classes: int, label_key: bytes, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"fake", label_key: [int(i % num_classes) for i in range(n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"img{i}.png".encode() for i in range(n)]}


def _dump(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def make_cifar10(root: Path, per_batch: int = 40, test: int = 50) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 6):
        _dump(folder / f"data_batch_{i}", _batch(per_batch, 10, b"labels", i))
    _dump(folder / "test_batch", _batch(test, 10, b"labels", 99))
    _dump(folder / "batches.meta", {b"label_names": [b"airplane", b"automobile", b"bird", b"cat", b"deer",
                                                     b"dog", b"frog", b"horse", b"ship", b"truck"]})
    return folder


def test_cifar10_reads_torchvision_layout(tmp_path):
    folder = make_cifar10(tmp_path)
    s = DATASETS.build("cifar10", root=str(tmp_path), split_seed=0, limit=None)
    assert (len(s.train), len(s.val), len(s.test)) == (180, 20, 50)
    assert s.num_classes == 10 and s.class_names[0] == "airplane" and s.class_names[9] == "truck"
    # Test image 3 equals the raw bytes laid out as (3, 32, 32), after normalisation is undone.
    raw = pickle.load(open(folder / "test_batch", "rb"), encoding="bytes")[b"data"][3].reshape(3, 32, 32)
    x, y = s.test[3]
    mean, std = torch.tensor(s.meta["mean"]), torch.tensor(s.meta["std"])
    back = (x * std[:, None, None] + mean[:, None, None]) * 255
    assert torch.allclose(back, torch.from_numpy(raw).float(), atol=1e-3) and y.item() == 3
    xb, yb = s.train.__getitems__([0, 1, 2])
    assert xb.shape == (3, 3, 32, 32) and xb.dtype == torch.float32
    # Validation is stratified: every class appears twice in 20 images.
    assert torch.bincount(s.val.labels, minlength=10).tolist() == [2] * 10


def test_cifar100_reads_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    _dump(folder / "train", _batch(1000, 100, b"fine_labels", 1))  # 10% val: one per class
    _dump(folder / "test", _batch(100, 100, b"fine_labels", 2))
    _dump(folder / "meta", {b"fine_label_names": [f"c{i}".encode() for i in range(100)]})
    s = DATASETS.build("cifar100", root=str(tmp_path), split_seed=0, limit=None)
    assert s.num_classes == 100 and len(s.test) == 100 and s.class_names[42] == "c42"


class Evil:
    def __reduce__(self):
        import os
        return (os.system, ("touch EVIL_RAN",))


def test_a_batch_that_wants_to_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = make_cifar10(tmp_path)
    _dump(folder / "data_batch_2", {b"data": Evil(), b"labels": []})
    with pytest.raises(ConfigError, match="data_batch_2 is not a readable CIFAR batch.*posix.system is not allowed"):
        DATASETS.build("cifar10", root=str(tmp_path), split_seed=0, limit=None)
    assert not (tmp_path / "EVIL_RAN").exists()


def test_truncated_and_missing_batches_are_clear_errors(tmp_path):
    folder = make_cifar10(tmp_path)
    data = (folder / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match="test_batch is not a readable CIFAR batch"):
        DATASETS.build("cifar10", root=str(tmp_path), split_seed=0, limit=None)
    (folder / "test_batch").unlink()
    with pytest.raises(ConfigError, match="test_batch is missing"):
        DATASETS.build("cifar10", root=str(tmp_path), split_seed=0, limit=None)


def test_missing_folder_says_how_to_get_it(tmp_path):
    with pytest.raises(ConfigError) as e:
        DATASETS.build("cifar10", root=str(tmp_path), split_seed=0, limit=None)
    assert "cifar-10-batches-py not found" in str(e.value) and "data.download=true" in str(e.value)
    with pytest.raises(ConfigError, match="needs data.root"):
        DATASETS.build("cifar10", root=None, split_seed=0, limit=None)


def test_train_cli_on_cifar10_files(tmp_path):
    make_cifar10(tmp_path / "data")
    run = tmp_path / "run"
    ok(train(["--config", "configs/digits_lenet.yaml", "data.name=cifar10", f"data.root={tmp_path / 'data'}",
              "train.epochs=1", "sched.milestones=[]", "data.batch_size=20", f"run.dir={run}",
              "log.tensorboard=false"]))
    s = summary(run)
    assert s["num_test_samples"] == 50 and set(s["per_class_acc"]) >= {"airplane", "truck"}


def test_train_cli_bad_dataset_leaves_no_run_directory(tmp_path):
    run = tmp_path / "run"
    proc = train(["--config", "configs/digits_lenet.yaml", "data.name=cifar10", f"data.root={tmp_path}",
                  f"run.dir={run}"], timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: config: data.root: ")
    assert not run.exists()
