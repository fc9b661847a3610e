"""toolkit.engine.train_epoch in-process: how often it waits for the device, and train.nonfinite.

A host sync is any read of a tensor's value on the host (`.item()`, `.tolist()`, `bool()`,
`float()`, `.cpu()`); on a GPU each one stops the CPU from queueing the next kernels, so the
loop must not make one per step where it promises not to (docs/benchmarks.md, scaling note).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from toolkit.data.base import TensorImageDataset
from toolkit.data.device_loader import DeviceLoader
from toolkit.data.samplers import EpochSampler
from toolkit.engine import TrainState, TrainStep, make_policy, train_epoch
from toolkit.errors import NonFiniteLossError
from toolkit.faults import Faults
from toolkit.tracking import Tracker

SYNCS = ("item", "tolist", "__bool__", "__float__", "cpu")
STEPS, BATCH, LOG_EVERY = 24, 8, 6


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def run_epoch(accelerator, tmp_path: Path, nonfinite: str, faults: Faults = Faults(),
              on_step=lambda *_: None) -> TrainState:
    g = torch.Generator().manual_seed(0)
    data = TensorImageDataset(torch.randn(STEPS * BATCH, 3, 8, 8, generator=g),
                              torch.randint(0, 4, (STEPS * BATCH,), generator=g))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = accelerator.prepare(model, opt)
    sched = accelerator.prepare(torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0))
    loader = DeviceLoader(data, EpochSampler(len(data), 0), BATCH, True, accelerator.device, 0, 1,
                          accelerator.gradient_state)
    state = TrainState()
    step = TrainStep(model, torch.nn.CrossEntropyLoss(), opt, sched, nonfinite=make_policy(nonfinite, max_in_row=3))
    train_epoch(step, loader, accelerator, state, Tracker(accelerator, tmp_path, progress="none"),
                log_every=LOG_EVERY, faults=faults, on_step=on_step)
    return state


def count_syncs(monkeypatch) -> list:
    calls = []
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, _name=name, **kw):
            calls.append(_name)
            return _original(self, *a, **kw)
        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


@pytest.mark.parametrize("nonfinite,most", [
    ("skip", None),  # one per step at least: the agreed non-finite flag
    # the sampler's order (once, on the host), one per log step, two at the epoch's end
    ("stop", 1 + STEPS // LOG_EVERY + 2),
])
def test_host_syncs_per_epoch(accelerator, tmp_path, monkeypatch, nonfinite, most):
    calls = count_syncs(monkeypatch)
    state = run_epoch(accelerator, tmp_path, nonfinite)
    assert state.step == STEPS
    if most is None:
        assert len(calls) >= STEPS, calls
    else:
        assert len(calls) <= most, ",".join(calls)


def test_stop_raises_at_the_next_log_step_and_says_where(accelerator, tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"loss was non-finite between steps 7 and 12 \(5 non-finite micro-batch losses over 1 "
                                                 r"rank\(s\); train.nonfinite=stop\); stopped at step 12, "
                                                 r".*the newest is from before step 7"):
        # NaN losses at steps 8 and 9 only, but without a skip the weights are NaN from then on
        run_epoch(accelerator, tmp_path, "stop", Faults(nonfinite=(8, 9)))


def test_stop_checks_before_a_checkpoint_reads_the_sums(accelerator, tmp_path):
    """on_step's read_sums() is what a checkpoint saves: it must raise, not hand back NaN sums."""
    saved = []

    def on_step(state, read_sums):
        if state.step % 4 == 0:  # a checkpoint every 4 steps
            saved.append((state.step, read_sums()))

    with pytest.raises(NonFiniteLossError, match=r"between steps 7 and 8 \(2 non-finite"):
        run_epoch(accelerator, tmp_path, "stop", Faults(nonfinite=(7, 7)), on_step)
    assert [s for s, _ in saved] == [4]
    assert torch.isfinite(saved[0][1]).all()


def test_skip_skips_and_stop_leaves_a_finite_run_alone(accelerator, tmp_path):
    state = run_epoch(accelerator, tmp_path, "skip", Faults(nonfinite=(3, 4)))
    assert state.step == STEPS and state.nonfinite_total == 2
    assert run_epoch(accelerator, tmp_path, "stop").step == STEPS
