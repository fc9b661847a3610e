"""Unit tests for the small pieces: registry, models, digits data, augmentation, sampler,
schedules and fault injection."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from toolkit.data import DATASETS
from toolkit.data.augment import AUGMENTS, random_crop
from toolkit.data.samplers import EpochSampler
from toolkit.errors import ConfigError
from toolkit.faults import Faults
from toolkit.models import MODELS
from toolkit.optim import OPTIMIZERS, SCHEDULERS, param_groups
from toolkit.registry import Registry

# ---------------------------------------------------------------------------------------------
# Registry


def test_registry_register_build_and_twice():
    reg = Registry("widget")

    @reg.register("b")
    def b(x=1):
        return ("b", x)

    @reg.register("a")
    def a():
        return "a"

    assert reg.build("b", x=5) == ("b", 5)
    assert reg.get("a") is a
    assert "a" in reg and "zzz" not in reg
    assert reg.names() == ["a", "b"]
    with pytest.raises(ValueError, match="'b' registered twice"):
        reg.register("b")(lambda: None)
    assert reg.get("b") is b  # the first registration survives


def test_registry_names_sorted():
    reg = Registry("thing")
    for name in ["zeta", "alpha", "mid", "Beta"]:
        reg.register(name)(lambda: None)
    assert reg.names() == sorted(["zeta", "alpha", "mid", "Beta"])


def test_registry_check_lists_names():
    reg = Registry("widget")
    for name in ["c", "a", "b"]:
        reg.register(name)(lambda: None)
    reg.check("a")  # known: no error
    with pytest.raises(ConfigError) as ei:
        reg.check("nope", "section.key")
    assert str(ei.value) == "config: section.key: unknown widget 'nope'; choose one of: a, b, c"
    with pytest.raises(ConfigError) as ei:
        reg.get("nope")
    assert str(ei.value) == "unknown widget 'nope'; choose one of: a, b, c"
    with pytest.raises(ConfigError):
        reg.build("nope")


def test_a_listed_registry_knows_names_before_import_and_refuses_unlisted_ones(tmp_path, monkeypatch):
    """toolkit.catalog's registries: names without importing the module, the module imported on
    first build, and a name registered from a module not listed for it refused."""
    (tmp_path / "widgets_mod.py").write_text(
        "import test_reg_home as h\n"
        "@h.REG.register('gear')\n"
        "def gear(n):\n    return ('gear', n)\n")
    (tmp_path / "test_reg_home.py").write_text(
        "from toolkit.registry import Registry\nREG = Registry('widget', {'widgets_mod': ('gear',)})\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import test_reg_home

    reg = test_reg_home.REG
    assert reg.names() == ["gear"] and "gear" in reg and "widgets_mod" not in sys.modules
    reg.check("gear")
    assert reg.build("gear", n=3) == ("gear", 3) and "widgets_mod" in sys.modules
    with pytest.raises(ValueError, match="does not list"):
        reg.register("other")(lambda: None)
    with pytest.raises(ConfigError, match="unknown widget 'nope'; choose one of: gear"):
        reg.check("nope")
    sys.modules.pop("widgets_mod"), sys.modules.pop("test_reg_home")


def test_global_registries_hold_what_the_experiments_need():
    assert {"lenet", "simple_cnn", "base_cnn", "res_basic", "res_bottleneck", "resnet18_cifar",
            "vgg16_bn_cifar", "resnet18", "resnet34", "resnet50", "vgg16", "vgg16_bn",
            "mobilenet_v3_small"} <= set(MODELS.names())
    assert "digits" in DATASETS.names()
    assert {"crop", "none"} <= set(AUGMENTS.names())
    assert {"sgd", "rmsprop", "adam", "adamw", "adagrad"} <= set(OPTIMIZERS.names())
    assert {"constant", "multistep", "step", "cosine", "onecycle"} <= set(SCHEDULERS.names())


# ---------------------------------------------------------------------------------------------
# Models


@pytest.mark.parametrize("name", MODELS.names())
def test_model_output_shape(name):
    torch.manual_seed(0)
    model = MODELS.build(name, num_classes=7)
    assert isinstance(model, nn.Module)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_lenet_param_count():
    model = MODELS.build("lenet", num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == 62_006


def test_resnet18_cifar_param_count():
    # Standard CIFAR ResNet-18 at 10 classes: 11,173,962 parameters.
    model = MODELS.build("resnet18_cifar", num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == 11_173_962


# ---------------------------------------------------------------------------------------------
# digits data


@pytest.fixture(scope="module")
def digits0():
    return DATASETS.build("digits", root=None, split_seed=0, limit=None)


@pytest.fixture(scope="module")
def all_labels():
    from sklearn.datasets import load_digits
    return load_digits().target


def test_digits_sizes(digits0):
    assert (len(digits0.train), len(digits0.val), len(digits0.test)) == (1257, 180, 360)
    assert digits0.num_classes == 10
    assert digits0.class_names == [str(i) for i in range(10)]
    assert digits0.meta["sizes"] == {"train": 1257, "val": 180, "test": 360}
    assert digits0.meta["image_size"] == 32


def test_digits_stratified(digits0, all_labels):
    totals = np.bincount(all_labels, minlength=10)
    for split, frac in (("train", 0.7), ("val", 0.1), ("test", 0.2)):
        counts = torch.bincount(getattr(digits0, split).labels, minlength=10).numpy()
        assert (counts > 0).all(), f"{split} lacks a class: {counts}"
        expected = totals * frac
        assert np.abs(counts - expected).max() <= 2, (split, counts, expected)


def test_digits_split_indices_partition(all_labels):
    from toolkit.data.digits import split_indices
    tr, va, te = split_indices(all_labels, 0)
    allidx = np.concatenate([tr, va, te])
    assert sorted(allidx.tolist()) == list(range(1797))  # disjoint and covering
    assert (np.diff(tr) > 0).all() and (np.diff(va) > 0).all() and (np.diff(te) > 0).all()


def test_digits_read_without_sklearn_equals_load_digits():
    """The default path reads scikit-learn's file itself; it must give load_digits' arrays."""
    from sklearn.datasets import load_digits
    from toolkit.data.digits import load_raw
    flat, target = load_raw()
    raw = load_digits()
    assert np.array_equal(flat, raw.data) and np.array_equal(target, raw.target)


def test_digits_shipped_split_is_sklearns(all_labels):
    """digits_split_seed0.txt is what scikit-learn's stratified split gives for split_seed 0, and
    seed 0 uses it; another seed is computed (and differs)."""
    from toolkit.data.digits import computed_split, shipped_split, split_indices
    for got, want in zip(shipped_split(len(all_labels)), computed_split(all_labels, 0)):
        assert np.array_equal(got, want)
    for got, want in zip(split_indices(all_labels, 0), computed_split(all_labels, 0)):
        assert np.array_equal(got, want)
    assert not np.array_equal(split_indices(all_labels, 1)[0], split_indices(all_labels, 0)[0])


def test_default_digits_run_does_not_import_sklearn():
    """scikit-learn's import is ~1.2 s of a demo run: the default digits set must not need it."""
    code = ("import sys; from toolkit.data import DATASETS; "
            "DATASETS.build('digits', root=None, split_seed=0, limit=None); "
            "print('sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_digits_split_matches_labels(digits0, all_labels):
    from toolkit.data.digits import split_indices
    tr, va, te = split_indices(all_labels, 0)
    assert digits0.train.labels.tolist() == all_labels[tr].tolist()
    assert digits0.val.labels.tolist() == all_labels[va].tolist()
    assert digits0.test.labels.tolist() == all_labels[te].tolist()


def test_digits_images_float_and_normalised(digits0):
    for ds in (digits0.train, digits0.val, digits0.test):
        assert ds.images.dtype == torch.float32
        assert ds.images.shape[1:] == (3, 32, 32)
        assert ds.labels.dtype == torch.int64
        assert ds.images.shape[0] == ds.labels.shape[0]
    x = digits0.train.images
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.zeros(3), atol=1e-3), mean
    assert torch.allclose(std, torch.ones(3), atol=1e-3), std
    # val/test use the train statistics: close to, but not exactly, normalised
    assert abs(float(digits0.test.images.mean())) < 0.2
    assert len(digits0.meta["mean"]) == 3 and len(digits0.meta["std"]) == 3
    assert 0 < digits0.meta["mean"][0] < 1 and 0 < digits0.meta["std"][0] < 1


def test_digits_getitems(digits0):
    x, y = digits0.train.__getitems__([0, 5, 2])
    assert x.shape == (3, 3, 32, 32) and y.tolist() == [
        int(digits0.train.labels[0]), int(digits0.train.labels[5]), int(digits0.train.labels[2])]
    xi, yi = digits0.train[5]
    assert torch.equal(xi, x[1]) and int(yi) == int(y[1])


def test_digits_split_seed(digits0):
    same = DATASETS.build("digits", root=None, split_seed=0, limit=None)
    for split in ("train", "val", "test"):
        a, b = getattr(digits0, split), getattr(same, split)
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    other = DATASETS.build("digits", root=None, split_seed=1, limit=None)
    assert (len(other.train), len(other.val), len(other.test)) == (1257, 180, 360)
    assert not torch.equal(other.test.images, digits0.test.images)
    assert not torch.equal(other.val.labels, digits0.val.labels) or \
        not torch.equal(other.val.images, digits0.val.images)


@pytest.mark.parametrize("limit,sizes", [(50, (50, 50, 50)), (200, (200, 180, 200)),
                                         (10_000, (1257, 180, 360))])
def test_digits_limit(limit, sizes):
    s = DATASETS.build("digits", root=None, split_seed=0, limit=limit)
    assert (len(s.train), len(s.val), len(s.test)) == sizes
    assert s.meta["sizes"] == dict(zip(("train", "val", "test"), sizes))


def test_digits_limit_keeps_prefix(digits0):
    s = DATASETS.build("digits", root=None, split_seed=0, limit=50)
    # labels are the first 50 of the same split; images differ only by normalisation stats
    assert torch.equal(s.test.labels, digits0.test.labels[:50])
    assert torch.equal(s.val.labels, digits0.val.labels[:50])


# ---------------------------------------------------------------------------------------------
# augmentation


def test_augment_none_builds_none():
    assert AUGMENTS.build("none") is None


def _shift_of(out: torch.Tensor, padded: torch.Tensor, pad: int):
    """(dy, dx) such that out == padded[:, dy:dy+h, dx:dx+w], or None."""
    _, h, w = out.shape
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            if torch.equal(out, padded[:, dy:dy + h, dx:dx + w]):
                return dy, dx
    return None


def test_augment_crop_is_a_translation():
    torch.manual_seed(1)
    aug = AUGMENTS.build("crop")
    assert callable(aug)
    x = torch.randn(16, 3, 32, 32)
    out = aug(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.is_contiguous()
    padded = F.pad(x, (4, 4, 4, 4), mode="replicate")
    shifts = []
    for i in range(len(x)):
        s = _shift_of(out[i], padded[i], 4)
        assert s is not None, f"sample {i} is not an edge-replicated shift of its input"
        shifts.append(s)
    # with 16 samples and 81 offsets, the offsets are not all the same (per-sample randomness)
    assert len(set(shifts)) > 1
    assert not torch.equal(out, x) or all(s == (4, 4) for s in shifts)


def test_augment_crop_rectangular_and_pad():
    torch.manual_seed(2)
    x = torch.randn(5, 2, 7, 11)
    out = random_crop(x, 2)
    assert out.shape == x.shape
    padded = F.pad(x, (2, 2, 2, 2), mode="replicate")
    for i in range(len(x)):
        assert _shift_of(out[i], padded[i], 2) is not None


def test_augment_crop_seeded():
    x = torch.randn(8, 3, 32, 32)
    aug = AUGMENTS.build("crop", pad=4)
    torch.manual_seed(5)
    a = aug(x)
    torch.manual_seed(5)
    b = aug(x)
    assert torch.equal(a, b)


def test_augment_crop_shard_matches_global_batch():
    # A rank holding samples start..start+b of a global batch of `total` crops them exactly as
    # one process cropping the whole batch would (same global RNG state on every rank).
    x = torch.randn(12, 3, 32, 32)
    aug = AUGMENTS.build("crop")
    torch.manual_seed(9)
    whole = aug(x)
    for start, b in ((0, 4), (4, 4), (8, 4), (6, 6)):
        torch.manual_seed(9)
        part = aug(x[start:start + b], start, 12)
        assert torch.equal(part, whole[start:start + b]), (start, b)


# ---------------------------------------------------------------------------------------------
# EpochSampler


def test_epoch_sampler_permutation():
    s = EpochSampler(100, seed=3)
    order = list(s)
    assert len(s) == 100
    assert sorted(order) == list(range(100))
    assert order != list(range(100))


def test_epoch_sampler_deterministic_and_epoch_dependent():
    a, b = EpochSampler(50, seed=7), EpochSampler(50, seed=7)
    a.set_epoch(2)
    b.set_epoch(2)
    first = list(a)
    assert first == list(b)
    assert first == list(a)  # iterating again gives the same order
    b.set_epoch(3)
    assert list(b) != first
    c = EpochSampler(50, seed=8)
    c.set_epoch(2)
    assert list(c) != first


def test_epoch_sampler_ignores_global_rng():
    s = EpochSampler(64, seed=1)
    s.set_epoch(4)
    torch.manual_seed(0)
    a = list(s)
    torch.manual_seed(12345)
    torch.rand(1000)
    b = list(s)
    assert a == b
    torch.manual_seed(99)
    before = torch.get_rng_state()
    list(s)
    list(iter(s))
    assert torch.equal(torch.get_rng_state(), before)
    # and the next global draw is what it would have been without the sampler
    expected = torch.rand(3, generator=torch.Generator().manual_seed(99))
    assert torch.equal(torch.rand(3), expected)


# ---------------------------------------------------------------------------------------------
# optimizers and schedules


def _opt(lr=0.1):
    model = nn.Linear(3, 2)
    return OPTIMIZERS.build("sgd", params=param_groups(model, 0.0), lr=lr, momentum=0.9)


def test_sgd_builder():
    opt = OPTIMIZERS.build("sgd", params=[nn.Parameter(torch.zeros(2))], lr=0.3, momentum=0.0,
                           nesterov=True, weight_decay=0.01)
    g = opt.param_groups[0]
    assert isinstance(opt, torch.optim.SGD)
    assert g["lr"] == 0.3 and g["weight_decay"] == 0.01
    assert g["nesterov"] is False  # nesterov needs momentum > 0
    opt = OPTIMIZERS.build("sgd", params=[nn.Parameter(torch.zeros(2))], lr=0.3, momentum=0.9,
                           nesterov=True)
    assert opt.param_groups[0]["nesterov"] is True


def test_param_groups_skip_frozen():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    for p in model[0].parameters():
        p.requires_grad_(False)
    groups = param_groups(model, 0.01)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.01
    assert [p.shape for p in groups[0]["params"]] == [torch.Size([2, 4]), torch.Size([2])]


def test_multistep_epochs_to_steps():
    spe, base, gamma = 5, 0.1, 0.5
    opt = _opt(base)
    sched = SCHEDULERS.build("multistep", optimizer=opt, steps_per_epoch=spe,
                             milestones=[2, 4], gamma=gamma, epochs=6)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(6 * spe):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    # lrs[k] is the lr after k steps
    for k in range(0, 2 * spe):
        assert lrs[k] == pytest.approx(base), k
    for k in range(2 * spe, 4 * spe):
        assert lrs[k] == pytest.approx(base * gamma), k
    for k in range(4 * spe, 6 * spe + 1):
        assert lrs[k] == pytest.approx(base * gamma ** 2), k


def test_constant_schedule():
    opt = _opt(0.2)
    sched = SCHEDULERS.build("constant", optimizer=opt, steps_per_epoch=3, milestones=[1],
                             gamma=0.1, epochs=3)
    for _ in range(9):
        opt.step()
        sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(0.2)


# ---------------------------------------------------------------------------------------------
# faults

FAULT_VARS = ("TOOLKIT_FAULT_KILL_AT_STEP", "TOOLKIT_FAULT_RAISE_AT_STEP",
              "TOOLKIT_FAULT_NONFINITE_STEPS")


@pytest.fixture
def clean_env(monkeypatch):
    for v in FAULT_VARS:
        monkeypatch.delenv(v, raising=False)
    return monkeypatch


def test_faults_off_by_default(clean_env):
    f = Faults.from_env()
    assert f == Faults(kill=None, raise_=None, nonfinite=None)
    loss = torch.tensor(1.5)
    for step in range(1, 20):
        assert f.loss(loss, step) is loss
        f.after_step(step, 0)  # no raise


def test_faults_nonfinite_range(clean_env):
    clean_env.setenv("TOOLKIT_FAULT_NONFINITE_STEPS", "3-5")
    f = Faults.from_env()
    assert f.nonfinite == (3, 5)
    loss = torch.tensor(2.0, requires_grad=True)
    for step in range(1, 9):
        out = f.loss(loss, step)
        if 3 <= step <= 5:
            assert math.isnan(out.item()), step
            assert out.requires_grad  # still part of the graph
        else:
            assert out.item() == 2.0, step


def test_faults_nonfinite_single_step(clean_env):
    clean_env.setenv("TOOLKIT_FAULT_NONFINITE_STEPS", "4")
    f = Faults.from_env()
    assert f.nonfinite == (4, 4)
    assert [math.isnan(f.loss(torch.tensor(1.0), s).item()) for s in range(1, 7)] == \
        [False, False, False, True, False, False]


def test_faults_nonfinite_on_one_rank(clean_env):
    clean_env.setenv("TOOLKIT_FAULT_NONFINITE_STEPS", "2-3@1")
    f = Faults.from_env()
    assert f.nonfinite == (2, 3) and f.nonfinite_rank == 1
    assert [math.isnan(f.loss(torch.tensor(1.0), s, rank=1).item()) for s in range(1, 5)] == \
        [False, True, True, False]
    assert not any(math.isnan(f.loss(torch.tensor(1.0), s, rank=0).item()) for s in range(1, 5))


def test_faults_raise_at_rank(clean_env):
    clean_env.setenv("TOOLKIT_FAULT_RAISE_AT_STEP", "7@1")
    f = Faults.from_env()
    assert f.raise_ == (7, 1)
    assert f.kill is None and f.nonfinite is None
    f.after_step(7, 0)  # other rank: nothing
    f.after_step(7, 2)
    f.after_step(6, 1)  # other step: nothing
    f.after_step(8, 1)
    with pytest.raises(RuntimeError, match="injected failure on rank 1 at step 7"):
        f.after_step(7, 1)


def test_faults_raise_every_rank(clean_env):
    clean_env.setenv("TOOLKIT_FAULT_RAISE_AT_STEP", "3")
    f = Faults.from_env()
    assert f.raise_ == (3, None)
    for rank in range(3):
        with pytest.raises(RuntimeError, match=f"rank {rank} at step 3"):
            f.after_step(3, rank)
    f.after_step(2, 0)


def test_faults_kill_parsing(clean_env):
    # Only the parsing: actually delivering SIGKILL would end the test process.
    clean_env.setenv("TOOLKIT_FAULT_KILL_AT_STEP", "12@0")
    f = Faults.from_env()
    assert f.kill == (12, 0)
    f.after_step(11, 0)
    f.after_step(12, 1)  # other rank: not killed
    clean_env.setenv("TOOLKIT_FAULT_KILL_AT_STEP", "5")
    assert Faults.from_env().kill == (5, None)


def test_leave_joins_threads_runs_atexit_handlers_and_exits_with_the_code(tmp_path):
    """toolkit.errors.leave: what Python's exit does (threads joined, atexit handlers and
    weakref finalizers run, output flushed), then the status; only the module teardown is skipped."""
    code = textwrap.dedent("""
        import atexit, sys, tempfile, threading, time, weakref
        from toolkit.errors import leave
        atexit.register(lambda: print("atexit handler ran"))
        scratch = tempfile.TemporaryDirectory(dir=sys.argv[1])   # removed by its finalizer at exit
        threading.Thread(target=lambda: (time.sleep(0.3), print("thread finished"))).start()
        sys.stdout.write("unflushed line")
        leave(7)
    """)
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 7, proc.stderr
    assert proc.stdout == "unflushed linethread finished\natexit handler ran\n", proc.stdout
    assert list(tmp_path.iterdir()) == [], "the temporary directory's finalizer did not run"
