"""The device-resident training loader: every sample once per epoch per world, the same batches as
the DataLoader path (equal weights after training either way, 1 and 2 processes), exact
mid-epoch resume, and clear errors when it cannot be used."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from accelerate.state import GradientState
from accelerate.utils import DistributedType

from helpers import DEMO, assert_same_weights, launch, make_folder, ok, summary, train
from toolkit.data import TensorImageDataset
from toolkit.data.device_loader import DeviceLoader
from toolkit.data.samplers import EpochSampler, PKSampler
from toolkit.engine import choose_loader
from toolkit.errors import ConfigError

CPU = torch.device("cpu")


def _indexed(n: int, classes: int = 10) -> TensorImageDataset:
    """Image i holds the value i in every pixel (float, already normalised), label i % classes."""
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return TensorImageDataset(images, torch.arange(n) % classes)


def _loader(ds, world: int, rank: int, batch: int, drop_last: bool = True, sampler=None) -> DeviceLoader:
    return DeviceLoader(ds, sampler or EpochSampler(len(ds), seed=3), batch, drop_last, CPU, rank, world,
                        GradientState())


def _seen(loader: DeviceLoader, start: int = 0) -> list:
    return [int(v) for x, _ in loader.iterate(start) for v in x[:, 0, 0, 0].tolist()]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_every_sample_once_per_epoch_per_world(world):
    n, batch = 103, 8
    ds = _indexed(n)
    for epoch in range(3):
        seen = []
        orders = []
        for rank in range(world):
            loader = _loader(ds, world, rank, batch)
            loader.set_epoch(epoch)
            assert len(loader) == n // batch
            mine = _seen(loader)
            assert len(mine) == (n // batch) * batch // world  # an equal share for every rank
            seen += mine
            orders.append(mine)
        assert len(seen) == len(set(seen)) == (n // batch) * batch  # no sample twice, only the dropped tail missing
        sampler = EpochSampler(n, seed=3)
        sampler.set_epoch(epoch)
        full = list(sampler)[: (n // batch) * batch]
        per = batch // world
        # rank r holds rows [r * per, (r + 1) * per) of every global batch (Accelerate's split_batches)
        for rank, mine in enumerate(orders):
            assert mine == [full[b * batch + rank * per + j] for b in range(n // batch) for j in range(per)]
    # epochs differ, and the order is a pure function of (seed, epoch)
    a, b = _loader(ds, 1, 0, batch), _loader(ds, 1, 0, batch)
    a.set_epoch(1), b.set_epoch(1)
    assert _seen(a) == _seen(b)
    b.set_epoch(2)
    assert _seen(a) != _seen(b)


def test_keeping_the_short_last_batch_on_one_process():
    ds = _indexed(21)
    loader = _loader(ds, 1, 0, 8, drop_last=False)
    assert len(loader) == 3
    sizes = [x.shape[0] for x, _ in loader]
    assert sizes == [8, 8, 5] and sorted(_seen(loader)) == list(range(21))


def test_resuming_at_batch_k_yields_the_rest_of_the_same_epoch():
    ds = _indexed(64)
    loader = _loader(ds, 2, 1, 8)
    loader.set_epoch(5)
    whole = _seen(loader)
    assert _seen(loader, start=3) == whole[3 * 4:]


def test_labels_follow_images_and_uint8_is_normalised_like_the_dataset():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 4, 4), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 5, (40,), generator=g)
    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])
    ds = TensorImageDataset(images, labels, mean=mean, std=std)
    sampler = EpochSampler(40, seed=0)
    loader = _loader(ds, 1, 0, 10, sampler=sampler)
    order = list(sampler)
    for b, (x, y) in enumerate(loader):
        ref_x, ref_y = ds.__getitems__(order[b * 10:(b + 1) * 10])
        assert x.dtype == torch.float32 and torch.equal(x, ref_x) and torch.equal(y, ref_y)


def test_dataloader_items_are_uint8_normalised_where_the_batch_lands(tmp_path):
    """After `device_items()` a uint8 set and an image folder hand out uint8 (a quarter of the
    bytes through workers and the copy to the GPU); the returned Normalize gives back exactly
    the float items they handed out before. A float set is left as it is."""
    from torch.utils.data import DataLoader

    from toolkit.data import DATASETS, collate_batch
    from toolkit.data.base import device_items

    synthetic = DATASETS.build("synthetic", root=None, split_seed=0, limit=24)
    folder = DATASETS.build("imagefolder", root=str(make_folder(tmp_path / "data")), split_seed=0, limit=None,
                            image_size=16)
    for ds in (synthetic.train, folder.train):
        idx = list(range(min(8, len(ds))))
        before = torch.stack([ds[i][0] for i in idx])  # float32, normalised per item
        norm = device_items(ds)
        x, y = next(iter(DataLoader(ds, batch_size=len(idx), collate_fn=collate_batch, num_workers=1)))
        assert before.dtype == torch.float32 and x.dtype == torch.uint8 and len(y) == len(idx)
        assert torch.equal(norm(x), before)
        assert norm(before) is before  # float input passes through
    digits = DATASETS.build("digits", root=None, split_seed=0, limit=None).test  # float, already normalised
    first = digits[0][0]
    assert device_items(digits) is None and torch.equal(digits[0][0], first)


def test_pk_batches_keep_whole_classes_per_rank():
    labels = torch.arange(120) % 6
    ds = TensorImageDataset(torch.zeros(120, 1, 1, 1), labels)
    for rank in range(2):
        loader = _loader(ds, 2, rank, 16, sampler=PKSampler(labels, p=4, k=4, seed=0))
        for _, y in loader:
            assert y.shape == (8,) and len(set(y[:4].tolist())) == 1 and len(set(y[4:].tolist())) == 1


def test_the_last_batch_closes_the_accumulation_window():
    """Accelerate syncs gradients on a loader's last batch; the device loader must say which it is."""
    state = GradientState()
    loader = DeviceLoader(_indexed(40), EpochSampler(40, 0), 8, True, CPU, 0, 1, state)
    flags = [state.end_of_dataloader for _ in loader]
    assert flags == [False, False, False, False, True]
    assert not state.in_dataloader  # it leaves the state as it found it


def test_auto_falls_back_and_device_refuses_with_the_reason(tmp_path):
    acc = SimpleNamespace(device=CPU, distributed_type=DistributedType.NO)
    assert choose_loader("auto", _indexed(8), acc) == "device"
    assert choose_loader("dataloader", _indexed(8), acc) == "dataloader"
    folder = torch.utils.data.TensorDataset(torch.zeros(4, 3))
    assert choose_loader("auto", folder, acc) == "dataloader"
    with pytest.raises(ConfigError, match="data.loader: device: the training set .* decoded on the fly"):
        choose_loader("device", folder, acc)
    ds = SimpleNamespace(device=CPU, distributed_type=DistributedType.DEEPSPEED)
    assert choose_loader("auto", _indexed(8), ds) == "dataloader"


# ------------------------------------------------------------------------------------------
# through the CLI

SHORT = ["--config", DEMO, "train.epochs=3", "sched.milestones=[2]", "log.tensorboard=false",
         "log.plots=false", "log.progress=none"]


@pytest.mark.slow
def test_device_and_dataloader_paths_train_identical_weights(tmp_path):
    """Same seed, same batches, same augmentation draws: bit-identical parameters, with an
    accumulation window that does not divide the epoch (79 batches of 16, the last one short, windows of 2)."""
    args = [*SHORT, "data.batch_size=16", "train.grad_accum_steps=2", "data.drop_last=false"]
    ok(train([*args, f"run.dir={tmp_path / 'dev'}", "data.loader=device"]))
    ok(train([*args, f"run.dir={tmp_path / 'dl'}", "data.loader=dataloader"]))
    a, b = summary(tmp_path / "dev"), summary(tmp_path / "dl")
    assert (a["loader"], b["loader"]) == ("device", "dataloader")
    assert a["steps"] == b["steps"] == 3 * 40  # ceil(79 batches / 2): 1,257 images, the last batch short
    assert_same_weights(tmp_path / "dev" / "model.safetensors", tmp_path / "dl" / "model.safetensors")


@pytest.mark.slow
def test_two_processes_device_loader_equals_dataloader(tmp_path):
    ok(launch([*SHORT, f"run.dir={tmp_path / 'dev'}", "data.loader=device"]))
    ok(launch([*SHORT, f"run.dir={tmp_path / 'dl'}", "data.loader=dataloader"]))
    assert summary(tmp_path / "dev")["world_size"] == 2 and summary(tmp_path / "dev")["loader"] == "device"
    assert_same_weights(tmp_path / "dev" / "model.safetensors", tmp_path / "dl" / "model.safetensors")


@pytest.mark.slow
def test_dataloader_path_mid_epoch_resume_stays_exact(tmp_path):
    """The device loader is the default for in-memory data (tests/test_train_e2e.py resumes with
    it); this keeps the DataLoader path's mid-epoch resume covered too."""
    args = [*SHORT, "data.loader=dataloader"]
    ok(train([*args, f"run.dir={tmp_path / 'a'}"]))
    killed = train([*args, f"run.dir={tmp_path / 'b'}", "train.checkpoint_every_steps=25"],
                   env={"TOOLKIT_FAULT_KILL_AT_STEP": "60"})
    assert killed.returncode != 0
    ok(train([*args, f"run.dir={tmp_path / 'b'}", "train.checkpoint_every_steps=25", "train.resume=auto"]))
    assert_same_weights(tmp_path / "a" / "model.safetensors", tmp_path / "b" / "model.safetensors")


@pytest.mark.slow
def test_device_loader_on_a_folder_dataset_is_one_clear_line(tmp_path):
    root = make_folder(tmp_path / "data")
    proc = train(["--config", DEMO, "data.name=imagefolder", f"data.root={root}", "data.image_size=32",
                  "data.loader=device", f"run.dir={tmp_path / 'run'}"])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "data.loader: device: the training set" in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()  # refused before the run directory is made
    auto = ok(train(["--config", DEMO, "data.name=imagefolder", f"data.root={root}", "data.image_size=32",
                     "data.batch_size=4", "train.epochs=1", "sched.milestones=[]", "log.plots=false", f"run.dir={tmp_path / 'auto'}"]))
    assert "loader dataloader" in auto.stdout and summary(tmp_path / "auto")["loader"] == "dataloader"
