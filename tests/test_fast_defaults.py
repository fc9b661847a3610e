"""Fast by default (issue 21, items 2-4): `auto` precision and channels_last, streamed extraction
batches, and the GPU check scripts' CPU modes.

- `auto` resolves per process: bf16 where CUDA has it, channels_last for convolutional nets on
  CUDA, fp32 and contiguous on a CPU (CUDA is mocked here; there is no GPU on this machine).
  Config files and checkpoints keep the word `auto`; summary.json and meta.json record the values
  a run used and what was asked. A resume keeps the checkpoint's values.
- `channels_last` is auto | true | false, and YAML's booleans (and yes/no/on/off) still read.
- Streaming an in-memory set batch by batch gives the features of the whole-set copy, bit for bit.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import DEMO, ROOT, child_env, ok, summary, train
from toolkit import fast
from toolkit.config import Precision, Switch, load_config, load_extract_config, to_yaml
from toolkit.errors import ConfigError

SHORT = ["train.epochs=1", "sched.milestones=[]", "data.limit=128", "data.batch_size=32", "log.tensorboard=false",
         "log.plots=false"]
EXTRACT = ["data.name=digits", "data.split=test", "model.name=lenet", "extract.shard_size=40"]  # 360 images, 9 shards


def gpu(monkeypatch, bf16: bool = True) -> None:
    """Make torch report a CUDA device (with or without bf16) to the code that asks."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


def cpu_only(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def conv_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 2))


# ------------------------------------------------------------------------------------------
# resolution


def test_auto_precision_is_bf16_on_a_cuda_gpu_with_bf16_and_fp32_elsewhere(monkeypatch):
    gpu(monkeypatch)
    assert fast.resolve_precision("auto") == fast.Resolved("bf16", "auto", "auto: CUDA with bf16")
    gpu(monkeypatch, bf16=False)
    assert fast.resolve_precision("auto").value == "no"
    assert fast.resolve_precision("auto").describe() == "no (auto: this GPU has no bf16)"
    cpu_only(monkeypatch)
    assert fast.resolve_precision(Precision.auto).describe() == "no (auto: no CUDA)"
    for word in ("no", "bf16", "fp16"):  # an explicit value is kept on any device, with no reason shown
        assert fast.resolve_precision(Precision(word)) == fast.Resolved(word, word)
        assert fast.resolve_precision(word).describe() == word


def test_auto_channels_last_is_on_only_for_convolutional_nets_on_cuda(monkeypatch):
    gpu(monkeypatch)
    assert fast.resolve_channels_last(Switch.auto, conv_net()).describe() == "true (auto: convolutional net on CUDA)"
    assert fast.resolve_channels_last("auto", mlp()).describe() == "false (auto: no Conv2d in the model)"
    assert fast.resolve_channels_last("false", conv_net()) == fast.Resolved(False, "false")
    cpu_only(monkeypatch)
    assert fast.resolve_channels_last("auto", conv_net()).describe() == "false (auto: no CUDA)"
    assert fast.resolve_channels_last(Switch.true, mlp()).value is True  # asked: kept, even where it cannot pay
    from toolkit.models import MODELS

    assert fast.is_convolutional(MODELS.build("lenet", num_classes=10))


def test_train_config_resolves_for_the_device_and_config_yaml_keeps_auto(monkeypatch):
    cfg = load_config(DEMO, [])
    assert cfg.train.precision == "auto" and cfg.train.channels_last == "auto"  # the shipped demo states neither
    gpu(monkeypatch)
    prec = fast.resolve_precision(cfg.train.precision)
    from toolkit.models import MODELS

    cl = fast.resolve_channels_last(cfg.train.channels_last, MODELS.build(cfg.model.name, num_classes=10))
    run_cfg = fast.with_resolved(cfg, "train", precision=prec.value, channels_last=cl.value)
    assert run_cfg.train.precision is Precision.bf16 and run_cfg.train.channels_last is Switch.true
    assert cfg.train.precision is Precision.auto  # the asked config is untouched: it is the record
    assert "precision: auto" in to_yaml(cfg) and "channels_last: auto" in to_yaml(cfg)
    stated = load_config(DEMO, ["train.precision=bf16"])  # a config that states a precision keeps it
    cpu_only(monkeypatch)
    assert fast.resolve_precision(stated.train.precision).value == "bf16"


def test_extraction_resolves_for_the_device_and_a_rerun_keeps_the_shards_values(monkeypatch, tmp_path):
    from toolkit import extract as X

    cfg = load_extract_config(None, EXTRACT)
    gpu(monkeypatch)
    run_cfg, speed = X.resolve_speed(cfg, tmp_path / "features", conv_net())
    assert (run_cfg.extract.precision, run_cfg.extract.channels_last) == ("bf16", "true")
    assert speed["precision"].why == "auto: CUDA with bf16"
    # shards computed on a CPU (fp32, contiguous): a rerun on a GPU finishes the set the same way
    out = tmp_path / "features"
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "part-000000.json").write_text("{}")
    (out / "config.yaml").write_text(to_yaml(fast.with_resolved(cfg, "extract", precision="no", channels_last=False)))
    run_cfg, speed = X.resolve_speed(cfg, out, conv_net())
    assert (run_cfg.extract.precision, run_cfg.extract.channels_last) == ("no", "false")
    assert speed["precision"].describe() == "no (auto: kept from the shards already extracted)"
    explicit = load_extract_config(None, [*EXTRACT, "extract.precision=bf16"])  # stated: not adopted (refused later)
    assert X.resolve_speed(explicit, out, conv_net())[0].extract.precision == "bf16"


def test_predict_uses_the_precision_the_run_ran_with_and_decides_channels_last_here(monkeypatch, tmp_path):
    import importlib

    P = importlib.import_module("toolkit.predict")  # the module: `from toolkit import predict` is the function

    run = types.SimpleNamespace(cfg=load_config(DEMO, []), path=tmp_path, model=conv_net())
    gpu(monkeypatch)
    assert P.runs_own_precision(run) == "bf16"  # no summary.json (a run stopped before its test): this device's
    (tmp_path / "summary.json").write_text(json.dumps({"precision": "no"}))
    assert P.runs_own_precision(run) == "no"  # trained (and tested) in fp32 on a CPU: its logits, here too
    assert P.run_precision(run, None, True) == ("no", None)
    assert P.run_precision(run, "bf16", True) == ("bf16", None)  # --precision wins
    assert P.run_channels_last(run) is True
    cpu_only(monkeypatch)
    assert P.run_channels_last(run) is False
    run.cfg = load_config(DEMO, ["train.precision=bf16", "train.channels_last=true"])
    assert P.runs_own_precision(run) == "bf16" and P.run_channels_last(run) is True  # stated: as stated


def test_a_resume_keeps_the_checkpoints_values_and_says_when_it_cannot(monkeypatch):
    gpu(monkeypatch)  # a run begun on a CPU, resumed on a GPU: still fp32 and contiguous
    assert fast.resolve_precision("auto", recorded="no").describe() == "no (auto: kept from the checkpoint)"
    assert fast.resolve_channels_last("auto", conv_net(), recorded=False).value is False
    gpu(monkeypatch, bf16=False)  # begun in bf16, resumed on a GPU without it: the one case that changes
    r = fast.resolve_precision("auto", recorded="bf16")
    assert r.value == "no" and r.changed == "bf16"
    assert fast.change_note("train.precision", r) == ("train.precision: the checkpoint used bf16, which cannot run "
                                                      "on this device; continuing with no (auto: this GPU has no bf16)")
    cpu_only(monkeypatch)  # bf16 autocast runs on any CPU: kept
    assert fast.resolve_precision("auto", recorded="bf16").value == "bf16"
    assert fast.change_note("train.precision", fast.resolve_precision("auto", recorded="bf16")) is None
    assert fast.resolve_precision("no", recorded="bf16").value == "no"  # stated values are never replaced


# ------------------------------------------------------------------------------------------
# config words


@pytest.mark.parametrize("word,want", [("auto", Switch.auto), ("true", Switch.true), ("false", Switch.false),
                                       ("True", Switch.true), ("yes", Switch.true), ("no", Switch.false),
                                       ("on", Switch.true), ("off", Switch.false)])
def test_channels_last_reads_auto_true_false_yes_no_from_overrides_and_yaml(tmp_path, word, want):
    assert load_config(None, [f"train.channels_last={word}"]).train.channels_last is want
    f = tmp_path / "c.yaml"
    f.write_text(f"train:\n  channels_last: {word}\n")
    cfg = load_config(str(f))
    assert cfg.train.channels_last is want and bool(cfg.train.channels_last) is (want is Switch.true)
    again = tmp_path / "again.yaml"
    again.write_text(to_yaml(cfg))  # what config.yaml holds reads back equal
    assert load_config(str(again)) == cfg
    e = load_extract_config(None, [*EXTRACT, f"extract.channels_last={word}"])
    assert e.extract.channels_last is want


def test_defaults_are_auto_an_old_config_yaml_still_reads_and_bad_words_are_one_line(tmp_path):
    assert load_config(None, []).train.precision == "auto" == load_extract_config(None, EXTRACT).extract.precision
    old = tmp_path / "old.yaml"  # written before `auto`: a real YAML boolean and an explicit precision
    old.write_text("train:\n  precision: 'no'\n  channels_last: false\n")
    cfg = load_config(str(old))
    assert cfg.train.precision is Precision.no and cfg.train.channels_last is Switch.false
    with pytest.raises(ConfigError) as ei:
        load_config(None, ["train.channels_last=maybe"])
    assert str(ei.value) == "config: train.channels_last: unknown mode 'maybe'; choose one of: auto, true, false"
    with pytest.raises(ConfigError) as ei:
        load_config(None, ["train.precision=fp8"])
    assert str(ei.value) == "config: train.precision: unknown precision 'fp8'; choose one of: auto, no, bf16, fp16"


# ------------------------------------------------------------------------------------------
# real runs on this CPU


@pytest.mark.slow
def test_a_cpu_training_run_resolves_auto_to_fp32_and_contiguous_and_resumes(tmp_path):
    run = tmp_path / "run"
    proc = ok(train(["--config", DEMO, f"run.dir={run}", *SHORT]))
    assert "precision no (auto: no CUDA), channels_last false (auto: no CUDA)" in proc.stdout
    s = summary(run)
    assert (s["precision"], s["precision_asked"], s["channels_last"], s["channels_last_asked"]) == (
        "no", "auto", False, "auto")
    saved = (run / "config.yaml").read_text()
    assert "precision: auto" in saved and "channels_last: auto" in saved
    ckpt = sorted((run / "checkpoints").glob("step_*"))[-1]
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert (state["precision"], state["channels_last"]) == ("no", False)
    # train.deterministic defaults to false (cudnn.benchmark on a GPU); on a CPU true trains the same weights
    assert "deterministic: false" in saved
    det = tmp_path / "deterministic"
    ok(train(["--config", DEMO, f"run.dir={det}", *SHORT, "train.deterministic=true"]))
    assert (det / "model.safetensors").read_bytes() == (run / "model.safetensors").read_bytes()
    # resuming the `auto` run is not refused, and it continues with the checkpoint's values
    proc = ok(train(["train.resume=auto", f"run.dir={run}", "train.epochs=2"]))
    assert "precision no (auto: kept from the checkpoint), channels_last false (auto: kept from the checkpoint)" \
        in proc.stdout
    s = summary(run)
    assert s["epochs"] == 2 and s["resumed_from"] and s["precision"] == "no" and s["warnings"] == []
    assert "precision: auto" in (run / "config.yaml").read_text()


# ------------------------------------------------------------------------------------------
# extraction: in-memory batches streamed to the device


def test_streamed_batches_are_the_sets_rows_in_order_through_the_reused_buffers():
    from toolkit.features.staging import RING, streamed_batches

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (50, 3, 4, 4), dtype=torch.uint8, generator=g)
    batches = [[5, 1, 9], [0, 2, 4], [49, 48, 47], [7, 8, 10], [11, 12, 13], [30], [3, 6]]  # more than RING
    assert len(batches) > RING + 1
    got = list(streamed_batches(images, batches, torch.device("cpu")))
    assert [idx.tolist() for _, idx in got] == batches
    for (x, idx), b in zip(got, batches):  # kept batches are not overwritten by later ones
        assert torch.equal(x, images[b]) and x.dtype == torch.uint8
    assert list(streamed_batches(images, [], torch.device("cpu"))) == []


def _extract_with(run_dir: Path, streamed: tuple) -> subprocess.CompletedProcess:
    """The extraction CLI in a child process whose toolkit.extract streams on `streamed` devices."""
    code = ("import sys, toolkit.extract as X; X.STREAMED = %r; sys.exit(X.main(sys.argv[1:]))" % (streamed,))
    return subprocess.run([sys.executable, "-c", code, *EXTRACT, f"run.dir={run_dir}"], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_streamed_extraction_gives_the_whole_set_copys_features_bit_for_bit(tmp_path):
    from toolkit.features import read_shard

    a, b = tmp_path / "whole", tmp_path / "streamed"
    ok(_extract_with(a, ("cuda",)))  # this machine's way: the set gathered from one copy
    ok(_extract_with(b, ("cuda", "cpu")))  # streamed through the pinned-buffer ring (plain buffers here)
    for k in range(9):
        x, y = read_shard(a / "features/shards", k), read_shard(b / "features/shards", k)
        assert set(x) == set(y)
        for name in x:
            if isinstance(x[name], torch.Tensor):
                assert torch.equal(x[name], y[name]), (k, name)
    meta = json.loads((b / "features/meta.json").read_text())
    assert (meta["precision"], meta["channels_last"], meta["precision_asked"]) == ("no", False, "auto")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_streamed_batches_on_cuda_equal_the_whole_set_copy():
    from toolkit.features.staging import streamed_batches

    device = torch.device("cuda")
    images = torch.randint(0, 256, (4096, 3, 32, 32), dtype=torch.uint8)
    batches = [list(range(i, min(i + 256, 4096)))[::-1] for i in range(0, 4096, 256)]
    whole = images.to(device)
    for x, idx in streamed_batches(images, batches, device):
        y = whole[idx.to(device)]
        torch.cuda.synchronize()
        assert x.device.type == "cuda" and torch.equal(x, y)


# ------------------------------------------------------------------------------------------
# the GPU check scripts, in their tiny CPU modes


@pytest.mark.slow
@pytest.mark.parametrize("script,part,keys", [
    ("benchmarks/train_peers.py", None, ("plain", "fabric", "toolkit")),
    ("benchmarks/fast_defaults.py", "extract-ceiling", ("extract", "forward")),
    ("benchmarks/fast_defaults.py", "auto-defaults", ("before", "after")),
])
def test_gpu_check_scripts_run_tiny_on_the_cpu_and_write_their_json(tmp_path, script, part, keys):
    out = tmp_path / "out.json"
    args = ([part] if part else []) + ["--device", "cpu", "--tiny", "--json", str(out)]
    proc = subprocess.run([sys.executable, script, *args], cwd=ROOT, env=child_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["device"]["type"] == "cpu" and res["tiny"] is True
    for key in keys:
        r = res["results"][key]
        if r.get("skipped"):  # Lightning is not installed here (it is on the lent GPU machines)
            assert key == "fabric" and "lightning" in r["skipped"]
            continue
        assert r["images_per_s"] > 0 and len(r["runs_images_per_s"]) == res["repeats"], key
    assert all(v > 0 for v in res["ratios"].values()) and res["ratios"]
