"""Feature extraction end to end: the real CLIs (`python -m toolkit.extract`, `accelerate launch
toolkit/extract.py`, `python -m toolkit.retrieve`) in temp dirs, checking the files they write."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from helpers import ROOT, launch, ok, png_bomb, run_module
from toolkit.features import load_features, read_manifest

DIGITS = ["data.name=digits", "data.split=test", "model.name=lenet", "extract.shard_size=40"]  # 360 images, 9 shards


def extract(args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return run_module("toolkit.extract", args, env=env, timeout=timeout)


def retrieve(args, timeout=300) -> subprocess.CompletedProcess:
    return run_module("toolkit.retrieve", args, timeout=timeout)


def fails(proc, code: int, *needles: str) -> str:
    assert proc.returncode == code, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), proc.stderr
    for n in needles:
        assert n in line, line
    return line


def shard_times(features: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in (features / "shards").glob("part-*.safetensors")}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("extract") / "one"
    ok(extract([*DIGITS, f"run.dir={run}"]))
    return run / "features"


@pytest.mark.slow
def test_features_are_the_models_normalised_penultimate_features_in_dataset_order(one_process):
    from toolkit.data import DATASETS
    from toolkit.models import MODELS

    feats = load_features(one_process)
    test = DATASETS.build("digits", root=None, split_seed=0, limit=None).test
    assert feats.index.tolist() == list(range(len(test)))
    assert torch.equal(feats.labels, test.labels)
    torch.manual_seed(0)  # run.seed: a model without weights is initialised from it
    model = MODELS.build("lenet", num_classes=1000).eval()
    x, _ = test.__getitems__(list(range(len(test))))
    with torch.inference_mode():
        want = F.normalize(model.forward_features(x), dim=1)
    assert feats.features.shape == (360, 84)
    assert torch.allclose(feats.features, want, atol=1e-5)
    meta = json.loads((one_process / "meta.json").read_text())
    assert meta["rows"] == 360 and meta["num_shards"] == 9 and meta["bad_images"] == 0
    assert [r["path"] for r in read_manifest(one_process)][:2] == ["digits:test:0", "digits:test:1"]


@pytest.mark.slow
def test_two_gloo_processes_give_the_same_features_in_the_same_order(one_process, tmp_path):
    run = tmp_path / "two"
    proc = ok(launch(["--config", str(ROOT / "configs/extract_digits.yaml"), *DIGITS, f"run.dir={run}"],
                     script="toolkit/extract.py"))
    assert "2 process(es)" in proc.stdout
    a, b = load_features(one_process), load_features(run / "features")
    assert torch.equal(a.index, b.index) and len(set(b.index.tolist())) == 360  # no duplicates, none missing
    assert torch.equal(a.labels, b.labels)
    assert torch.allclose(a.features, b.features, atol=1e-6)
    assert json.loads((run / "features/summary.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_a_killed_rank_is_finished_by_a_rerun_without_recomputing_done_shards(one_process, tmp_path):
    run = tmp_path / "killed"
    args = ["--config", str(ROOT / "configs/extract_digits.yaml"), *DIGITS, f"run.dir={run}"]
    proc = launch(args, script="toolkit/extract.py", env={"TOOLKIT_FAULT_KILL_AT_SHARD": "1@1"})
    assert proc.returncode != 0
    features = run / "features"
    assert not (features / "meta.json").exists()  # unfinished: retrieve refuses it
    fails(retrieve(["eval", "--features", str(features)]), 2, "no finished extraction", "rerun")
    before = shard_times(features)
    assert 1 <= len(before) < 9 and "part-000001.safetensors" in before  # rank 1 wrote shard 1, then died
    again = ok(launch(args, script="toolkit/extract.py"))
    assert "complete shard(s) kept" in again.stdout
    after = shard_times(features)
    assert len(after) == 9
    assert all(after[name] == t for name, t in before.items())  # not rewritten
    a, b = load_features(one_process), load_features(features)
    assert torch.equal(a.index, b.index) and torch.allclose(a.features, b.features, atol=1e-6)


@pytest.mark.slow
def test_a_damaged_shard_is_redone_and_other_settings_are_refused(tmp_path):
    run = tmp_path / "r"
    ok(extract([*DIGITS, f"run.dir={run}", "data.limit=100"]))
    features = run / "features"
    want = load_features(features).features
    shard = features / "shards/part-000001.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    fails(retrieve(["eval", "--features", str(features)]), 2, "part-000001", "damaged")
    before = shard_times(features)
    proc = ok(extract([*DIGITS, f"run.dir={run}", "data.limit=100", "data.batch_size=7"]))  # batch size is free
    assert "2 complete shard(s) kept, 1 to do" in proc.stdout
    after = shard_times(features)
    assert after["part-000000.safetensors"] == before["part-000000.safetensors"]
    assert after["part-000001.safetensors"] != before["part-000001.safetensors"]
    assert torch.allclose(load_features(features).features, want, atol=1e-6)
    fails(extract([*DIGITS, f"run.dir={run}", "data.limit=100", "extract.layer=logits"]), 2,
          "other settings", "extract.layer='features'")


# ------------------------------------------------------------------------------------------
# a folder of images, bad ones included


def _jpeg(mode="RGB", colour=(200, 30, 30), size=(48, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format="JPEG")
    return buf.getvalue()


def make_zoo(root: Path) -> dict:
    """root/bad/<5 broken files>, root/odd/<4 odd-mode images>, root/good.jpg (no class)."""
    (root / "bad").mkdir(parents=True)
    (root / "odd").mkdir()
    rng = torch.Generator().manual_seed(0)
    (root / "bad/empty.jpg").write_bytes(b"")
    (root / "bad/truncated.jpg").write_bytes(_jpeg(size=(200, 160))[:400])
    (root / "bad/random.png").write_bytes(bytes(torch.randint(0, 256, (3000,), generator=rng, dtype=torch.uint8).tolist()))
    (root / "bad/text.jpg").write_text("this is not an image\n")
    (root / "bad/bomb.png").write_bytes(png_bomb(20000, 20000))  # 400 M pixels > 2 x Pillow's limit
    (root / "odd/cmyk.jpg").write_bytes(_jpeg("CMYK", (0, 200, 200, 0)))
    Image.new("L", (40, 40), 90).save(root / "odd/grey.png")
    Image.new("RGB", (40, 40), (10, 200, 10)).convert("P", palette=Image.Palette.ADAPTIVE).save(root / "odd/palette.png")
    Image.new("RGBA", (40, 40), (10, 10, 200, 128)).save(root / "odd/rgba.png")
    (root / "good.jpg").write_bytes(_jpeg())
    return {"bad": {"empty.jpg": "empty file", "truncated.jpg": "Truncated", "random.png": "not an image",
                    "text.jpg": "not an image", "bomb.png": "DecompressionBombError"}}


@pytest.fixture(scope="module")
def zoo_features(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("zoo")
    expected = make_zoo(base / "images")
    run = base / "run"
    proc = ok(extract(["--config", str(ROOT / "configs/extract_resnet50.yaml"), f"data.root={base / 'images'}",
                       "model.name=resnet18", "model.pretrained=null", "data.image_size=32", "data.num_workers=2",
                       "extract.shard_size=4", f"run.dir={run}"]))
    assert "5 bad image(s)" in proc.stdout
    return run / "features", expected


@pytest.mark.slow
def test_bad_images_are_listed_and_the_good_ones_extracted(zoo_features):
    features, expected = zoo_features
    lines = (features / "bad_images.txt").read_text().splitlines()
    reasons = {Path(line.split("\t")[1]).name: line.split("\t")[2] for line in lines}
    assert set(reasons) == set(expected["bad"])
    for name, needle in expected["bad"].items():
        assert needle in reasons[name], (name, reasons[name])
    feats = load_features(features)
    names = [Path(p).name for p in feats.paths]
    assert names == ["good.jpg", "cmyk.jpg", "grey.png", "palette.png", "rgba.png"]  # path order
    assert feats.class_names == ["bad", "odd"]
    assert feats.labels.tolist() == [-1, 1, 1, 1, 1]  # an image outside a class folder has no class
    assert feats.features.shape == (5, 512) and torch.isfinite(feats.features).all()
    assert torch.allclose(feats.features.norm(dim=1), torch.ones(5), atol=1e-5)
    s = json.loads((features / "summary.json").read_text())
    assert s["bad_images"] == 5 and s["rows"] == 5 and s["num_images"] == 10


@pytest.mark.slow
def test_search_pairs_and_grid_on_image_files(zoo_features, tmp_path):
    features, _ = zoo_features
    images = Path(load_features(features).paths[0]).parent
    query = images / "odd/grey.png"
    proc = ok(retrieve(["search", "--features", str(features), "--query", str(query), "--topk", "3",
                        "--grid", str(tmp_path / "grid.png"), "--json", str(tmp_path / "r.json")]))
    res = json.loads((tmp_path / "r.json").read_text())[0]["results"]
    assert res[0]["path"].endswith("grey.png") and res[0]["cosine"] == pytest.approx(1.0, abs=1e-5)  # itself
    assert res[0]["euclidean"] == 0.0  # not sqrt(2 - 2 * 0.99999994) = 3.5e-4
    assert [r["rank"] for r in res] == [1, 2, 3] and res[0]["cosine"] >= res[1]["cosine"] >= res[2]["cosine"]
    assert "grey.png" in proc.stdout and (tmp_path / "grid.png").stat().st_size > 0
    pytest.importorskip("faiss")
    ok(retrieve(["search", "--features", str(features), "--query", str(query), "--topk", "3",
                 "--backend", "faiss", "--json", str(tmp_path / "f.json")]))
    assert [r["row"] for r in json.loads((tmp_path / "f.json").read_text())[0]["results"]] == [r["row"] for r in res]
    a, b, c = images / "good.jpg", images / "odd/cmyk.jpg", images / "odd/rgba.png"
    proc = ok(retrieve(["pairs", "--features", str(features), str(a), str(b), str(c), "--csv", str(tmp_path / "d.csv")]))
    rows = (tmp_path / "d.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[1].split(",")[1] == "0.000000"  # distance of an image to itself
    fails(retrieve(["search", "--features", str(features), "--query", str(images / "bad/text.jpg")]), 2,
          "cannot read image")
    fails(retrieve(["search", "--features", str(features), "--query", str(tmp_path / "nope.jpg")]), 2, "no such file")


# ------------------------------------------------------------------------------------------
# train -> extract -> eval on digits, and bad input


@pytest.mark.slow
def test_trained_digits_run_extracted_and_evaluated(demo_single, tmp_path):
    proc = ok(extract(["--config", str(ROOT / "configs/extract_digits.yaml"), f"model.run={demo_single}",
                       f"run.dir={tmp_path / 'x'}"]))
    features = tmp_path / "x/features"
    assert "360 x 84" in proc.stdout
    meta = json.loads((features / "meta.json").read_text())
    assert meta["model"]["run"] == str(demo_single) and meta["model"]["num_classes"] == 10
    proc = ok(retrieve(["eval", "--features", str(features), "--topk", "1,5"]))
    res = json.loads((features / "retrieval_eval.json").read_text())
    assert res["queries"] == 360 and res["gallery"] == 359 and res["leave_one_out"]
    assert res["precision@5"] > 0.9 and res["mAP"] > 0.8  # a trained LeNet separates the digits
    assert "mAP" in proc.stdout
    # the test split searched with the validation split as queries
    ok(extract(["--config", str(ROOT / "configs/extract_digits.yaml"), f"model.run={demo_single}", "data.split=val",
                f"run.dir={tmp_path / 'v'}"]))
    ok(retrieve(["eval", "--features", str(features), "--queries", str(tmp_path / "v/features"), "--topk", "5",
                 "--out", str(tmp_path / "qv.json")]))
    qv = json.loads((tmp_path / "qv.json").read_text())
    assert qv["queries"] == 180 and qv["gallery"] == 360 and not qv["leave_one_out"]
    ok(retrieve(["search", "--features", str(features), "--query-index", "0", "--topk", "3"]))
    fails(retrieve(["search", "--features", str(features), "--query", str(ROOT / "README.md")]), 2, "--query-index")


@pytest.mark.slow
def test_layers(tmp_path):
    ok(extract([*DIGITS, "data.limit=50", "extract.layer=logits", "model.num_classes=10", f"run.dir={tmp_path / 'a'}"]))
    assert load_features(tmp_path / "a/features").features.shape == (50, 10)
    ok(extract([*DIGITS, "data.limit=50", "extract.layer=features.3", "extract.l2_normalize=false",
                f"run.dir={tmp_path / 'b'}"]))  # LeNet's second conv block: (B, 16, H, W) pooled to 16
    assert load_features(tmp_path / "b/features").features.shape == (50, 16)
    fails(extract([*DIGITS, "extract.layer=nope", f"run.dir={tmp_path / 'c'}"]), 2, "extract.layer", "no module 'nope'")


@pytest.mark.slow
@pytest.mark.parametrize("args,needles", [
    (["data.nme=x"], ["data.nme"]),
    (["extract.shard_size=0"], ["extract.shard_size"]),
    (["extract.precision=fp8"], ["extract.precision"]),
    (["model.name=null"], ["model.name", "model.run"]),
    (["model.run=/no/such/run", "model.name=null"], ["model.run", "not a finished training run"]),
    (["data.name=folder", "data.root=/no/such/dir"], ["data.root", "no such directory"]),
    (["data.split=extra"], ["data.split"]),
])
def test_bad_config_is_one_line_and_exit_2(args, needles, tmp_path):
    fails(extract([*DIGITS, *args, f"run.dir={tmp_path / 'r'}"]), 2, *needles)
    assert not (tmp_path / "r/features/shards").exists() or not any((tmp_path / "r/features/shards").iterdir())


@pytest.mark.slow
def test_feature_plots_from_a_features_directory(one_process, tmp_path):
    proc = ok(run_module("toolkit.report", [str(one_process), "--tsne", "--classes", "0,1,2", "--out", str(tmp_path)]))
    assert "2 image(s)" in proc.stdout
    for name in ("features_pca.png", "features_tsne.png", "report.html"):
        assert (tmp_path / name).stat().st_size > 0


@pytest.mark.slow
def test_bf16_autocast_and_channels_last_give_nearly_the_same_features(one_process, tmp_path):
    run = tmp_path / "bf16"
    ok(extract([*DIGITS, "extract.precision=bf16", "extract.channels_last=true", f"run.dir={run}"]))
    a, b = load_features(one_process), load_features(run / "features")
    assert b.features.dtype == torch.float32 and torch.equal(a.index, b.index)
    assert not torch.equal(a.features, b.features)  # bf16 really ran
    cos = (a.features * b.features).sum(1)
    assert cos.min() > 0.99, cos.min()
    assert json.loads((run / "features/meta.json").read_text())["precision"] == "bf16"


def test_items_travel_as_uint8_and_normalise_on_the_device_like_the_float_transform(tmp_path):
    """The collection hands out uint8; `normalize` on the batch gives the float transform's pixels."""
    from toolkit.data.base import TensorImageDataset
    from torchvision.transforms import v2

    from toolkit.data.collection import ImageCollection, SplitAsCollection
    from toolkit.data.images import IMAGENET_MEAN, IMAGENET_STD, load_rgb

    root = tmp_path / "g" / "cls"
    root.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        pixels = torch.randint(0, 256, (37 + i, 50, 3), dtype=torch.uint8, generator=g).numpy()
        Image.fromarray(pixels).save(root / f"{i}.png")
    ds = ImageCollection(str(tmp_path / "g"), image_size=24)
    ref = v2.Compose([v2.Resize(24, antialias=True), v2.CenterCrop(24), v2.PILToTensor(),  # torchvision's float transform
                      v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD))])
    items = [ds[i] for i in range(3)]
    assert all(x.dtype == torch.uint8 and x.shape == (3, 24, 24) for x, *_ in items)
    got = ds.normalize(torch.stack([x for x, *_ in items]))
    want = torch.stack([ref(load_rgb(ds.path(i))) for i in range(3)])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # a uint8 training set (cifar, synthetic, prepared) is normalised with its own formula
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=g)
    tds = TensorImageDataset(images, torch.arange(4), mean=torch.tensor([0.4, 0.5, 0.6]), std=torch.tensor([0.2, 0.2, 0.3]))
    split = SplitAsCollection(tds, "synthetic", "train", ["a"] * 4, {"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.2, 0.3]})
    x, y, i, bad = split[2]
    assert x.dtype == torch.uint8 and int(y) == 2 and bad is None
    assert torch.equal(split.normalize(images[[0, 2]]), tds.__getitems__([0, 2])[0])


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["digits", "synthetic"])  # float (already normalised) and uint8 sets
def test_device_loader_gives_the_dataloaders_features(dataset, tmp_path):
    base = [f"data.name={dataset}", "data.split=test", "data.limit=200", "model.name=lenet", "extract.shard_size=64"]
    dev = ok(extract([*base, f"run.dir={tmp_path / 'dev'}"]))  # auto: in memory, so on the device
    dl = ok(extract([*base, f"run.dir={tmp_path / 'dl'}", "data.loader=dataloader", "data.num_workers=1"]))
    assert "loader device" in dev.stdout and "loader dataloader" in dl.stdout
    a, b = load_features(tmp_path / "dev" / "features"), load_features(tmp_path / "dl" / "features")
    assert torch.equal(a.features, b.features) and torch.equal(a.index, b.index) and torch.equal(a.labels, b.labels)
    # the loader does not change a feature value: a rerun may switch it and keeps the shards
    again = ok(extract([*base, f"run.dir={tmp_path / 'dev'}", "data.loader=dataloader"]))
    assert "complete shard(s) kept, 0 to do" in again.stdout


@pytest.mark.slow
def test_device_loader_on_a_folder_is_one_line(tmp_path):
    (tmp_path / "g").mkdir()
    Image.new("RGB", (20, 20)).save(tmp_path / "g" / "a.png")
    proc = extract(["data.name=folder", f"data.root={tmp_path / 'g'}", "model.name=lenet", "data.image_size=32",
                    "data.loader=device", f"run.dir={tmp_path / 'run'}"])
    fails(proc, 2, "data.loader: device: a folder collection is decoded image by image")
    assert not (tmp_path / "run" / "features" / "shards").exists()


# ------------------------------------------------------------------------------------------
# the background shard writer


def test_shard_writer_returns_before_the_write_and_reports_each_shard_once_its_marker_is_on_disk(tmp_path,
                                                                                                 monkeypatch):
    import threading

    from toolkit.features import ShardWriter, store

    gate, real = threading.Event(), store.write_shard

    def slow_write(*args, **kwargs):
        assert gate.wait(30), "the test never opened the gate"
        return real(*args, **kwargs)

    monkeypatch.setattr(store, "write_shard", slow_write)
    reported = []

    def on_written(k):  # the shard is complete when it is reported, and reported in order
        assert store.shard_marker(tmp_path, k) is not None
        reported.append(k)

    writer = ShardWriter(tmp_path, on_written)
    feats = [torch.randn(5, 3), torch.randn(4, 3)]
    writer.submit(0, feats[0], torch.arange(5), torch.zeros(5, dtype=torch.int64), [])
    assert reported == [] and store.shard_marker(tmp_path, 0) is None  # submit did not wait for the write
    gate.set()
    writer.submit(1, feats[1], torch.arange(5, 9), torch.ones(4, dtype=torch.int64), [(9, "x.jpg", "bad")])
    assert reported == [0]  # the next submit waited for shard 0
    writer.close()
    assert reported == [0, 1]
    for k in (0, 1):
        got = store.read_shard(tmp_path, k)
        assert torch.equal(got["features"], feats[k])
    assert store.shard_marker(tmp_path, 1)["bad"] == [[9, "x.jpg", "bad"]]


def test_shard_writer_raises_a_failed_write_and_does_not_report_it(tmp_path, monkeypatch):
    from toolkit.features import ShardWriter, store

    def full_disk(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "write_shard", full_disk)
    reported = []
    writer = ShardWriter(tmp_path, reported.append)
    writer.submit(0, torch.randn(2, 3), torch.arange(2), torch.zeros(2, dtype=torch.int64), [])
    with pytest.raises(OSError, match="No space left"):
        writer.close()
    assert reported == []
    assert all(not t.is_alive() for t in writer.pool._threads)  # the thread is stopped


def test_shard_writer_abandoned_on_another_error_still_finishes_the_write_unreported(tmp_path):
    from toolkit.features import ShardWriter, store

    reported = []
    writer = ShardWriter(tmp_path, reported.append)
    writer.submit(0, torch.randn(3, 2), torch.arange(3), torch.zeros(3, dtype=torch.int64), [])
    writer.abandon()  # what extract() does when the loop raises
    assert store.shard_marker(tmp_path, 0) is not None and reported == []
