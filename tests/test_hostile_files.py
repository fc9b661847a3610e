"""Files the toolkit reads but did not necessarily write (issue 17, items 9 and 12).

9:  a weights file (`model.pretrained=...`) or a checkpoint holding a pickle payload is refused in
    one line that names the file and does not pass on PyTorch's advice to load it with
    `weights_only=False` (or to allowlist the payload's globals); the payload never runs.
12: `python -m toolkit.retrieve` checks a features directory before it answers: a deleted or
    shortened manifest, a flipped byte in a shard, counts that disagree are one `error:` line
    naming the damaged file, exit 2.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from helpers import DEMO, ok, run_module, train
from toolkit.errors import ConfigError

# What PyTorch's refusal goes on to advise; none of it may reach the user for a file from elsewhere.
ADVICE = ("weights_only=False", "`weights_only` set to `False`", "can still be loaded", "add_safe_globals",
          "safe_globals(", "if you trust")
TINY = ["data.limit=240", "sched.milestones=[]", "log.plots=false", "log.tensorboard=false"]


class SystemPayload:
    """`os.system` (a module torch's weights-only unpickler blocks outright) touching MARKER."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class OpenPayload:
    """A global torch merely does not allow (io.open): creates MARKER."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def one_error_line(proc: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def no_advice(line: str) -> None:
    assert not any(a in line for a in ADVICE), line


# ------------------------------------------------------------------------------------------
# 9: weights and checkpoints


@pytest.mark.parametrize("payload", [SystemPayload, OpenPayload])
@pytest.mark.parametrize("kind", ["torch.save", "legacy", "raw pickle"])
def test_a_refused_weights_file_is_named_without_unsafe_advice(tmp_path, payload, kind):
    import pickle

    from toolkit.models.weights import read_state_dict

    path, marker = tmp_path / "evil.pth", tmp_path / "RAN"
    obj = {"conv1.weight": torch.zeros(1), "payload": payload(marker)}
    if kind == "raw pickle":
        path.write_bytes(pickle.dumps(obj))
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=kind == "torch.save")
    with pytest.raises(ConfigError) as e:
        read_state_dict(path)
    line = str(e.value)
    assert "\n" not in line and str(path) in line and "weights_only=True" in line
    no_advice(line)
    assert not marker.exists()


@pytest.mark.slow
def test_pretrained_weights_with_a_payload_are_refused_through_the_cli(tmp_path):
    evil, marker = tmp_path / "evil.pth", tmp_path / "RAN"
    torch.save({"conv1.weight": torch.zeros(6, 1, 5, 5), "payload": SystemPayload(marker)}, evil)
    line = one_error_line(train(["--config", DEMO, f"run.dir={tmp_path / 'run'}", f"model.pretrained={evil}", *TINY]),
                          2, str(evil), "weights_only=True")
    no_advice(line)
    assert not marker.exists()


def _plant_in_checkpoint(ckpt: Path, name: str, payload) -> None:
    """Replace NAME in a checkpoint and update COMPLETE.json as an attacker would (the checksums
    are not keyed), so the file reaches the loader."""
    torch.save({"state": {}, "param_groups": [], "payload": payload}, ckpt / name)
    marker = json.loads((ckpt / "COMPLETE.json").read_text())
    data = (ckpt / name).read_bytes()
    marker["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "COMPLETE.json").write_text(json.dumps(marker))


@pytest.mark.slow
def test_a_checkpoint_with_a_payload_is_refused_naming_the_file(tmp_path):
    run, marker = tmp_path / "run", tmp_path / "RAN"
    args = ["--config", DEMO, f"run.dir={run}", "train.epochs=2", *TINY]
    crashed = train(args, env={"TOOLKIT_FAULT_RAISE_AT_STEP": "9"})  # epoch 1 is 7 steps: step_7 is saved
    assert crashed.returncode != 0 and (run / "checkpoints" / "step_7" / "COMPLETE.json").is_file(), crashed.stderr
    ckpt = run / "checkpoints" / "step_7"
    saved = tmp_path / "saved"
    shutil.copytree(ckpt, saved)
    for name, payload in (("optimizer.bin", SystemPayload(marker)), ("random_states_0.pkl", OpenPayload(marker))):
        _plant_in_checkpoint(ckpt, name, payload)
        line = one_error_line(train([*args, "train.resume=auto"]), 1, f"refusing {ckpt / name}:", "weights_only=True")
        no_advice(line)
        assert not marker.exists()
        shutil.rmtree(ckpt)
        shutil.copytree(saved, ckpt)
    ok(train([*args, "train.resume=auto"]))  # the untouched checkpoint still resumes


# ------------------------------------------------------------------------------------------
# 12: retrieve over a damaged features directory


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    """100 digits through LeNet, 3 shards of 40, 40 and 20 rows."""
    run = tmp_path_factory.mktemp("features") / "run"
    ok(run_module("toolkit.extract", ["data.name=digits", "data.split=test", "model.name=lenet",
                                      "extract.shard_size=40", "data.limit=100", f"run.dir={run}"]))
    return run / "features"


@pytest.fixture
def copy(features, tmp_path) -> Path:
    out = tmp_path / "features"
    shutil.copytree(features, out)
    return out


def retrieve(*args: str) -> subprocess.CompletedProcess:
    return run_module("toolkit.retrieve", list(args))


def both(feats: Path, *needles: str) -> None:
    """search (streaming, and by row) and eval each refuse in one line, exit 2."""
    for cmd in (["search", "--features", str(feats), "--query-index", "3"],
                ["eval", "--features", str(feats), "--topk", "1,5"]):
        one_error_line(retrieve(*cmd), 2, *needles)


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_an_intact_features_directory_answers(features):
    ok(retrieve("search", "--features", str(features), "--query-index", "3", "--verify"))
    ok(retrieve("eval", "--features", str(features), "--topk", "1,5", "--out", str(features.parent / "e.json")))


@pytest.mark.slow
def test_a_deleted_manifest_is_named(copy):
    (copy / "manifest.csv").unlink()
    both(copy, f"{copy / 'manifest.csv'} is missing", "rerun the same extraction")


@pytest.mark.slow
def test_a_shortened_manifest_is_named(copy):
    lines = (copy / "manifest.csv").read_text().splitlines(keepends=True)
    (copy / "manifest.csv").write_text("".join(lines[:-10]))
    both(copy, f"{copy / 'manifest.csv'} has 90 rows, meta.json says 100")


@pytest.mark.slow
def test_another_extractions_manifest_is_named(copy):
    """Same length and row numbers, other images: the index column disagrees with the shards."""
    lines = (copy / "manifest.csv").read_text().splitlines(keepends=True)
    head, rows = lines[0], lines[1:]
    fields = [r.split(",", 1) for r in rows]
    shuffled = [f"{n},{rest}" for (n, _), (_, rest) in zip(fields, fields[1:] + fields[:1])]  # rows shifted by one
    (copy / "manifest.csv").write_text(head + "".join(shuffled))
    both(copy, f"{copy / 'manifest.csv'} rows 0..39 do not match")


@pytest.mark.slow
def test_a_flipped_byte_in_a_shard_is_named(copy):
    shard = copy / "shards" / "part-000001.safetensors"
    _flip(shard, shard.stat().st_size - 5)  # inside the tensors: still a valid safetensors file
    both(copy, f"{shard} fails its checksum")
    one_error_line(retrieve("eval", "--features", str(copy), "--verify"), 2, f"{shard} fails its checksum")


@pytest.mark.slow
def test_counts_and_markers_that_disagree_are_named(copy):
    meta = json.loads((copy / "meta.json").read_text())
    (copy / "meta.json").write_text(json.dumps({**meta, "rows": 99}))
    both(copy, f"{copy / 'meta.json'} says 99 rows, its 3 shards hold 100")
    (copy / "meta.json").write_text(json.dumps(meta))
    marker = copy / "shards" / "part-000002.json"
    marker.unlink()
    both(copy, f"{marker} is missing")


@pytest.mark.slow
def test_shards_swapped_with_their_markers_are_named(copy):
    """Each shard passes its own checksum, but holds another shard's rows."""
    shards = copy / "shards"
    for ext in (".json", ".safetensors"):
        a, b = shards / f"part-000000{ext}", shards / f"part-000001{ext}"
        tmp = shards / "tmp"
        a.rename(tmp), b.rename(a), tmp.rename(b)
    both(copy, f"{shards / 'part-000000.safetensors'} holds dataset indices outside shard 0's range [0, 40)")


@pytest.mark.slow
def test_checksums_are_automatic_for_small_sets_and_on_request_for_large(features, tmp_path, monkeypatch):
    from toolkit.features import load_features, store

    copy = tmp_path / "features"
    shutil.copytree(features, copy)
    shard = copy / "shards" / "part-000000.safetensors"
    _flip(shard, shard.stat().st_size - 5)
    with pytest.raises(ConfigError, match="fails its checksum"):
        load_features(copy)  # 100 x 84 floats: small, so always hashed
    monkeypatch.setattr(store, "VERIFY_AUTO_BYTES", 0)  # as if the set were large
    assert load_features(copy).features.shape == (100, 84)  # sizes and shapes hold: not hashed
    with pytest.raises(ConfigError, match="fails its checksum"):
        load_features(copy, verify=True)
