"""Weight averaging (train.ema_decay) and flip test-time augmentation (train.tta=flip)."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from helpers import DEMO, assert_same_weights, ok, summary, train, weights
from toolkit import checkpoint
from toolkit.ema import ModelEma
from toolkit.engine import evaluate


def test_ema_follows_the_warmed_up_recurrence_and_averages_batchnorm_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = ModelEma(model, decay=0.9)
    expected = {k: v.clone().float() for k, v in model.state_dict().items()}
    for n in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(8, 3))  # moves the BatchNorm running statistics
        ema.update(model)
        d = min(0.9, (1 + n) / (10 + n))
        for k, v in model.state_dict().items():
            expected[k] = v.float() if k.endswith("num_batches_tracked") else d * expected[k] + (1 - d) * v
    got = ema.module.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(got[k].float(), v, rtol=1e-6, atol=1e-6)
    assert int(got["1.num_batches_tracked"]) == 5 and ema.updates == 5
    assert all(not p.requires_grad for p in ema.module.parameters())
    again = ModelEma(model, decay=0.9)
    again.load_state_dict(ema.state_dict())
    assert again.updates == 5 and all(torch.equal(a, b) for a, b in
                                      zip(again.module.state_dict().values(), got.values()))


def test_flip_tta_averages_the_logits_of_the_image_and_its_mirror():
    torch.manual_seed(0)
    x = torch.randn(20, 1, 2, 3)
    y = torch.randint(0, 3, (20,))
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 3))  # not mirror-invariant
    accelerator = Accelerator(cpu=True)
    loader = accelerator.prepare(DataLoader(TensorDataset(x, y), batch_size=8))
    crit = nn.CrossEntropyLoss(reduction="none")
    plain = evaluate(model, crit, loader, accelerator, num_classes=3)
    tta = evaluate(model, crit, loader, accelerator, num_classes=3, tta="flip")
    with torch.no_grad():
        ref = (model(x) + model(x.flip(3))) / 2
    assert tta["loss"] == pytest.approx(crit(ref, y).mean().item(), rel=1e-5)
    assert tta["acc"] == pytest.approx((ref.argmax(1) == y).float().mean().item())
    assert plain["loss"] == pytest.approx(crit(model(x), y).mean().item(), rel=1e-5)
    assert plain["loss"] != pytest.approx(tta["loss"])


SHORT = ["--config", DEMO, "train.epochs=3", "sched.milestones=[2]", "log.tensorboard=false",
         "log.plots=false", "train.ema_decay=0.95", "train.checkpoint_every_steps=25"]


@pytest.mark.slow
def test_ema_is_what_is_saved_and_a_killed_run_resumes_the_same_average(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    ok(train([*SHORT, f"run.dir={a}"]))
    killed = train([*SHORT, f"run.dir={b}"], env={"TOOLKIT_FAULT_KILL_AT_STEP": "60"})
    assert killed.returncode != 0 and not (b / "model.safetensors").exists()
    proc = ok(train([*SHORT, f"run.dir={b}", "train.resume=auto"]))
    assert "step_50" in proc.stdout
    assert_same_weights(a / "model.safetensors", b / "model.safetensors")
    s = summary(a)
    assert s["ema_decay"] == 0.95 and s["test_acc"] >= 0.5 and s["steps"] == 117  # 3 short epochs
    # model.safetensors is the average (the checkpoint's ema.safetensors), not the last weights
    last = checkpoint.list_checkpoints(a / "checkpoints")[0]
    avg = {k[len("module."):]: v for k, v in load_file(str(last / "ema.safetensors")).items() if k.startswith("module.")}
    final, raw = weights(a / "model.safetensors"), weights(last / "model.safetensors")
    assert all(torch.equal(final[k], avg[k]) for k in final)
    assert any(not torch.equal(final[k], raw[k]) for k in final)
    assert int(load_file(str(last / "ema.safetensors"))["updates"]) == 117


@pytest.mark.slow
@pytest.mark.parametrize("override, expected", [
    ("train.ema_decay=1.0", "config: train.ema_decay: must be in [0, 1) (0: off), got 1.0"),
    ("train.tta=five_crop", "config: train.tta: unknown mode 'five_crop'; choose one of: flip, none"),
    ("data.loader=gpu", "config: data.loader: unknown loader 'gpu'; choose one of: auto, dataloader, device"),
])
def test_bad_ema_tta_loader_settings_are_one_line(tmp_path, override, expected):
    proc = train(["--config", DEMO, override, f"run.dir={tmp_path / 'run'}"])
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {expected}", proc.stderr
    assert not (tmp_path / "run").exists()


def _sync_worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    ema = ModelEma(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), decay=0.9)
    with torch.no_grad():
        ema.module[1].running_mean.fill_(float(rank + 1))  # each rank's own statistics
        ema.module[1].num_batches_tracked.fill_(rank + 7)
    ema.sync_buffers()
    torch.save({k: v.clone() for k, v in ema.module.state_dict().items()}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_ema_batchnorm_statistics_are_rank_0s_on_every_rank(tmp_path):
    """DDP keeps parameters equal across ranks but not BatchNorm's running statistics."""
    import torch.multiprocessing as mp

    mp.spawn(_sync_worker, args=(2, f"file://{tmp_path / 'store'}", str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2))
    assert torch.equal(a["1.running_mean"], torch.ones(4)) and torch.equal(b["1.running_mean"], torch.ones(4))
    assert int(b["1.num_batches_tracked"]) == 8  # integer buffers are copied from the model, not synced
    assert all(torch.equal(a[k], b[k]) for k in a if k != "1.num_batches_tracked")
