"""`imagefolder` on small folders of images written here with PIL: layout, decoding, the
training union, limit, label reassignment, every kind of bad input, and one CLI run."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from helpers import (CLASSES, flat_image, make_folder, ok, png_bomb, summary, train, truncated_bmp, truncated_jpeg,
                     truncated_png)
from helpers import build_imagefolder as build
from toolkit.data import DATASETS, collate_batch
from toolkit.data.images import IMAGENET_MEAN, IMAGENET_STD
from toolkit.errors import ConfigError

MEAN, STD = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)


@pytest.fixture
def root(tmp_path) -> Path:
    return make_folder(tmp_path / "data")


def one_line_error(**kw) -> str:
    root = kw.pop("root")
    with pytest.raises(ConfigError) as e:
        build(root, **kw)
    msg = str(e.value)
    assert msg.startswith("config: data.") and "\n" not in msg, msg
    return msg


# ------------------------------------------------------------------------------------------
# layout and decoding


def test_sizes_classes_labels_and_meta(root):
    s = build(root)
    assert (len(s.train), len(s.val), len(s.test)) == (18, 6, 9)
    assert s.num_classes == 3 and s.class_names == CLASSES
    assert s.train.labels.dtype == torch.int64
    assert s.train.labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    assert s.test.labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    for ds in (s.train, s.val, s.test):  # each label is its file's class folder, in path order
        assert [CLASSES[y] for y in ds.labels.tolist()] == [Path(p).parent.name for p in ds.paths]
        assert list(ds.paths) == sorted(ds.paths)
    assert s.meta["image_size"] == 32 and s.meta["mean"] == list(IMAGENET_MEAN)
    assert s.meta["std"] == list(IMAGENET_STD)
    assert s.meta["sizes"] == {"train": 18, "val": 6, "test": 9}
    json.dumps(s.meta)  # the engine writes it to RUN/data.json


@pytest.mark.parametrize("size", [32, 48])
def test_output_shape(root, size):
    s = build(root, image_size=size)
    for ds in (s.train, s.test):
        for i in (0, len(ds) - 1):
            x, y = ds[i]
            assert x.shape == (3, size, size) and x.dtype == torch.float32 and torch.isfinite(x).all()
            assert int(y) == ds.labels[i]


def test_default_image_size_is_224(root):
    s = build(root, image_size=None)
    assert s.meta["image_size"] == 224 and s.val[0][0].shape == (3, 224, 224)


def test_non_square_image_is_resized_then_centre_cropped(tmp_path):
    root = make_folder(tmp_path / "d", {"train": 1, "val": 1, "test": 1})
    # 30 wide x 60 tall: red rows 0-14, green rows 15-44, blue rows 45-59. The shorter side is
    # already 30, so the centre 30x30 crop is all green; squashing to 30x30 would keep red and blue.
    a = np.zeros((60, 30, 3), np.uint8)
    a[:15] = (255, 0, 0)
    a[15:45] = (0, 255, 0)
    a[45:] = (0, 0, 255)
    Image.fromarray(a).save(root / "test" / "dog" / "00.png")
    x, _ = build(root, image_size=30).test[1]  # (3, 30, 30)
    back = x * STD[:, None, None] + MEAN[:, None, None]
    assert torch.allclose(back, torch.tensor([0.0, 1.0, 0.0])[:, None, None].expand(3, 30, 30), atol=1e-5)


def test_solid_colour_decodes_to_imagenet_normalised_value(tmp_path):
    root = make_folder(tmp_path / "d", {"train": 1, "val": 1, "test": 1})
    Image.new("RGB", (40, 30), (200, 100, 50)).save(root / "test" / "emu" / "00.png")
    x, y = build(root, image_size=48).test[2]
    expected = (torch.tensor([200, 100, 50]) / 255.0 - MEAN) / STD
    assert int(y) == 2
    assert torch.allclose(x, expected[:, None, None].expand(3, 48, 48), atol=1e-5)


def test_odd_but_valid_modes_become_rgb(tmp_path):
    root = make_folder(tmp_path / "d", {"train": 1, "val": 1, "test": 1})
    grey = Image.new("L", (40, 30), 128)
    odd = {"grey.png": grey, "grey16.png": Image.new("I;16", (40, 30), 5000),
           "palette.gif": grey.convert("RGB").quantize(4), "cmyk.jpg": Image.new("CMYK", (40, 30), (0, 0, 0, 0)),
           "rgba.png": Image.new("RGBA", (40, 30), (10, 20, 30, 0)), "la.png": Image.new("LA", (40, 30), (90, 255)),
           "bilevel.tif": Image.new("1", (40, 30), 1)}
    for name, im in odd.items():
        im.save(root / "train" / "cat" / name)
    s = build(root)
    names = [Path(p).name for p in s.train.paths]
    for name in odd:
        x, _ = s.train[names.index(name)]
        assert x.shape == (3, 32, 32) and torch.isfinite(x).all(), name
        back = x * STD[:, None, None] + MEAN[:, None, None]
        if name.startswith(("grey", "la", "bilevel", "palette", "cmyk")):  # no colour in: R == G == B
            assert torch.allclose(back[0], back[1], atol=1e-5) and torch.allclose(back[1], back[2], atol=1e-5), name
    grey_x = s.train[names.index("grey.png")][0] * STD[:, None, None] + MEAN[:, None, None]
    assert torch.allclose(grey_x, torch.full((3, 32, 32), 128 / 255), atol=1e-5)
    white = s.train[names.index("cmyk.jpg")][0] * STD[:, None, None] + MEAN[:, None, None]
    assert white.min() > 0.98  # CMYK (0, 0, 0, 0) is white


def test_union_of_training_splits(root):
    s = build(root, train_splits=["train", "extra"])
    assert len(s.train) == 18 + 6 and (len(s.val), len(s.test)) == (6, 9)
    assert s.train.labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6 + [0] * 2 + [1] * 2 + [2] * 2
    assert [Path(p).parts[-3] for p in s.train.paths] == ["train"] * 18 + ["extra"] * 6
    assert s.meta["sizes"]["train"] == 24 and s.meta["train_splits"] == ["train", "extra"]
    # E4's tuning runs: train + val + extra, validated on test. Allowed, and recorded.
    s = build(root, train_splits=["train", "val", "extra"])
    assert len(s.train) == 30 and len(s.val) == 6 and s.meta["val_in_train"] is True


def test_limit_keeps_a_stratified_subset_of_each_split_in_path_order(root):
    full, s = build(root), build(root, limit=4)
    assert (len(s.train), len(s.val), len(s.test)) == (4, 4, 4)
    for a, b in ((full.train, s.train), (full.val, s.val), (full.test, s.test)):
        where = {p: i for i, p in enumerate(a.paths)}
        rows = [where[p] for p in b.paths]
        assert rows == sorted(rows) and b.labels.tolist() == a.labels[rows].tolist()  # a subset, in path order
        assert set(b.labels.tolist()) == {0, 1, 2}  # every class (the first 4 would be 2 classes)
    assert s.meta["sizes"] == {"train": 4, "val": 4, "test": 4}


def test_reassigned_labels_are_what_getitem_returns(root):
    s = build(root)
    noisy = (s.train.labels + 1) % 3
    s.train.labels = noisy
    assert [int(s.train[i][1]) for i in range(len(s.train))] == noisy.tolist()
    _, y = DataLoader(s.train, batch_size=18, collate_fn=collate_batch).__iter__().__next__()
    assert torch.equal(y, noisy)
    with pytest.raises(ValueError):
        s.train.labels = noisy[:3]


def test_dataloader_workers_and_collate(root):
    s = build(root)
    pickle.loads(pickle.dumps(s.train))  # spawn-started workers receive a pickled copy
    xs, ys = [], []
    for x, y in DataLoader(s.test, batch_size=4, num_workers=2, collate_fn=collate_batch):
        xs.append(x)
        ys.append(y)
    assert [tuple(x.shape) for x in xs] == [(4, 3, 32, 32), (4, 3, 32, 32), (1, 3, 32, 32)]
    assert torch.cat(ys).tolist() == s.test.labels.tolist() and ys[0].dtype == torch.int64
    assert torch.equal(xs[0][1], s.test[1][0])


# ------------------------------------------------------------------------------------------
# bad input: one line, raised when the dataset is built, names the path


def test_missing_root_or_split_folders(tmp_path, root):
    msg = one_line_error(root=tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in msg and "not found" in msg
    msg = one_line_error(root=root, train_splits=["train", "more"])
    assert str(root / "more") in msg and "not found" in msg and "extra, test, train, val" in msg
    (root / "train").rename(root / "old")
    msg = one_line_error(root=root)
    assert str(root / "train") in msg and "not found" in msg
    (root / "old").rename(root / "train")
    (root / "test").rename(root / "old")
    assert str(root / "test") in one_line_error(root=root)
    with pytest.raises(ConfigError, match="needs data.root"):
        DATASETS.build("imagefolder", root=None, split_seed=0, limit=None, download=False)


@pytest.mark.parametrize("kw, key", [({"train_splits": []}, "train_splits"),
                                     ({"train_splits": ["train", "train"]}, "train_splits"),
                                     ({"train_splits": ["../data/train"]}, "train_splits"),
                                     ({"image_size": 0}, "image_size")])
def test_bad_arguments(root, kw, key):
    assert one_line_error(root=root, **kw).startswith(f"config: data.{key}: ")


def test_a_split_without_images(root):
    for f in (root / "val").rglob("*.*"):
        if f.suffix != ".txt":
            f.unlink()
    msg = one_line_error(root=root)
    assert msg.startswith("config: data.root: no images found in ") and str(root / "val") in msg
    for d in (root / "train").iterdir():  # no class folders at all
        for f in d.iterdir():
            f.unlink()
        d.rmdir()
    assert str(root / "train") in one_line_error(root=root)


@pytest.mark.parametrize("split", ["test", "val", "extra"])
def test_a_class_folder_not_in_train(root, split):
    (root / split / "yak").mkdir()
    flat_image("RGB", 0, 0).save(root / split / "yak" / "00.png")
    msg = one_line_error(root=root, train_splits=["train", "extra"])
    assert str(root / split) in msg and "yak" in msg and str(root / "train") in msg


def test_a_class_missing_from_a_split_is_fine(root):
    for f in (root / "test" / "dog").iterdir():
        f.unlink()
    (root / "test" / "dog").rmdir()
    s = build(root)
    assert s.num_classes == 3 and s.test.labels.tolist() == [0] * 3 + [2] * 3


BAD = {
    "zero_bytes": (".jpg", lambda p: p.write_bytes(b""), "empty file"),
    "random_bytes": (".png", lambda p: p.write_bytes(np.random.default_rng(1).bytes(500)), "not an image"),
    "text_named_jpg": (".jpg", lambda p: p.write_text("hello, I am not a JPEG\n" * 20), "not an image"),
    "truncated_jpeg": (".jpg", truncated_jpeg, "truncated"),
    "truncated_png": (".png", truncated_png, "Truncated"),
    "truncated_bmp": (".bmp", truncated_bmp, "truncated"),
    "bomb": (".png", lambda p: p.write_bytes(png_bomb(100_000, 100_000)), "DecompressionBomb"),
}


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("kind", sorted(BAD))
def test_unreadable_image_is_named_at_build_time(root, kind, split):
    ext, write, reason = BAD[kind]
    bad = root / split / "dog" / f"00_bad{ext}"
    write(bad)
    msg = one_line_error(root=root)
    assert msg.startswith(f"config: data.root: 1 unreadable image(s): {bad} (") and msg.endswith(")")
    assert reason in msg, msg


def test_several_unreadable_images_are_all_named_in_path_order(root):
    for p in (root / "val" / "emu" / "x.jpg", root / "test" / "cat" / "z.jpg", root / "train" / "dog" / "y.jpg"):
        p.write_bytes(b"")
    msg = one_line_error(root=root)
    assert (f"3 unreadable image(s): {root / 'train' / 'dog' / 'y.jpg'} (empty file), "
            f"{root / 'val' / 'emu' / 'x.jpg'} (empty file), {root / 'test' / 'cat' / 'z.jpg'} (empty file)") in msg
    # More than three: the first three in the line, every one in a file the line names.
    extra = [root / "train" / "cat" / f"w{i}.jpg" for i in range(2)]
    for p in extra:
        p.write_bytes(b"")
    msg = one_line_error(root=root)
    assert "5 unreadable image(s): " in msg and " and 2 more, all listed in " in msg
    listing = Path(msg.rsplit(" all listed in ", 1)[1])
    assert sorted(line.split("\t")[0] for line in listing.read_text().splitlines()) == sorted(
        str(p) for p in [*extra, root / "val" / "emu" / "x.jpg", root / "test" / "cat" / "z.jpg",
                         root / "train" / "dog" / "y.jpg"])
    listing.unlink()
    for p in extra:
        p.unlink()
    # With limit=2 the broken files are not part of any split, so nothing is refused.
    assert len(build(root, limit=2).train) == 2


def test_decompression_bomb_warning_is_an_error(root, monkeypatch):
    # 40 x 30 = 1,200 pixels: over the limit but under twice it, where Pillow only warns.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    msg = one_line_error(root=root, limit=2)
    assert msg.startswith("config: data.root: 6 unreadable image(s): ") and "DecompressionBomb" in msg
    Path(msg.rsplit(" all listed in ", 1)[1]).unlink()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1200)  # at the limit: fine
    build(root, limit=2)


def test_an_image_broken_after_the_build_is_named_when_loaded(root):
    s = build(root)
    Path(s.train.paths[3]).write_bytes(b"")
    with pytest.raises(ConfigError, match=f"unreadable image {s.train.paths[3]} "):
        s.train[3]


# ------------------------------------------------------------------------------------------
# the real CLI


@pytest.mark.slow
def test_train_cli_on_an_image_folder(root, tmp_path):
    run = tmp_path / "run"
    ok(train(["--config", "configs/digits_lenet.yaml", "data.name=imagefolder", f"data.root={root}",
              "data.image_size=32", "train.epochs=1", "sched.milestones=[]", "data.batch_size=6",
              "data.eval_batch_size=6", f"run.dir={run}", "log.tensorboard=false"]))
    s = summary(run)
    assert s["num_test_samples"] == 9 and set(s["per_class_acc"]) == set(CLASSES)
    assert json.loads((run / "data.json").read_text())["image_size"] == 32
