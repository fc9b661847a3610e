"""Retrieval on a dataset's features (digits: no image files): gallery rows named by number in
`pairs --rows` and `search --query-index`, the hints that point there, and `search --grid` drawn
from the dataset's own images (docs/retrieval.md).

One small digits run (200 training images, 1 epoch) and its extraction (the first 60 test
images) are shared by the module; every command runs through its real CLI."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import DEMO, ROOT, ok, run_module, train
from toolkit.features import load_features, read_manifest, read_meta

pytestmark = pytest.mark.slow


def retrieve(args) -> subprocess.CompletedProcess:
    return run_module("toolkit.retrieve", args)


def one_error_line(proc, *needles: str) -> str:
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    """FEATURES of `python -m toolkit.extract --config configs/extract_digits.yaml model.run=RUN`."""
    run = tmp_path_factory.mktemp("rows") / "run"
    ok(train(["--config", DEMO, "data.limit=200", "train.epochs=1", "sched.milestones=[]", "log.plots=false",
              "log.progress=plain", f"run.dir={run}"]))
    ok(run_module("toolkit.extract", ["--config", str(ROOT / "configs" / "extract_digits.yaml"), f"model.run={run}",
                                      "data.limit=60"]))
    return run / "features"


def test_pairs_by_row_gives_the_rows_distances(features, tmp_path):
    proc = ok(retrieve(["pairs", "--features", str(features), "--rows", "0", "5", "17",
                        "--csv", str(tmp_path / "d.csv")]))
    feats = load_features(features)
    with open(tmp_path / "d.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["", "digits:test:0", "digits:test:5", "digits:test:17"]  # the manifest's names
    vals = torch.tensor([[float(v) for v in row[1:]] for row in table[1:]])  # (3, 3)
    f3 = feats.features[[0, 5, 17]]
    want = (f3[:, None] - f3[None]).norm(dim=2)
    assert torch.allclose(vals, want, atol=1e-5) and vals.diagonal().eq(0).all()  # an image and itself: 0
    classes = [feats.class_names[y] for y in feats.labels[[0, 5, 17]].tolist()]
    assert f"row 5 ({classes[1]})" in proc.stdout
    ok(retrieve(["pairs", "--features", str(features), "--rows", "3", "3", "--metric", "cosine",
                 "--csv", str(tmp_path / "c.csv")]))
    assert (tmp_path / "c.csv").read_text().splitlines()[1].split(",")[1:] == ["1.000000", "1.000000"]


def test_files_on_a_datasets_features_point_to_the_option_the_command_has(features, tmp_path):
    img = ROOT / "docs" / "nope.png"  # never read: the refusal comes first
    line = one_error_line(retrieve(["pairs", "--features", str(features), str(img), str(img)]), "--rows")
    assert "--query-index" not in line  # pairs has no such option
    one_error_line(retrieve(["search", "--features", str(features), "--query", str(img)]), "--query-index")
    from toolkit.retrieve import main

    for args, needle in [(["--rows", "0", "60"], "--rows: 60 is not a row"),  # 60 rows: 0..59
                         (["--rows", "4"], "at least two"),
                         ([str(img), "--rows", "0", "1"], "not both")]:
        assert main(["pairs", "--features", str(features), *args]) == 2, args


def test_search_grid_draws_the_datasets_own_images(features, tmp_path):
    from PIL import Image

    from toolkit.data import DATASETS
    from toolkit.retrieve import GalleryImages

    grid, js = tmp_path / "grid.png", tmp_path / "r.json"
    proc = ok(retrieve(["search", "--features", str(features), "--query-index", "7", "--topk", "4",
                        "--grid", str(grid), "--json", str(js)]))
    assert f"wrote {grid}" in proc.stdout
    res = json.loads(js.read_text())[0]
    assert res["query_row"] == 7 and res["query"] == "digits:test:7" and len(res["results"]) == 4
    png = np.asarray(Image.open(grid).convert("L"))  # (H, W)
    assert png.shape[1] > png.shape[0] and len(np.unique(png)) > 2  # a row of drawn panels

    # What the panels show: the digits as stored (uint8, before normalisation). The extraction's
    # split (limit 60) is normalised with its own 60-image statistics and fed with the run's; the
    # full test split, normalised with other statistics again, holds the same images first.
    meta = read_meta(features)
    images = GalleryImages(features, meta, read_manifest(features, meta))
    full = DATASETS.build("digits", root=None, split_seed=0, limit=None)
    mean, std = (torch.tensor(full.meta[k]).view(-1, 1, 1) for k in ("mean", "std"))
    for row in [7, *(h["row"] for h in res["results"])]:
        want = ((full.test.images[row] * std + mean).clamp(0, 1) * 255).round()  # (3, 32, 32)
        got = torch.from_numpy(images.row(row)).permute(2, 0, 1).float()
        assert got.shape == (3, 32, 32) and (got - want).abs().max() <= 1, row
        assert got.max() - got.min() > 100  # a digit, not a flat panel


def test_grid_refuses_a_dataset_that_no_longer_matches(features, tmp_path):
    copy = tmp_path / "features"
    shutil.copytree(features, copy)
    cfg = (copy / "config.yaml").read_text()
    assert "limit: 60" in cfg
    (copy / "config.yaml").write_text(cfg.replace("limit: 60", "limit: 50"))
    one_error_line(retrieve(["search", "--features", str(copy), "--query-index", "0", "--topk", "2",
                             "--grid", str(tmp_path / "g.png")]), "does not match", "50 images")
    assert not (tmp_path / "g.png").exists()
