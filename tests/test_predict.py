"""`toolkit.predict` end to end (the real CLI, one and two processes) and the Python API, on one
small digits run trained once for the module.

    .venv/bin/python -m pytest tests/test_predict.py -p no:xdist -q
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import refused_in_process, DEMO, ROOT, launch, ok, run_module, summary, train, truncated_png

# 2 epochs on 200 images of each split (34% test accuracy: predictions that mean something),
# ~10 s on 2 cores. Shared by every test here.
SMALL = ["train.epochs=2", "sched.milestones=[]", "data.limit=200", "data.batch_size=16", "optim.lr=0.05",
         "log.plots=false", "log.tensorboard=false"]


def predict_cli(args, timeout=300) -> subprocess.CompletedProcess:
    return run_module("toolkit.predict", [str(a) for a in args], timeout=timeout)


def read_csv(path: Path) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def float32_ratio(num: int, den: int) -> float:
    """What toolkit.metrics (summary.json) computes: a float32 division of two counts."""
    return (torch.tensor(num).float() / torch.tensor(den).float()).item()


def drawn_tiles(png: Path, rows: int, cols: int) -> list:
    """For each slot of a rows x cols grid (row by row): does it show a digit? A digit image is
    mostly its black background, so the middle of a slot that shows one is largely black; an
    empty slot, or a bad image's "unreadable" tile, is white there. (Titles sit at the top of a
    slot, outside the part looked at.)"""
    import numpy as np

    a = np.asarray(Image.open(png).convert("RGB")).astype(int)
    black = (a < 40).all(axis=2)
    h, w = black.shape[0] / rows, black.shape[1] / cols
    return [bool(black[int(h * (r + 0.35)):int(h * (r + 0.9)), int(w * (c + 0.2)):int(w * (c + 0.8))].mean() > 0.1)
            for r in range(rows) for c in range(cols)]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("predict") / "run"
    ok(train(["--config", DEMO, *SMALL, f"run.dir={run_dir}"]))
    return run_dir


@pytest.fixture(scope="module")
def split_csv(run, tmp_path_factory):
    """`predict RUN --split test --weights last` with a 12-image grid: (CSV rows, process, folder)."""
    out = tmp_path_factory.mktemp("split")
    proc = ok(predict_cli([run, "--split", "test", "--weights", "last", "--out", out / "test.csv",
                           "--grid", out / "grid.png", "--grid-max", 12]))
    return read_csv(out / "test.csv"), proc, out


def copy_run(run: Path, dest: Path, skip=()) -> Path:
    """The files predict reads, without the checkpoints (and without SKIP)."""
    dest.mkdir(parents=True)
    for name in ("config.yaml", "data.json", "summary.json", "model.safetensors"):
        if name not in skip:
            shutil.copy(run / name, dest / name)
    return dest


# ------------------------------------------------------------------------------------------
# the CLI


@pytest.mark.slow
def test_test_split_accuracy_is_the_runs_test_acc_and_the_csv_lists_every_image_in_order(run, split_csv):
    rows, proc, _ = split_csv
    s = summary(run)
    assert len(rows) == s["num_test_samples"] == 200
    assert [int(r["index"]) for r in rows] == list(range(200))
    assert rows[0]["input"] == "digits:test:0" and all(r["label"] and not r["error"] for r in rows)
    assert list(rows[0]) == ["index", "input", "label", "pred_1", "prob_1", "pred_2", "prob_2", "pred_3", "prob_3",
                             "pred_4", "prob_4", "pred_5", "prob_5", "error"]
    for r in rows:  # probabilities ranked, each a share of 1
        p = [float(r[f"prob_{j}"]) for j in range(1, 6)]
        assert p == sorted(p, reverse=True) and 0 < sum(p) <= 1 + 1e-5
    correct = sum(r["pred_1"] == r["label"] for r in rows)
    assert float32_ratio(correct, len(rows)) == s["test_acc"]  # exactly: same images, preprocessing, weights
    top5 = sum(r["label"] in [r[f"pred_{j}"] for j in range(1, 6)] for r in rows)
    assert float32_ratio(top5, len(rows)) == s["test_top5"]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("predict: 200 image(s)")][0]
    assert f"accuracy {s['test_acc']:.2%}" in line and "weights last" in line and "images/s" in line


@pytest.mark.slow
def test_best_weights_on_the_test_split_give_the_runs_test_acc_best(run):
    from toolkit.predict import predict

    s = summary(run)
    if "test_acc_best" not in s or not (run / "model_best.safetensors").is_file():
        pytest.skip("this tree's engine does not keep the best epoch's weights")
    rows = predict(run, split="test", weights="best")
    assert float32_ratio(sum(r["pred"] == r["label"] for r in rows), len(rows)) == s["test_acc_best"]


@pytest.mark.slow
def test_grid_has_one_tile_per_image_at_the_stated_size(split_csv):
    from toolkit.predict import grid_layout

    _, _, out = split_csv
    with Image.open(out / "grid.png") as im:
        size = im.size
    _, _, width, height = grid_layout(12)
    assert size == (width, height) == (8 * 160, 2 * 180)
    assert drawn_tiles(out / "grid.png", 2, 8) == [True] * 12 + [False] * 4


@pytest.mark.slow
def test_two_processes_write_the_same_csv_as_one(run, tmp_path):
    # batches of 16: 13 batches dealt to 2 ranks, so both ranks predict and rank 0 reorders
    args = [str(run), "--split", "test", "--weights", "last", "--batch-size", "16"]
    ok(predict_cli([*args, "--out", tmp_path / "one.csv"]))
    two = ok(launch([*args, "--out", str(tmp_path / "two.csv")], script="toolkit/predict.py"))
    assert "on 2 process(es)" in two.stdout
    assert (tmp_path / "two.csv").read_text() == (tmp_path / "one.csv").read_text()


def write_png_tree(run: Path, root: Path, n: int = 20) -> list:
    """root/<class>/<i>.png from the first N images of the run's test split (the uint8 pixels the
    dataset holds), plus three bad files in class folders. -> the split indices."""
    from toolkit.predict import display_image, open_run, split_source

    loaded = open_run(run, "last")
    source = split_source(loaded.cfg, "test", loaded.classes, loaded.preprocess)
    for i in range(n):
        d = root / loaded.classes[int(source.labels[i])]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(display_image(source, i, loaded.preprocess).permute(1, 2, 0).numpy()).save(d / f"{i:03d}.png")
    (root / "0").mkdir(exist_ok=True)
    (root / "0" / "empty.png").write_bytes(b"")
    (root / "0" / "text.jpg").write_text("not an image")
    (root / "1").mkdir(exist_ok=True)
    truncated_png(root / "1" / "cut.png")
    return list(range(n))


@pytest.mark.slow
def test_png_folder_with_bad_files_gets_labels_from_class_folders_and_lists_the_bad_ones(run, split_csv, tmp_path):
    root = tmp_path / "pngs"
    write_png_tree(run, root)
    proc = ok(predict_cli([run, root, "--weights", "last", "--topk", "3", "--out", tmp_path / "f.csv",
                           "--grid", tmp_path / "g.png"]))
    rows = read_csv(tmp_path / "f.csv")
    assert len(rows) == 23 and [int(r["index"]) for r in rows] == list(range(23))
    bad = {Path(r["input"]).name: r["error"] for r in rows if r["error"]}
    assert set(bad) == {"empty.png", "text.jpg", "cut.png"}
    assert bad["empty.png"] == "empty file" and bad["text.jpg"] == "not an image Pillow can read"
    assert all(not r["pred_1"] for r in rows if r["error"])
    assert proc.stdout.count("predict: bad image") == 3 and "3 bad" in proc.stdout
    # the PNGs hold the split's pixels: the same predictions as the split (labels from the folders)
    by_split = {f"{int(r['index']):03d}.png": r for r in split_csv[0]}
    good = [r for r in rows if not r["error"]]
    assert len(good) == 20
    for r in good:
        ref = by_split[Path(r["input"]).name]
        assert r["label"] == ref["label"] == Path(r["input"]).parent.name
        assert r["pred_1"] == ref["pred_1"]
        assert abs(float(r["prob_1"]) - float(ref["prob_1"])) < 1e-4
    with Image.open(tmp_path / "g.png") as im:  # every input has a tile, the bad ones an "unreadable" one
        assert im.size == (8 * 160, 3 * 180)
    assert drawn_tiles(tmp_path / "g.png", 3, 8) == [not r["error"] for r in rows] + [False]


@pytest.mark.slow
def test_default_weights_are_best_where_the_run_kept_them(run, tmp_path):
    from toolkit.predict import open_run

    plain = copy_run(run, tmp_path / "plain", skip=("model_best.safetensors",))
    assert open_run(plain).weights == "last"
    best = copy_run(run, tmp_path / "best")
    shutil.copy(run / "model_best.safetensors", best / "model_best.safetensors")  # the run's own (its SHA-256 is recorded)
    loaded = open_run(best)
    assert (loaded.weights, loaded.weights_path.name, loaded.weights_chosen) == ("best", "model_best.safetensors",
                                                                                 False)
    assert open_run(best, "last").weights_path.name == "model.safetensors"


# ------------------------------------------------------------------------------------------
# bad input: one line, exit 2, nothing written (in-process: the same main() the CLI runs)


def refused(capsys, argv, *needles):
    from toolkit.predict import main

    return refused_in_process(capsys, main, argv, *needles)


@pytest.mark.slow
def test_bad_input_is_one_line_exit_2_and_writes_nothing(run, tmp_path, capsys):
    from safetensors.torch import save_file

    png = tmp_path / "one.png"
    Image.new("RGB", (32, 32)).save(png)
    unfinished = copy_run(run, tmp_path / "unfinished", skip=("model.safetensors",))
    refused(capsys, [unfinished, png], "not a finished training run", "model.safetensors")
    nobest = copy_run(run, tmp_path / "nobest")
    refused(capsys, [nobest, png, "--weights", "best"], "model_best.safetensors", "--weights last")
    tampered = copy_run(run, tmp_path / "tampered")
    data = bytearray((tampered / "model.safetensors").read_bytes())
    data[-1] ^= 1  # one bit of one weight
    (tampered / "model.safetensors").write_bytes(bytes(data))
    refused(capsys, [tampered, png], "model.safetensors is not the file the run wrote", "weights_sha256")
    alien = copy_run(run, tmp_path / "alien")
    s = json.loads((alien / "summary.json").read_text())
    assert set(s.pop("weights_sha256")) >= {"model.safetensors"}  # recorded by the run ...
    (alien / "summary.json").write_text(json.dumps(s))  # ... not by one trained before it was
    save_file({"fc.weight": torch.zeros(3, 3)}, str(alien / "model.safetensors"))
    refused(capsys, [alien, png], "does not fit lenet")
    resized = copy_run(run, tmp_path / "resized")
    meta = json.loads((resized / "data.json").read_text())
    (resized / "data.json").write_text(json.dumps({**meta, "image_size": 64}))
    refused(capsys, [resized, png], "cannot take the 64 px")
    copies = {d: sorted(p.name for p in d.iterdir()) for d in (unfinished, nobest, tampered, alien, resized)}
    (tmp_path / "empty").mkdir()
    refused(capsys, [nobest, tmp_path / "empty"], "no images under")
    refused(capsys, [nobest], "nothing to predict")
    refused(capsys, [nobest, png, "--topk", "11"], "--topk: 11", "10 classes")
    refused(capsys, [nobest, png, "--split", "test"], "not both")
    refused(capsys, [nobest, tmp_path / "missing.png"], "no such file")
    (tmp_path / "mine.csv").write_text("the user's file")
    refused(capsys, [nobest, png, "--out", tmp_path / "mine.csv"], "exists", "--force")
    assert (tmp_path / "mine.csv").read_text() == "the user's file"
    for d, names in copies.items():  # no predictions.csv, no temp files
        assert sorted(p.name for p in d.iterdir()) == names, d


# ------------------------------------------------------------------------------------------
# the Python API


def doc_example(path: Path) -> str:
    """The Python block of the "Use what you trained" example in a doc file."""
    text = path.read_text()
    start = text.index("```python\nfrom toolkit import load_run, predict")
    return text[start + len("```python\n"):text.index("```", start + 10)]


@pytest.mark.slow
@pytest.mark.parametrize("doc", ["README.md", "docs/quickstart.md"])
def test_the_documented_python_example_runs(run, tmp_path, monkeypatch, capsys, doc):
    from toolkit.predict import display_image, open_run, split_source

    code = doc_example(ROOT / doc)
    # the example's paths, made real: the run, and two digit PNGs from its test split
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "digits_lenet").mkdir(parents=True)
    (tmp_path / "runs" / "digits_lenet" / "20261127-140000").symlink_to(run)
    loaded = open_run(run, "last")
    source = split_source(loaded.cfg, "test", loaded.classes, loaded.preprocess)
    (tmp_path / "digits").mkdir()
    for i, name in ((0, "a.png"), (1, "b.png")):
        Image.fromarray(display_image(source, i, loaded.preprocess).permute(1, 2, 0).numpy()).save(
            tmp_path / "digits" / name)
    exec(compile(code, doc, "exec"), {"__name__": "__doc_example__"})
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and out[0].startswith("digits/a.png ") and out[2] in loaded.classes, out


@pytest.mark.slow
def test_api_rows_and_the_name_predict_survives_importing_the_cli_module(run, split_csv):
    import toolkit.predict as cli_module  # binds the package's attribute `predict` to the module
    from toolkit import load_run, predict

    rows = predict(run, split="test", weights="last")
    assert callable(cli_module) and len(rows) == 200
    assert [r["pred"] for r in rows] == [r["pred_1"] for r in split_csv[0]]
    assert set(rows[0]) == {"index", "input", "label", "pred", "prob", "topk", "error"}
    model, preprocess, classes = load_run(run, weights="last")
    assert classes == [str(i) for i in range(10)] and not model.training
    x = preprocess(Image.new("RGB", (50, 40), (255, 255, 255)))  # any size and mode: resized, cropped
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32


def test_importing_toolkit_stays_cheap():
    """`import toolkit` (for load_run and predict) imports neither torch nor the CLIs."""
    code = ("import sys, toolkit; "
            "print(sorted(m for m in ('torch', 'toolkit.predict', 'accelerate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert callable(__import__("toolkit").load_run)


def test_batches_are_dealt_whole_to_ranks_in_turn():
    from toolkit.predict import batches_for

    one = batches_for(10, 3, 0, 1)
    two = [batches_for(10, 3, r, 2) for r in range(2)]
    assert one == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert two == [[[0, 1, 2], [6, 7, 8]], [[3, 4, 5], [9]]]
    assert batches_for(2, 3, 1, 2) == []  # a rank with nothing to do still takes part
