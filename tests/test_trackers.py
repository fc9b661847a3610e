"""log.trackers: every logged row reaches each chosen tracker (MLflow, W&B) as it reaches
metrics.jsonl; TensorBoard gets the run's pictures at the end; a tracker that cannot run is one
line before the run directory exists.

One training run per module (the `tracked` fixture: TensorBoard and MLflow), read by several tests.
"""

from __future__ import annotations

import importlib.util
import io
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from helpers import DEMO, ROOT, child_env, decode_folder_args, metrics, ok, refused_in_process, run_module, summary

SHORT = ["--config", DEMO, "train.epochs=2", "log.progress=plain"]


def clean_env() -> dict:
    """The child's environment without the user's MLflow and W&B settings (a tracking server,
    an experiment name, an online mode): the tests check the toolkit's own defaults, and must
    never write to a real server."""
    return {k: v for k, v in child_env().items() if not k.startswith(("MLFLOW_", "WANDB_"))}


def train_clean(args) -> subprocess.CompletedProcess:
    """`python -m toolkit.train ARGS` in clean_env()."""
    return subprocess.run([sys.executable, "-m", "toolkit.train", *args], cwd=ROOT, env=clean_env(),
                          capture_output=True, text=True, timeout=300)


def expected_series(run_dir: Path) -> dict:
    """metrics.jsonl as the trackers should have it: {"kind/key": [(step, value), ...]} for every
    finite number of every row (Tracker.log's rule), in logging order."""
    out: dict = {}
    for row in metrics(run_dir):
        for k, v in row.items():
            if k in ("kind", "step", "time") or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if math.isfinite(v):
                out.setdefault(f"{row['kind']}/{k}", []).append((row["step"], v))
    return out


def tensorboard_images(run_dir: Path):
    """RUN/tb's image summaries: {tag: [(step, (H, W, 3) uint8 pixels)]}."""
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0})
    events.Reload()
    return {tag: [(e.step, pixels(Image.open(io.BytesIO(e.encoded_image_string)))) for e in events.Images(tag)]
            for tag in events.Tags()["images"]}


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def predict_grid(run_dir: Path, out: Path) -> np.ndarray:
    """What `toolkit.predict RUN --split test --weights <the tested ones> --grid` draws for 16 images."""
    from PIL import Image

    weights = summary(run_dir)["tested_weights"]
    ok(run_module("toolkit.predict", [str(run_dir), "--split", "test", "--weights", weights, "--topk", "1",
                                      "--grid-max", "16", "--grid", str(out / "grid.png"),
                                      "--out", str(out / "predictions.csv")]))
    return pixels(Image.open(out / "grid.png"))


@pytest.fixture(scope="module")
def tracked(tmp_path_factory) -> Path:
    pytest.importorskip("mlflow", reason="mlflow-skinny is in the test extra: pip install -e '.[test]'")
    run = tmp_path_factory.mktemp("trackers") / "run"
    proc = ok(train_clean([*SHORT, f"run.dir={run}", "log.trackers=[tensorboard,mlflow]"]))
    assert "mlflow: run " in proc.stdout and f"in {(run / 'mlruns').as_uri()}" in proc.stdout, proc.stdout
    return run


def mlflow_run(run_dir: Path, monkeypatch):
    """(client, the one MLflow run) of RUN/mlruns, read with MLflow's client API."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow >= 3.7 refuses file stores without it
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("digits_lenet")  # run.name: the config's name
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


@pytest.mark.slow
def test_mlflow_holds_the_rows_of_metrics_jsonl(tracked, monkeypatch):
    """The file store is inside the run directory, and its metric histories are metrics.jsonl's
    rows: the same names (kind/key), steps and values, the epoch rows included."""
    client, run = mlflow_run(tracked, monkeypatch)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == tracked.name and run.data.tags["run_dir"] == str(tracked)
    want = expected_series(tracked)
    assert {k for k in want if k.startswith("epoch/")} >= {"epoch/train_loss", "epoch/val_acc", "epoch/lr"}
    assert set(run.data.metrics) == set(want)
    for name, series in want.items():
        got = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)]
        assert got == [(s, float(v)) for s, v in series], name
    epochs = [r for r in metrics(tracked) if r["kind"] == "epoch"]
    assert [s for s, _ in want["epoch/val_acc"]] == [r["step"] for r in epochs] and len(epochs) == 2
    # the tunable hyperparameters (config.hparams), as the run's parameters
    config = yaml.safe_load((tracked / "config.yaml").read_text())
    assert run.data.params["optim.lr"] == str(config["optim"]["lr"]) and "log.trackers" not in run.data.params
    assert summary(tracked)["trackers"] == ["tensorboard", "mlflow"]


@pytest.mark.slow
def test_tensorboard_gets_the_confusion_matrices_and_a_prediction_grid(tracked, tmp_path):
    """At the end, at the run's last step: train/ and test/confusion are the confusion_*.png
    files themselves, test/predictions is the grid toolkit.predict draws for the first 16 test
    images (2 rows of 8 tiles, same pixels); the scalars are metrics.jsonl's rows, as before."""
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    images = tensorboard_images(tracked)
    assert set(images) == {"train/confusion", "test/confusion", "test/predictions"}
    last = summary(tracked)["steps"]
    for split in ("train", "test"):
        [(step, shown)] = images[f"{split}/confusion"]
        on_disk = pixels(Image.open(tracked / f"confusion_{split}.png"))
        assert step == last and shown.shape == on_disk.shape and (shown == on_disk).all(), split
    [(step, grid)] = images["test/predictions"]
    assert step == last and grid.shape == (360, 1280, 3)
    assert (grid == predict_grid(tracked, tmp_path)).all()
    events = EventAccumulator(str(tracked / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    for name, series in expected_series(tracked).items():
        got = [(e.step, e.value) for e in events.Scalars(name)]
        assert [s for s, _ in got] == [s for s, _ in series], name
        assert [v for _, v in got] == pytest.approx([v for _, v in series], rel=1e-6), name  # float32 in TB


@pytest.mark.slow
def test_the_prediction_grid_of_a_folder_run_reads_the_images_from_their_files(tmp_path):
    """An image folder decoded on the device (its dataset hands out JPEG bytes by the end): the
    grid still shows the images, as predict draws them from the folder; default trackers."""
    run = tmp_path / "folder"
    ok(train_clean(decode_folder_args(tmp_path, "folder", "data.decode=device", "train.epochs=1",
                                      "log.tensorboard=true", "log.plots=true", "log.embed_max=0")))
    assert summary(run)["trackers"] == ["tensorboard"] and not (run / "mlruns").exists()
    [(_, grid)] = tensorboard_images(run)["test/predictions"]
    assert (grid == predict_grid(run, tmp_path)).all()


@pytest.mark.parametrize("name, module", [("mlflow", "mlflow"), ("wandb", "wandb")])
def test_a_tracker_whose_package_does_not_import_is_one_line_before_the_run_dir(tmp_path, capsys, monkeypatch,
                                                                              name, module):
    """`sys.modules[name] = None` is how Python itself blocks an import (`import mlflow` raises
    ImportError, as it does where the package is not installed, whether or not it is here)."""
    from toolkit.train import main

    monkeypatch.setitem(sys.modules, module, None)
    run = tmp_path / "run"
    line = refused_in_process(capsys, main, [*SHORT, f"run.dir={run}", f"log.trackers=[tensorboard,{name}]"],
                              f"error: config: log.trackers: {name} needs the {module} package", "pip install ")
    assert ("mlflow-skinny" in line) == (name == "mlflow")
    assert not run.exists()


def test_an_unknown_tracker_is_one_line_naming_the_valid_ones(tmp_path, capsys):
    from toolkit.train import main

    run = tmp_path / "run"
    refused_in_process(capsys, main, [*SHORT, f"run.dir={run}", "log.trackers=[tensorboard,csv]"],
                       "config: log.trackers[1]: unknown tracker 'csv'; choose one of: tensorboard, mlflow, wandb")
    refused_in_process(capsys, main, [*SHORT, f"run.dir={run}", "log.trackers=[mlflow,mlflow]"],
                       "config: log.trackers: mlflow listed more than once")
    assert not run.exists()


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow is not installed: nothing to keep out")
def test_the_default_run_imports_no_tracker_package():
    """Building the default run's Accelerator (TensorBoard only) loads neither mlflow nor wandb:
    importing mlflow costs every run seconds of start-up (benchmarks/startup.py)."""
    code = ("import sys; from toolkit.config import load_config; from toolkit.engine.fit import make_accelerator; "
            f"acc = make_accelerator(load_config({DEMO!r})); "
            "print(sorted(m for m in ('mlflow', 'wandb') if m in sys.modules), acc.log_with)")
    proc = ok(subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                             timeout=120))
    assert proc.stdout.strip().splitlines()[-1] == "[] [<LoggerType.TENSORBOARD: 'tensorboard'>]", proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (pip install wandb)")
def test_wandb_runs_offline_in_the_run_directory(tmp_path):
    run = tmp_path / "run"
    ok(train_clean([*SHORT, f"run.dir={run}", "log.trackers=[wandb]", "log.plots=false"]))
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb")), sorted(p.name for p in (run / "wandb").iterdir())
    assert summary(run)["trackers"] == ["wandb"] and not (run / "tb").exists()
