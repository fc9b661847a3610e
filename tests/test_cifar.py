"""CIFAR-10/100 loaders on small files written here in torchvision's on-disk format
(CIFAR itself cannot be downloaded on these machines)."""

from __future__ import annotations

import pickle

import pytest
import torch

from helpers import dump_pickle, make_cifar10, make_cifar100, ok, summary, train
from toolkit.data import DATASETS
from toolkit.errors import ConfigError


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
    make_cifar100(tmp_path, train=1000, test=100)  # 10% val: one per class
    s = DATASETS.build("cifar100", root=str(tmp_path), split_seed=0, limit=None)
    assert s.num_classes == 100 and len(s.test) == 100 and s.class_names[42] == "c42"


class Evil:
    def __reduce__(self):
        import os
        return (os.system, ("touch EVIL_RAN",))


def test_a_batch_that_wants_to_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = make_cifar10(tmp_path)
    dump_pickle(folder / "data_batch_2", {b"data": Evil(), b"labels": []})
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


@pytest.mark.slow
def test_train_cli_on_cifar10_files(tmp_path):
    make_cifar10(tmp_path / "data")
    run = tmp_path / "run"
    ok(train(["--config", "configs/digits_lenet.yaml", "data.name=cifar10", f"data.root={tmp_path / 'data'}",
              "train.epochs=1", "sched.milestones=[]", "data.batch_size=20", f"run.dir={run}",
              "log.tensorboard=false"]))
    s = summary(run)
    assert s["num_test_samples"] == 50 and set(s["per_class_acc"]) >= {"airplane", "truck"}


@pytest.mark.slow
def test_train_cli_bad_dataset_leaves_no_run_directory(tmp_path):
    run = tmp_path / "run"
    proc = train(["--config", "configs/digits_lenet.yaml", "data.name=cifar10", f"data.root={tmp_path}",
                  f"run.dir={run}"], timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: config: data.root: ")
    assert not run.exists()
