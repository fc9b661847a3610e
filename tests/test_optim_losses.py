"""Optimizers, schedules, losses and label noise: every registry entry, plus their numbers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from toolkit.config import load_config
from toolkit.data.noise import flip_labels
from toolkit.errors import ConfigError
from toolkit.losses import LOSSES
from toolkit.optim import OPTIMIZERS, SCHEDULERS, WarmupCosine, param_groups

EXPECTED = {"sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop, "adam": torch.optim.Adam,
            "adamw": torch.optim.AdamW, "adagrad": torch.optim.Adagrad}


def test_the_five_optimizers_of_e6_are_registered():
    assert set(EXPECTED) <= set(OPTIMIZERS.names())


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_every_optimizer_takes_the_whole_section_and_reduces_a_loss(name):
    cfg = load_config(None, [f"optim.name={name}", "optim.lr=0.05"])
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    kw = {k: v for k, v in vars(cfg.optim).items() if k not in ("name", "no_decay_norm_bias") and v is not None}
    opt = OPTIMIZERS.build(name, params=param_groups(model, cfg.optim.weight_decay), **kw)
    assert isinstance(opt, EXPECTED[name])
    assert opt.param_groups[0]["lr"] == 0.05
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    first = F.cross_entropy(model(x), y).item()
    for _ in range(50):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert F.cross_entropy(model(x), y).item() < first


def test_optimizer_specific_settings_reach_torch():
    p = [nn.Parameter(torch.zeros(2))]
    assert OPTIMIZERS.build("adam", params=p, lr=1e-3, betas=[0.8, 0.9]).defaults["betas"] == (0.8, 0.9)
    assert OPTIMIZERS.build("rmsprop", params=p, lr=1e-3, alpha=0.5, momentum=0.3).defaults["alpha"] == 0.5
    assert OPTIMIZERS.build("adagrad", params=p, lr=1e-3).defaults["eps"] == 1e-10  # torch's own default
    sgd = OPTIMIZERS.build("sgd", params=p, lr=1e-3, momentum=0.0, nesterov=True)
    assert sgd.defaults["nesterov"] is False  # nesterov needs momentum; not an error, just off


def test_no_decay_for_norm_and_bias():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    groups = param_groups(model, 0.1, no_decay_norm_bias=True)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert {p.ndim for p in groups[0]["params"]} == {2, 4}
    assert len(groups[1]["params"]) == 4  # conv bias, bn weight, bn bias, linear bias
    assert len(param_groups(model, 0.1)) == 1


def lrs(name, epochs=6, spe=5, **kw):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    s = SCHEDULERS.build(name, optimizer=opt, steps_per_epoch=spe, epochs=epochs, **kw)
    out = []
    for _ in range(epochs * spe):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    return out


def test_step_schedule_decays_every_step_size_epochs():
    out = lrs("step", step_size=2, gamma=0.5)
    assert out[9] == 1.0 and out[10] == 0.5 and out[19] == 0.5 and out[20] == 0.25


def test_cosine_with_warmup_rises_then_falls_to_the_floor():
    out = lrs("cosine", warmup_epochs=1, min_lr_factor=0.1)
    assert out[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert all(a >= b for a, b in zip(out[5:], out[6:]))
    f = WarmupCosine(warmup=5, total=30, min_factor=0.1)
    assert f(30) == pytest.approx(0.1) and f(5) == pytest.approx(1.0)


def test_multistep_step_and_constant_warm_up_then_keep_their_decay():
    """Warmup multiplies the schedule: milestones still count updates from the start of the run."""
    out = lrs("multistep", milestones=[2, 4], gamma=0.1, warmup_epochs=1)
    assert out[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert out[5:10] == pytest.approx([1.0] * 5) and out[10:20] == pytest.approx([0.1] * 10)
    assert out[20:] == pytest.approx([0.01] * 10)
    out = lrs("step", step_size=2, gamma=0.5, warmup_epochs=0.4)  # 2 updates
    assert out[:3] == pytest.approx([0.5, 1.0, 1.0]) and out[9:11] == pytest.approx([1.0, 0.5])
    assert out[20] == pytest.approx(0.25)
    assert lrs("step", step_size=2, gamma=0.5, warmup_epochs=0.4)[2:] == lrs("step", step_size=2, gamma=0.5)[2:]
    out = lrs("constant", warmup_epochs=2)
    assert out[:10] == pytest.approx([(i + 1) / 10 for i in range(10)]) and set(out[10:]) == {1.0}


def test_onecycle_peaks_at_the_configured_lr_and_runs_the_whole_run():
    out = lrs("onecycle", pct_start=0.25)
    assert max(out) == pytest.approx(1.0, rel=2e-3)  # the peak falls between two updates
    assert out.index(max(out)) in range(6, 9)  # ~25% of 30 updates
    assert out[-1] < 1e-3


def test_constant_schedule():
    assert set(lrs("constant")) == {1.0}


@pytest.mark.parametrize("name", SCHEDULERS.names())
def test_every_schedule_state_dict_round_trips(name):
    """Resume needs it: Accelerate saves the schedule with torch.save and loads weights_only."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    s = SCHEDULERS.build(name, optimizer=opt, steps_per_epoch=5, epochs=6, milestones=[2], warmup_epochs=1)
    for _ in range(7):
        opt.step()
        s.step()
    import io

    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    opt2 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    s2 = SCHEDULERS.build(name, optimizer=opt2, steps_per_epoch=5, epochs=6, milestones=[2], warmup_epochs=1)
    s2.load_state_dict(torch.load(buf, weights_only=True))
    opt2.param_groups[0]["lr"] = s2.get_last_lr()[0]
    for _ in range(5):
        opt.step(), s.step(), opt2.step(), s2.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(opt2.param_groups[0]["lr"])


@pytest.mark.parametrize("override,key", [
    ("sched.step_size=0", "sched.step_size"), ("sched.warmup_epochs=-1", "sched.warmup_epochs"),
    ("sched.min_lr_factor=2", "sched.min_lr_factor"),
    ("sched.name=onecycle sched.milestones=[] sched.warmup_epochs=1", "sched.warmup_epochs"),
    ("sched.pct_start=1", "sched.pct_start"),
    ("optim.betas=[0.9]", "optim.betas"), ("optim.eps=0", "optim.eps"), ("optim.alpha=1", "optim.alpha"),
    ("data.label_noise=1.5", "data.label_noise"),
])
def test_new_keys_are_range_checked(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, override.split())
    assert str(e.value).startswith(f"config: {key}: ") and "\n" not in str(e.value)


# --- losses ---------------------------------------------------------------------------------

def test_squared_and_mse_on_softmax_against_one_hot():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    y = torch.tensor([0, 2])
    p = logits.softmax(1)
    err = (p - F.one_hot(y, 3).float()) ** 2
    assert LOSSES.build("squared")(logits, y).item() == pytest.approx(err.sum().item())
    assert LOSSES.build("mse")(logits, y).item() == pytest.approx(F.mse_loss(p, F.one_hot(y, 3).float()).item())
    assert LOSSES.build("squared", reduction="none")(logits, y).tolist() == pytest.approx(err.sum(1).tolist())
    assert LOSSES.build("mse", reduction="none")(logits, y).tolist() == pytest.approx(err.mean(1).tolist())


def test_squared_loss_is_a_sum_over_the_batch():
    logits, y = torch.randn(8, 5), torch.randint(0, 5, (8,))
    sq = LOSSES.build("squared")
    assert sq(torch.cat([logits, logits]), torch.cat([y, y])).item() == pytest.approx(2 * sq(logits, y).item())


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_gives_a_scalar_with_gradient_and_per_sample_values(name):
    logits = torch.randn(6, 4, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    loss_fn = LOSSES.build(name, label_smoothing=0.0)
    kw = {}
    if getattr(loss_fn, "needs_features", False):  # triplet: gradient flows through the features
        kw["features"] = logits
    loss = loss_fn(logits, y, **kw)
    assert loss.ndim == 0 and math.isfinite(loss.item())
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert LOSSES.build(name, reduction="none")(logits, y, **kw).shape == (6,)


# --- label noise ----------------------------------------------------------------------------

@pytest.mark.parametrize("rate", [0.0, 0.1, 0.3, 0.5, 1.0])
def test_label_noise_changes_exactly_round_rate_n_labels_to_another_class(rate):
    labels = torch.arange(1257) % 10
    noisy, changed = flip_labels(labels, rate, 10, seed=0)
    assert len(changed) == round(rate * 1257)
    assert (noisy != labels).sum().item() == len(changed)  # every chosen label really changed
    assert torch.equal((noisy != labels).nonzero().flatten(), changed)
    assert noisy.min() >= 0 and noisy.max() < 10
    assert torch.equal(labels, torch.arange(1257) % 10)  # input untouched


def test_label_noise_is_seeded():
    labels = torch.arange(500) % 7
    a, ca = flip_labels(labels, 0.3, 7, seed=0)
    b, cb = flip_labels(labels, 0.3, 7, seed=0)
    c, cc = flip_labels(labels, 0.3, 7, seed=1)
    assert torch.equal(a, b) and torch.equal(ca, cb)
    assert not torch.equal(ca, cc)
