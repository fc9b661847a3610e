"""Unit tests for toolkit.checkpoint: verification of hand-made directories, and save() with a
real single-process Accelerator on CPU."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from toolkit import checkpoint
from toolkit.checkpoint import MARKER, STATE, find_resumable, list_checkpoints, read_state, verify

# ---------------------------------------------------------------------------------------------
# hand-made checkpoint directories


def make_ckpt(root: Path, step: int, files=None, name: str | None = None) -> Path:
    """A directory that looks like a complete checkpoint: files plus a correct COMPLETE.json."""
    files = files if files is not None else {
        "model.safetensors": b"\x00weights" * 50,
        "optimizer.bin": bytes(range(256)) * 3,
        "sub/random_states_0.pkl": b"rng-state",
        STATE: json.dumps({"step": step}).encode(),
    }
    path = root / (name or f"step_{step}")
    path.mkdir(parents=True)
    listing = {}
    for rel, data in files.items():
        f = path / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(data)
        listing[rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (path / MARKER).write_text(json.dumps({"step": step, "files": listing}))
    return path


def test_intact_is_none(tmp_path):
    path = make_ckpt(tmp_path, 3)
    assert verify(path) is None


def test_missing_marker(tmp_path):
    path = make_ckpt(tmp_path, 3)
    (path / MARKER).unlink()
    reason = verify(path)
    assert reason is not None and "no completion marker" in reason


def test_truncated_file(tmp_path):
    path = make_ckpt(tmp_path, 3)
    f = path / "optimizer.bin"
    data = f.read_bytes()
    f.write_bytes(data[:100])
    reason = verify(path)
    assert reason is not None
    assert reason.startswith("optimizer.bin ")
    assert "truncated" in reason and f"100 of {len(data)} bytes" in reason


def test_flipped_byte_same_size(tmp_path):
    path = make_ckpt(tmp_path, 3)
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[17] ^= 0x01
    f.write_bytes(bytes(data))
    assert f.stat().st_size == len(data)
    reason = verify(path)
    assert reason == "model.safetensors fails its checksum"


def test_flipped_byte_in_nested_file(tmp_path):
    path = make_ckpt(tmp_path, 3)
    f = path / "sub" / "random_states_0.pkl"
    f.write_bytes(b"rng-statf")
    assert verify(path) == "sub/random_states_0.pkl fails its checksum"


def test_missing_file(tmp_path):
    path = make_ckpt(tmp_path, 3)
    (path / "optimizer.bin").unlink()
    assert verify(path) == "optimizer.bin is missing"


@pytest.mark.parametrize("text", ["{not json", "", '{"step": 3}', '{"step": 3, "file": {}}'])
def test_unreadable_marker(tmp_path, text):
    path = make_ckpt(tmp_path, 3)
    (path / MARKER).write_text(text)
    assert verify(path) == "completion marker is unreadable"


def test_marker_binary_garbage(tmp_path):
    path = make_ckpt(tmp_path, 3)
    (path / MARKER).write_bytes(b"\xff\xfe\x00garbage")
    assert verify(path) == "completion marker is unreadable"


@pytest.mark.parametrize("text", [
    "[]",
    "null",
    '{"step": 3, "files": []}',
    '{"step": 3, "files": {"optimizer.bin": {"sizf": 768, "sha256": "00"}}}',
])
def test_marker_wrong_shape_is_a_reason_not_a_crash(tmp_path, text):
    path = make_ckpt(tmp_path, 3)
    (path / MARKER).write_text(text)
    reason = verify(path)
    assert isinstance(reason, str) and reason


def test_extra_file_not_in_marker_is_ignored(tmp_path):
    path = make_ckpt(tmp_path, 3)
    (path / "stray.txt").write_text("x")
    assert verify(path) is None


# ---------------------------------------------------------------------------------------------
# list_checkpoints / find_resumable


def test_list_checkpoints_order_and_filter(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 10, 7):
        make_ckpt(root, step)
    make_ckpt(root, 50, name=".tmp-step_50")
    make_ckpt(root, 60, name="step_x")
    make_ckpt(root, 70, name="step_")
    make_ckpt(root, 80, name="step_12.bad")
    make_ckpt(root, 90, name="other_90")
    (root / "step_99").write_text("a file, not a dir")
    assert [p.name for p in list_checkpoints(root)] == ["step_10", "step_7", "step_2"]


def test_list_checkpoints_numeric_not_lexical(tmp_path):
    for step in (9, 100, 20):
        make_ckpt(tmp_path, step)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_100", "step_20", "step_9"]


def test_list_checkpoints_missing_root(tmp_path):
    assert list_checkpoints(tmp_path / "nope") == []
    assert find_resumable(tmp_path / "nope") == (None, [])


def test_find_resumable_newest_intact(tmp_path):
    for step in (1, 2, 3):
        make_ckpt(tmp_path, step)
    path, skipped = find_resumable(tmp_path)
    assert path == tmp_path / "step_3"
    assert skipped == []


def test_find_resumable_skips_newer_bad(tmp_path):
    make_ckpt(tmp_path, 4)
    good = make_ckpt(tmp_path, 8)
    trunc = make_ckpt(tmp_path, 12)
    (trunc / "optimizer.bin").write_bytes(b"short")
    nomarker = make_ckpt(tmp_path, 16)
    (nomarker / MARKER).unlink()
    make_ckpt(tmp_path, 99, name=".tmp-step_99")  # ignored entirely
    make_ckpt(tmp_path, 98, name="step_x")
    path, skipped = find_resumable(tmp_path)
    assert path == good
    assert [p.name for p, _ in skipped] == ["step_16", "step_12"]
    assert "no completion marker" in skipped[0][1]
    assert skipped[1][1].startswith("optimizer.bin is truncated")
    # the older intact one is never looked at beyond the first intact
    assert all(p.name != "step_4" for p, _ in skipped)


def test_find_resumable_none_intact(tmp_path):
    a = make_ckpt(tmp_path, 1)
    b = make_ckpt(tmp_path, 2)
    (a / "optimizer.bin").unlink()
    (b / MARKER).write_text("{")
    path, skipped = find_resumable(tmp_path)
    assert path is None
    assert skipped == [(b, "completion marker is unreadable"), (a, "optimizer.bin is missing")]


def test_read_state(tmp_path):
    path = make_ckpt(tmp_path, 5)
    assert read_state(path) == {"step": 5}


# ---------------------------------------------------------------------------------------------
# save() with a real Accelerator


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    acc = Accelerator(cpu=True)
    yield acc
    AcceleratorState._reset_state(True)


@pytest.fixture
def prepared(accelerator):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, opt = accelerator.prepare(model, opt)
    # one real step so the optimizer has momentum state to save
    loss = model(torch.randn(5, 4)).pow(2).sum()
    accelerator.backward(loss)
    opt.step()
    opt.zero_grad()
    return accelerator, model, opt


def test_save_end_to_end(prepared, tmp_path):
    acc, model, opt = prepared
    root = tmp_path / "checkpoints"
    state = {"epoch": 1, "batch": 3, "step": 7, "best_val_acc": 0.5, "epoch_sums": [1.0, 2.0, 3.0]}
    final = checkpoint.save(acc, root, 7, state, "optim:\n  lr: 0.1\n", keep_last=2)
    assert final == root / "step_7"
    assert final.is_dir()
    assert verify(final) is None
    names = {p.name for p in final.iterdir()}
    for required in ("model.safetensors", STATE, "config.yaml", MARKER):
        assert required in names, names
    assert not list(root.glob(".tmp-*")), "temporary directory left behind"
    assert not [p for p in final.iterdir() if p.name.endswith(".tmp")], "temp file left behind"
    assert read_state(final) == state
    assert (final / "config.yaml").read_text() == "optim:\n  lr: 0.1\n"
    marker = json.loads((final / MARKER).read_text())
    assert marker["step"] == 7
    on_disk = {str(f.relative_to(final)) for f in final.rglob("*") if f.is_file()} - {MARKER}
    assert set(marker["files"]) == on_disk
    assert find_resumable(root) == (final, [])


def test_save_weights_round_trip(prepared, tmp_path):
    from safetensors.torch import load_file

    acc, model, opt = prepared
    final = checkpoint.save(acc, tmp_path, 1, {"step": 1}, "", keep_last=2)
    saved = load_file(str(final / "model.safetensors"))
    current = acc.unwrap_model(model).state_dict()
    assert set(saved) == set(current)
    for k in current:
        assert torch.equal(saved[k], current[k].cpu())
    # load_state brings the weights back after they are changed
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    acc.load_state(str(final))
    for k, v in acc.unwrap_model(model).state_dict().items():
        assert torch.equal(v.cpu(), saved[k])


def test_save_keep_last(prepared, tmp_path):
    acc, _, _ = prepared
    root = tmp_path / "ck"
    for step in (10, 20, 30):
        checkpoint.save(acc, root, step, {"step": step}, "", keep_last=2)
    assert [p.name for p in list_checkpoints(root)] == ["step_30", "step_20"]
    assert sorted(p.name for p in root.iterdir()) == ["step_20", "step_30"]
    for p in list_checkpoints(root):
        assert verify(p) is None
        assert read_state(p) == {"step": int(p.name.split("_")[1])}


def test_save_keep_last_one(prepared, tmp_path):
    acc, _, _ = prepared
    for step in (1, 2):
        checkpoint.save(acc, tmp_path, step, {"step": step}, "", keep_last=1)
    assert [p.name for p in tmp_path.iterdir()] == ["step_2"]


def test_save_removes_stale_tmp(prepared, tmp_path):
    acc, _, _ = prepared
    stale = tmp_path / ".tmp-step_4"
    stale.mkdir()
    (stale / "junk").write_text("half-written")
    checkpoint.save(acc, tmp_path, 5, {"step": 5}, "", keep_last=2)
    assert not stale.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["step_5"]


def test_save_same_step_replaces(prepared, tmp_path):
    acc, _, _ = prepared
    bad = make_ckpt(tmp_path, 6)
    (bad / MARKER).unlink()  # an interrupted / corrupt directory at the same step
    final = checkpoint.save(acc, tmp_path, 6, {"step": 6, "again": True}, "", keep_last=2)
    assert final == bad
    assert verify(final) is None
    assert read_state(final) == {"step": 6, "again": True}
    assert not (final / "sub").exists()  # nothing of the old directory survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_6"]


def test_saved_checkpoint_detects_corruption(prepared, tmp_path):
    acc, _, _ = prepared
    older = checkpoint.save(acc, tmp_path, 1, {"step": 1}, "", keep_last=3)
    newer = checkpoint.save(acc, tmp_path, 2, {"step": 2}, "", keep_last=3)
    f = newer / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    path, skipped = find_resumable(tmp_path)
    assert path == older
    assert skipped == [(newer, "model.safetensors fails its checksum")]
