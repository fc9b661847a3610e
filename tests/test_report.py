"""The plots every run leaves behind, and `python -m toolkit.report` on runs and comparisons."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import load_file

from helpers import DEMO, launch, metrics, ok, run_module, summary, train
from toolkit.report import read_confusion

pytestmark = pytest.mark.slow  # every test here trains through the CLI or uses demo_single, which does

SHORT = ["--config", DEMO, "train.epochs=2", "sched.milestones=[]", "log.tensorboard=false"]


def report(*args) -> subprocess.CompletedProcess:
    return run_module("toolkit.report", [str(a) for a in args], timeout=300)


def _png(path: Path) -> tuple:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


def test_a_run_leaves_curves_confusions_and_feature_plots(demo_single):
    run = demo_single
    for name in ("curves.png", "confusion_train.png", "confusion_test.png", "embedding_pca.png"):
        w, h = _png(run / name)
        assert w > 300 and h > 200, name
    assert not (run / "embedding_tsne.png").exists()  # t-SNE only when asked (log.tsne)
    assert not list(run.glob(".*.tmp"))
    html = (run / "report.html").read_text()
    assert all(f'src="{n}"' in html for n in ("curves.png", "confusion_test.png")) and "test_acc" in html
    # The confusion matrices count every image of their split once; the test one agrees with the summary.
    names, train_m = read_confusion(run / "confusion_train.csv")
    _, test_m = read_confusion(run / "confusion_test.csv")
    assert names == [str(i) for i in range(10)]
    assert sum(map(sum, train_m)) == 1257 and sum(map(sum, test_m)) == 360
    assert sum(test_m[i][i] for i in range(10)) / 360 == pytest.approx(summary(run)["test_acc"], abs=1e-6)
    emb = load_file(str(run / "embeddings.safetensors"))
    assert emb["train/features"].shape == (1257, 84) and emb["test/features"].shape == (360, 84)  # LeNet's 84-d layer
    assert emb["test/labels"].bincount().tolist() == [sum(r) for r in test_m]


def test_report_cli_redraws_with_tsne_and_chosen_classes(demo_single, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(demo_single, run, ignore=shutil.ignore_patterns("checkpoints", "tb"))
    (run / "embedding_pca.png").unlink()
    proc = report(run, "--tsne", "--classes", "0,3,5")
    assert proc.returncode == 0, proc.stderr
    assert "wrote 5 image(s)" in proc.stdout
    _png(run / "embedding_pca.png")
    _png(run / "embedding_tsne.png")


def test_test_every_epoch_and_stages_show_in_the_curves(tmp_path):
    run = tmp_path / "run"
    ok(train([*SHORT, f"run.dir={run}", "log.test_every_epoch=true", "log.embed_max=100"]))
    rows = [r for r in metrics(run) if r["kind"] == "epoch"]
    assert len(rows) == 2 and all(0 <= r["test_acc"] <= 1 and r["test_loss"] > 0 for r in rows)
    assert rows[-1]["test_acc"] == pytest.approx(summary(run)["test_acc"])  # same weights, same split
    emb = load_file(str(run / "embeddings.safetensors"))
    assert emb["train/features"].shape[0] == 100 and emb["test/features"].shape[0] == 100  # a seeded sample
    _png(run / "curves.png")


def test_plots_can_be_turned_off(tmp_path):
    run = tmp_path / "run"
    ok(train([*SHORT, "train.epochs=1", f"run.dir={run}", "log.plots=false"]))
    assert not list(run.glob("*.png")) and not (run / "embeddings.safetensors").exists()
    assert (run / "confusion_test.csv").is_file()


def test_compare_puts_several_runs_in_one_plot_and_table(tmp_path):
    sweep = tmp_path / "sweep"
    for opt, lr in (("sgd", 0.05), ("adam", 0.003)):
        ok(train([*SHORT, "train.epochs=1", f"run.dir={sweep / opt}", f"optim.name={opt}", f"optim.lr={lr}",
                  "log.plots=false"]))
    proc = report(sweep)
    assert proc.returncode == 0, proc.stderr
    _png(sweep / "compare" / "compare.png")
    table = (sweep / "compare" / "compare.md").read_text().splitlines()
    assert len(table) == 4  # header, rule, two runs
    assert any("optim.name=adam" in r and "optim.lr=0.003" in r for r in table)
    assert (sweep / "compare" / "compare.csv").read_text().count("\n") == 3


def test_report_errors_are_one_line(tmp_path):
    for args, expected in (([tmp_path / "nope"], "no such directory"),
                           ([tmp_path], "no run directories")):
        proc = report(*args)
        assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
        assert expected in proc.stderr
    bad = tmp_path / "run"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text("")
    (bad / "confusion_test.csv").write_text("not,a\nmatrix")
    proc = report(bad, "--classes", "a,b")
    assert proc.returncode == 2 and "--classes: expected comma-separated integers" in proc.stderr


def test_ddp_run_writes_the_plots_once(tmp_path):
    run = tmp_path / "run"
    ok(launch([*SHORT, "train.epochs=1", f"run.dir={run}", "log.embed_max=50"]))
    emb = load_file(str(run / "embeddings.safetensors"))
    assert emb["train/features"].shape == (50, 84)
    names, m = read_confusion(run / "confusion_train.csv")
    assert sum(map(sum, m)) == 1257  # gathered over both ranks, padding dropped
    _png(run / "confusion_train.png")


def test_pca_2d_matches_scikit_learn_up_to_sign():
    """The run's embedding plot projects with NumPy's SVD (start-up: no scikit-learn import);
    the axes are scikit-learn's PCA axes, each up to its sign, and the sign is fixed."""
    import numpy as np
    from sklearn.decomposition import PCA

    from toolkit.report import pca_2d

    f = np.random.RandomState(0).randn(60, 12) * np.linspace(3, 0.1, 12)
    ours, ref = pca_2d(f), PCA(n_components=2).fit_transform(f)
    assert np.allclose(np.abs(ours), np.abs(ref))
    assert np.allclose(pca_2d(-f), -pca_2d(f))  # same axes, sign fixed by the loadings
