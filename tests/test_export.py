"""`toolkit.export` end to end: ONNX (checked with onnxruntime) and TorchScript files agree with the
PyTorch model within the stated tolerance, with their preprocessing beside them; bad input is
one line, exit 2, nothing written. One small digits run, trained once for the module.

    .venv/bin/python -m pytest tests/test_export.py -p no:xdist -q
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import refused_in_process, DEMO, ok, run_module, train

SMALL = ["train.epochs=2", "sched.milestones=[]", "data.limit=200", "data.batch_size=16", "optim.lr=0.05",
         "log.plots=false", "log.tensorboard=false"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("export") / "run"
    ok(train(["--config", DEMO, *SMALL, f"run.dir={run_dir}"]))
    return run_dir


def digits(run: Path, n: int = 16) -> torch.Tensor:
    """The first N test images of the run, as the model sees them: (N, 3, 32, 32) float32."""
    from toolkit.predict import open_run, split_source

    loaded = open_run(run, "last")
    source = split_source(loaded.cfg, "test", loaded.classes, loaded.preprocess)
    return torch.stack([source[i][0] for i in range(n)])


def exported_logits(path: Path, fmt: str, x: torch.Tensor) -> torch.Tensor:
    """Run the exported file on its own runtime, as a server would."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0])
    return torch.jit.load(str(path)).eval()(x)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*torch.jit:FutureWarning")  # torch 2.14 deprecates TorchScript
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exported_model_agrees_with_pytorch_on_real_images_within_the_tolerance(run, tmp_path, fmt):
    from toolkit.export import FORMATS, TOLERANCE
    from toolkit.predict import load_run

    out = tmp_path / fmt
    proc = ok(run_module("toolkit.export", [str(run), "--format", fmt, "--weights", "last", "--out", str(out)]))
    assert "largest |difference| from PyTorch" in proc.stdout and "weights last" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted([FORMATS[fmt], "preprocess.json"])
    meta = json.loads((out / "preprocess.json").read_text())
    data = json.loads((run / "data.json").read_text())
    assert (meta["image_size"], meta["channels"], meta["mean"], meta["std"]) == (32, 3, data["mean"], data["std"])
    assert meta["class_names"] == [str(i) for i in range(10)] and meta["weights"] == "last"
    assert 0 <= meta["check"]["max_abs_diff"] <= meta["check"]["limit"]
    # Checked again here, on real digits rather than the export's random inputs.
    model, preprocess, _ = load_run(run, "last")
    x = digits(run)
    with torch.inference_mode():
        ref = model(x)
        got = exported_logits(out / FORMATS[fmt], fmt, x)
    assert got.shape == ref.shape == (16, 10)
    assert (got - ref).abs().max().item() <= TOLERANCE * max(1.0, ref.abs().max().item())
    assert torch.equal(got.argmax(1), ref.argmax(1))


@pytest.mark.slow
def test_preprocess_json_is_enough_to_feed_the_model(run, tmp_path):
    """A server that follows preprocess.json's steps (here: Pillow and NumPy, no toolkit) feeds
    the model what predict feeds it."""
    from toolkit.export import main
    from toolkit.predict import load_run

    assert main([str(run), "--format", "torchscript", "--out", str(tmp_path / "ts")]) == 0
    meta = json.loads((tmp_path / "ts" / "preprocess.json").read_text())
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    pixels = np.asarray(Image.open(tmp_path / "x.png").convert("RGB"), dtype=np.float32)  # already 32 px
    theirs = (pixels / 255 - np.array(meta["mean"], np.float32)) / np.array(meta["std"], np.float32)
    _, preprocess, _ = load_run(run)
    ours = preprocess(tmp_path / "x.png").permute(1, 2, 0).numpy()
    assert np.abs(theirs - ours).max() < 1e-5


refused = refused_in_process  # (capsys, main, argv, *needles)


@pytest.mark.slow
def test_a_missing_onnx_package_is_one_line_and_writes_nothing(run, tmp_path):
    shadow = tmp_path / "shadow" / "onnxruntime"  # an onnxruntime that cannot be imported
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('onnxruntime is not installed here')\n")
    proc = run_module("toolkit.export", [str(run), "--format", "onnx"], env={"PYTHONPATH": str(shadow.parent)})
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()
    assert len(line) == 1 and "missing onnxruntime" in line[0] and "pip install" in line[0], proc.stderr
    assert not (run / "export").exists()


@pytest.mark.slow
def test_failed_check_and_existing_files_are_refused_and_leave_nothing(run, tmp_path, capsys, monkeypatch):
    import toolkit.export as export

    out = tmp_path / "mine"
    monkeypatch.setattr(export, "TOLERANCE", -1.0)  # every difference, even 0, is over it
    refused(capsys, export.main, [run, "--format", "torchscript", "--out", out], "export check", "over the tolerance")
    assert not out.exists()
    monkeypatch.undo()
    out.mkdir()
    (out / "model.pt").write_text("the user's file")
    refused(capsys, export.main, [run, "--format", "torchscript", "--out", out], "model.pt", "--force")
    assert (out / "model.pt").read_text() == "the user's file" and sorted(p.name for p in out.iterdir()) == ["model.pt"]
    nobest = tmp_path / "nobest"  # the run's files, without best weights (whatever the engine now keeps)
    nobest.mkdir()
    for name in ("config.yaml", "data.json", "summary.json", "model.safetensors"):
        shutil.copy(run / name, nobest / name)
    refused(capsys, export.main, [nobest, "--format", "torchscript", "--weights", "best"], "model_best.safetensors")
    assert not (nobest / "export").exists()
    assert export.main([str(run), "--format", "torchscript", "--out", str(out), "--force"]) == 0
    assert torch.jit.load(str(out / "model.pt")) is not None
