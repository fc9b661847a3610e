"""`python -m toolkit.prepare` and the `prepared` dataset on a small folder written here, plus
the per-image decode both share with `imagefolder` (torchvision for 8-bit JPEG/PNG, Pillow for
the rest): same pixels as Pillow, truncated files and decompression bombs still refused."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from torchvision.transforms import v2

from helpers import ok, png_bomb, run_module, summary, train, truncated_jpeg, truncated_png
from toolkit.data import DATASETS
from toolkit.data import images as imf
from toolkit.errors import ConfigError
from toolkit.prepare import main as prepare_main
from toolkit.prepare import prepare

CLASSES = ["ant", "bee", "cow"]
PER_SPLIT = {"train": 4, "val": 2, "test": 2, "extra": 2}
# (Pillow mode, extension, size): JPEG and PNG in the modes the fast path takes, plus the ones
# left to Pillow (CMYK JPEG, 16-bit grey PNG, BMP); sizes make the resize go down, up, both ways.
KINDS = [("RGB", ".jpg", (48, 36)), ("L", ".png", (30, 50)), ("RGBA", ".png", (64, 40)), ("L", ".jpg", (20, 20)),
         ("P", ".png", (40, 41)), ("CMYK", ".jpg", (50, 30)), ("RGB", ".png", (33, 70)), ("I;16", ".png", (40, 30)),
         ("LA", ".png", (36, 36)), ("RGB", ".bmp", (45, 35))]
SIZE = 32


def natural(h: int, w: int, seed: int) -> np.ndarray:
    """(h, w, 3) uint8: smooth waves, a few solid discs, a little noise; edges and gradients like
    a photo, so resizing and JPEG have something to do (a solid colour would hide differences)."""
    r = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([0.5 + 0.5 * np.sin(r.uniform(1, 6) * 6.28 * xx + r.uniform(1, 6) * 6.28 * yy + r.uniform(0, 6))
                    for _ in range(3)], axis=-1)
    for _ in range(3):
        cy, cx, rad = r.uniform(0, 1, 2).tolist() + [r.uniform(0.1, 0.3)]
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < rad ** 2] = r.uniform(0, 1, 3)
    img += r.normal(0, 0.03, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def make_image(mode: str, size, seed: int) -> Image.Image:
    rgb = Image.fromarray(natural(size[1], size[0], seed))
    if mode == "P":
        return rgb.quantize(32)
    if mode == "I;16":
        return Image.fromarray(natural(size[1], size[0], seed)[..., 0].astype(np.uint16) * 257)
    return rgb.convert(mode)


def make_folder(root: Path, per_split=PER_SPLIT) -> Path:
    seed = 0
    for split, n in per_split.items():
        for c, name in enumerate(CLASSES):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                mode, ext, size = KINDS[seed % len(KINDS)]
                make_image(mode, size, seed).save(d / f"{i:02d}{ext}", **({"quality": 90} if ext == ".jpg" else {}))
                seed += 1
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("prep") / "data")


@pytest.fixture(scope="module")
def out(folder) -> Path:
    path = folder.parent / "prepared"
    prepare(str(folder), SIZE, str(path))
    return path


def build(name: str, root: Path, **kw):
    kw = {"split_seed": 0, "limit": None, "download": False, "image_size": None, **kw}
    return DATASETS.build(name, root=str(root), **kw)


def one_line_error(name: str, root: Path, **kw) -> str:
    with pytest.raises(ConfigError) as e:
        build(name, root, **kw)
    msg = str(e.value)
    assert msg.startswith("config: data.") and "\n" not in msg, msg
    return msg


def prepare_cli(*args: str) -> subprocess.CompletedProcess:
    return run_module("toolkit.prepare", args, timeout=300)


def prepare_in_process(capsys, *args: str, code: int = 2) -> str:
    """`toolkit.prepare.main(ARGS)` in this process (fast); -> its one stderr line."""
    assert prepare_main([*args, "--progress", "none"]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def one_line_stderr(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    assert proc.returncode == code, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


# ------------------------------------------------------------------------------------------
# the decode (imagefolder's per-image pipeline)


def pil_pipeline(path: Path, size: int) -> torch.Tensor:
    """The pipeline before the switch: Pillow decode, Pillow resize, centre crop -> (3, S, S) uint8."""
    with Image.open(path) as im:
        rgb = im.convert("RGB")
    return v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size), v2.PILToTensor()])(rgb)


def test_fast_decode_is_active():
    # torchvision's image ops are deprecated since 0.29 (torchcodec replaces them); when they are
    # gone Pillow decodes everything, slower. This says so instead of a silent slow-down.
    assert imf.fast_decode(), "torchvision.io decoders not found: imagefolder decodes with Pillow only"


@pytest.mark.parametrize("mode, ext, size", KINDS + [("1", ".png", (30, 20)), ("RGB", ".jpg", (256, 256))])
def test_decode_equals_pillow(tmp_path, mode, ext, size):
    path = tmp_path / f"x{ext}"
    im = make_image(mode, size, 7)
    if mode == "P":  # a palette with a transparent entry: Pillow's convert drops it, so must we
        im.info["transparency"] = 0
    im.save(path, **({"quality": 90} if ext == ".jpg" else {}))
    with Image.open(path) as ref:
        expected = torch.from_numpy(np.array(ref.convert("RGB"))).permute(2, 0, 1)
    got = imf.decode_uint8(str(path))
    assert got.dtype == torch.uint8 and torch.equal(got, expected)


@pytest.mark.parametrize("size", [8, 32, 80])
def test_resize_within_one_level_of_pillow(folder, size):
    paths = sorted(p for p in folder.rglob("*.*"))
    diffs = [(imf.load_resized(str(p), size).int() - pil_pipeline(p, size).int()).abs() for p in paths]
    assert max(int(d.max()) for d in diffs) <= 1  # torch's uint8 antialias kernel is a port of Pillow's
    # Off-by-one rounding on some pixels: ~0.3% on random sizes, up to a quarter of one image
    # when the scale is close to 1 (33x70 -> 32); on average well under a tenth of a level.
    assert float(torch.cat([d.flatten() for d in diffs]).float().mean()) < 0.1


def test_truncated_jpeg_is_refused_by_torchvision_and_pillow(tmp_path):
    data = truncated_jpeg(tmp_path / "t.jpg")
    with pytest.raises(RuntimeError, match="truncated"):  # the fast decoder itself refuses it ...
        imf.decoders()["JPEG"](torch.frombuffer(bytearray(data), dtype=torch.uint8), 3, False)
    with pytest.raises(OSError, match="truncated"):  # ... and what the caller sees is Pillow's error
        imf.decode_uint8(str(tmp_path / "t.jpg"))


def test_truncated_png_is_refused(tmp_path):
    truncated_png(tmp_path / "t.png")
    with pytest.raises(OSError):
        imf.decode_uint8(str(tmp_path / "t.png"))


def test_bombs_are_refused_before_any_decoder_runs(tmp_path, monkeypatch):
    def must_not_run(*a):
        raise AssertionError("a decoder ran on a decompression bomb")

    monkeypatch.setattr(imf, "_DECODERS", {"JPEG": must_not_run, "PNG": must_not_run})
    (tmp_path / "bomb.png").write_bytes(png_bomb(100_000, 100_000))  # torchvision would allocate 30 GB
    with pytest.raises(Image.DecompressionBombError):
        imf.decode_uint8(str(tmp_path / "bomb.png"))
    Image.fromarray(natural(40, 30, 2)).save(tmp_path / "small.jpg")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1,200 pixels: Pillow would only warn
    with pytest.raises(Image.DecompressionBombError), pytest.warns(Image.DecompressionBombWarning):
        imf.decode_uint8(str(tmp_path / "small.jpg"))


# ------------------------------------------------------------------------------------------
# prepared == imagefolder


def test_prepared_arrays_are_what_imagefolder_yields(folder, out):
    train_splits = ["train", "extra"]
    a = build("prepared", out, train_splits=train_splits)
    b = build("imagefolder", folder, image_size=SIZE, train_splits=train_splits)
    assert a.class_names == b.class_names == CLASSES and a.num_classes == 3
    assert {k: a.meta[k] for k in ("image_size", "mean", "std", "sizes", "train_splits")} == \
           {k: b.meta[k] for k in ("image_size", "mean", "std", "sizes", "train_splits")}
    for split in ("train", "val", "test"):
        pa, pb = getattr(a, split), getattr(b, split)
        assert len(pa) == len(pb) and torch.equal(pa.labels, pb.labels)
        assert pa.images.dtype == torch.uint8 and pa.images.shape == (len(pb), 3, SIZE, SIZE)
        for i in range(len(pb)):  # the same uint8 pixels ...
            assert torch.equal(pa.images[i], imf.load_resized(str(pb.paths[i]), SIZE)), pb.paths[i]
        xa, ya = pa.__getitems__(list(range(len(pa))))  # ... and, normalised, the same floats
        xb = torch.stack([pb[i][0] for i in range(len(pb))])
        assert torch.allclose(xa, xb, atol=1e-5) and torch.equal(ya, pb.labels)


def test_manifest_and_file_format(folder, out):
    m = json.loads((out / "manifest.json").read_text())
    assert m["format"] == "toolkit.prepared" and m["version"] == 1 and m["image_size"] == SIZE
    assert m["class_names"] == CLASSES and m["source_root"] == str(folder.resolve())
    assert m["mean"] == list(imf.IMAGENET_MEAN) and m["std"] == list(imf.IMAGENET_STD)
    assert list(m["splits"]) == ["train", "val", "test", "extra"]
    for name, n in PER_SPLIT.items():
        info = m["splits"][name]
        assert info["size"] == n * 3 and info["bytes"] == (out / info["file"]).stat().st_size
        assert info["files"] == sorted(info["files"]) and all(f.startswith(f"{name}/") for f in info["files"])
        assert all((folder / f).is_file() for f in info["files"])
        with safe_open(str(out / info["file"]), "pt") as f:  # a standard safetensors file
            assert f.metadata()["split"] == name
            assert f.get_tensor("images").shape == (n * 3, 3, SIZE, SIZE)
            assert f.get_tensor("labels").tolist() == sorted(f.get_tensor("labels").tolist())
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no partial folder left


def test_limit_union_val_in_train_and_image_size(folder, out):
    s = build("prepared", out, limit=5, image_size=SIZE)
    assert (len(s.train), len(s.val), len(s.test)) == (5, 5, 5)
    full = build("prepared", out)
    # imagefolder's stratified subset, so both still feed the same images
    b = build("imagefolder", folder, limit=5, image_size=SIZE)
    where = {p: i for i, p in enumerate(build("imagefolder", folder, image_size=SIZE).train.paths)}
    rows = [where[p] for p in b.train.paths]
    assert torch.equal(s.train.images, full.train.images[rows]) and torch.equal(s.train.labels, b.train.labels)
    assert set(s.train.labels.tolist()) == {0, 1, 2}
    s = build("prepared", out, train_splits=["train", "val", "extra"])
    assert len(s.train) == 12 + 6 + 6 and s.meta["val_in_train"] is True
    assert torch.equal(s.train.images[12:18], s.val.images)
    s.train.labels = (s.train.labels + 1) % 3  # label noise reassigns; the val split is untouched
    assert s.val.labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_only_some_splits_and_classes_from_the_first(folder, tmp_path):
    m = prepare(str(folder), 16, str(tmp_path / "p"), splits=["val", "test"])
    assert list(m["splits"]) == ["val", "test"] and m["class_names"] == CLASSES
    msg = one_line_error("prepared", tmp_path / "p")
    assert msg.startswith("config: data.train_splits: split 'train' was not prepared") and "val, test" in msg


# ------------------------------------------------------------------------------------------
# bad prepared folders: one line, at build time


def test_loader_errors(folder, out, tmp_path):
    import shutil

    assert "not found" in one_line_error("prepared", tmp_path / "nowhere")
    msg = one_line_error("prepared", folder)
    assert "manifest.json is missing" in msg and "data.name=imagefolder" in msg
    with pytest.raises(ConfigError, match="prepared needs data.root"):
        DATASETS.build("prepared", root=None, split_seed=0, limit=None, download=False)
    msg = one_line_error("prepared", out, image_size=64)
    assert msg.startswith("config: data.image_size: 64, but") and f"prepared at {SIZE} px" in msg
    assert one_line_error("prepared", out, train_splits=["train", "more"]).startswith("config: data.train_splits: ")

    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    (bad / "manifest.json").write_text("{not json")
    assert "not readable JSON" in one_line_error("prepared", bad)
    m = json.loads((out / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps({**m, "version": 99}))
    assert "version 99" in one_line_error("prepared", bad)
    (bad / "manifest.json").write_text(json.dumps({**m, "image_size": "big"}))
    assert "image_size" in one_line_error("prepared", bad)

    (bad / "manifest.json").write_text(json.dumps(m))
    (bad / "test.safetensors").unlink()
    assert f"{bad / 'test.safetensors'} is missing" in one_line_error("prepared", bad)

    data = (out / "test.safetensors").read_bytes()
    (bad / "test.safetensors").write_bytes(data[: len(data) // 2])
    msg = one_line_error("prepared", bad)
    assert f"{bad / 'test.safetensors'} is truncated or changed ({len(data) // 2} of {len(data)} bytes)" in msg

    (bad / "test.safetensors").write_bytes(b"\xff" * len(data))  # right size, garbage header
    assert "not a readable safetensors file" in one_line_error("prepared", bad)

    (bad / "test.safetensors").write_bytes(data)
    m2 = json.loads(json.dumps(m))
    m2["splits"]["test"]["size"] = 5  # the manifest disagrees with the file
    (bad / "manifest.json").write_text(json.dumps(m2))
    assert "the manifest expects images uint8 (5, 3, 32, 32)" in one_line_error("prepared", bad)


def test_a_partial_folder_never_looks_complete(folder, tmp_path, monkeypatch):
    import toolkit.prepare as prep

    calls = []
    real = prep.write_split

    def fail_on_second(path, *a, **kw):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("No space left on device")
        return real(path, *a, **kw)

    monkeypatch.setattr(prep, "write_split", fail_on_second)
    with pytest.raises(OSError):
        prepare(str(folder), SIZE, str(tmp_path / "p"))
    assert list(tmp_path.iterdir()) == []  # neither OUT nor the hidden partial folder


# ------------------------------------------------------------------------------------------
# the real CLIs


@pytest.mark.slow
def test_cli_prepare_then_train(folder, tmp_path):
    out, run = tmp_path / "p", tmp_path / "run"
    proc = ok(prepare_cli("--root", str(folder), "--image-size", str(SIZE), "--out", str(out), "--workers", "2",
                          "--progress", "plain"))
    assert f"prepared 30 images (train 12, val 6, test 6, extra 6) at {SIZE} px, 3 classes" in proc.stdout
    assert f"data.name=prepared data.root={out}" in proc.stdout and "prepare: train 12/12 (100%)" in proc.stderr
    ok(train(["--config", "configs/digits_lenet.yaml", "data.name=prepared", f"data.root={out}",
              "data.train_splits=[train,extra]", "train.epochs=1", "sched.milestones=[]", "data.batch_size=6",
              "data.eval_batch_size=6", f"run.dir={run}", "log.tensorboard=false", "log.plots=false"]))
    s = summary(run)
    assert s["num_test_samples"] == 6 and set(s["per_class_acc"]) == set(CLASSES)
    assert json.loads((run / "data.json").read_text())["sizes"] == {"train": 18, "val": 6, "test": 6}

    # OUT exists: refused without --force, replaced with it
    line = one_line_stderr(prepare_cli("--root", str(folder), "--image-size", "16", "--out", str(out)))
    assert line == f"error: --out: {out} exists; pass --force to replace it"
    assert json.loads((out / "manifest.json").read_text())["image_size"] == SIZE
    ok(prepare_cli("--root", str(folder), "--image-size", "16", "--out", str(out), "--force", "--splits",
                   "train", "val", "test"))
    assert json.loads((out / "manifest.json").read_text())["image_size"] == 16
    assert not (out / "extra.safetensors").exists()
    # --force never replaces a folder this command did not write
    line = one_line_stderr(prepare_cli("--root", str(folder), "--image-size", "16", "--out", str(folder), "--force"))
    assert "is not a prepared folder" in line and (folder / "train").is_dir()

    # a truncated split file at train time: one line, exit 2
    f = out / "train.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    line = one_line_stderr(train(["--config", "configs/digits_lenet.yaml", "data.name=prepared",
                                  f"data.root={out}", "train.epochs=1", "sched.milestones=[]",
                                  f"run.dir={tmp_path / 'run2'}"]))
    assert line.startswith(f"error: config: data.root: {f} is truncated or changed")


@pytest.mark.parametrize("kind", ["truncated_jpeg", "bomb", "empty"])
def test_cli_refuses_a_bad_source_image_and_writes_nothing(folder, tmp_path, kind, capsys):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(folder, src)
    bad = src / "val" / "bee" / f"00_bad.{'jpg' if kind != 'bomb' else 'png'}"
    {"truncated_jpeg": lambda: truncated_jpeg(bad), "empty": lambda: bad.write_bytes(b""),
     "bomb": lambda: bad.write_bytes(png_bomb(100_000, 100_000))}[kind]()
    out = tmp_path / "p"
    line = prepare_in_process(capsys, "--root", str(src), "--image-size", str(SIZE), "--out", str(out))
    assert line.startswith(f"error: --root: 1 unreadable image(s): {bad} (")
    assert {"truncated_jpeg": "truncated", "empty": "empty file", "bomb": "DecompressionBomb"}[kind] in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no OUT, no partial folder


def test_cli_argument_errors(folder, tmp_path, capsys):
    line = prepare_in_process(capsys, "--root", str(tmp_path / "none"), "--image-size", "8", "--out",
                              str(tmp_path / "p"))
    assert "not found" in line
    line = prepare_in_process(capsys, "--root", str(folder), "--image-size", "0", "--out", str(tmp_path / "p"))
    assert line.startswith("error: --image-size: 0")
    line = prepare_in_process(capsys, "--root", str(folder), "--image-size", "8", "--out", str(tmp_path / "p"),
                              "--splits", "train", "nope")
    assert line.startswith("error: --splits: ") and "nope" in line
    assert not (tmp_path / "p").exists()
