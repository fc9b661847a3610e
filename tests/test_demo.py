"""The demo page (toolkit/demo.py): its refusals, its answers to uploads, and the real page in a browser.

    pytest tests/test_demo.py

Refusals run `toolkit.demo.main` in this process (nothing starts a server). The answers to
uploads are checked against toolkit.predict and toolkit.retrieve on the session's trained digits
run (`demo_single`) and its extracted test-split features. The page itself runs once per module
(`python -m toolkit.demo RUN --features F` on a free loopback port) and is driven in Debian's
headless Chromium through Selenium (tests/helpers/browser.py installs it where it is missing);
those tests skip only where no browser can be installed.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from PIL import Image

from helpers import (CLASSES, DEMO, ROOT, child_env, free_port, make_folder, ok, png_bomb, refused_in_process,
                     run_module, train, truncated_png)
from helpers.browser import chromium, install_chromium
from toolkit.demo import main

# One worker for the module under `make test` (--dist loadgroup): the features and the server are
# module fixtures, built once rather than once per worker.
pytestmark = pytest.mark.xdist_group("demo")
NEIGHBOURS = 8  # the demo's default --neighbours


# ------------------------------------------------------------------------------------------
# refused before any server starts (no training, no Gradio import)


def test_a_folder_that_is_not_a_finished_run_is_one_line_and_exit_2(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    refused_in_process(capsys, main, [empty, "--port", free_port()], "not a training run", str(empty))
    unfinished = tmp_path / "unfinished"  # a run whose training never wrote its weights
    unfinished.mkdir()
    shutil.copy(DEMO, unfinished / "config.yaml")
    refused_in_process(capsys, main, [unfinished, "--port", free_port()], "not a finished training run")
    assert [p.name for p in unfinished.iterdir()] == ["config.yaml"]  # nothing written into RUN


def test_without_gradio_one_line_names_the_extra_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # what `import gradio` finds where it is not installed
    refused_in_process(capsys, main, [tmp_path], "Gradio", "pip install -e '.[demo]'")


# ------------------------------------------------------------------------------------------
# shared: the session's digits run, its features, digit PNGs and bad files


@pytest.fixture(scope="module")
def features(demo_single, tmp_path_factory) -> Path:
    """The demo run's test split through `python -m toolkit.extract` (configs/extract_digits.yaml:
    360 images, LeNet's 84-d features), written beside the run rather than into it."""
    out = tmp_path_factory.mktemp("demo-features") / "x"
    ok(run_module("toolkit.extract", ["--config", str(ROOT / "configs" / "extract_digits.yaml"),
                                      f"model.run={demo_single}", f"run.dir={out}"]))
    return out / "features"


def digit_png(features: Path, row: int, path: Path) -> tuple[Path, str, str]:
    """Gallery row ROW's picture (the digits test image, as toolkit.retrieve draws it) as a PNG
    -> (the file, its class, its manifest path)."""
    from toolkit.features import read_manifest, read_meta
    from toolkit.retrieve import GalleryImages

    meta = read_meta(features)
    manifest = read_manifest(features, meta)
    Image.fromarray(GalleryImages(features, meta, manifest).row(row)).save(path)
    return path, manifest[row]["class"], manifest[row]["path"]


def bad_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """{kind: (file, what the refusal says)}: the uploads the page must refuse."""
    folder.mkdir(parents=True, exist_ok=True)
    text = folder / "notes.png"
    text.write_text("not an image, whatever the name says")
    truncated_png(folder / "cut.png")
    (folder / "bomb.png").write_bytes(png_bomb(20000, 20000))  # 400 Mpx claimed, a few bytes on disk
    Image.new("RGB", (1, 1), (200, 10, 10)).save(folder / "dot.png")
    return {"text": (text, "not an image"), "truncated": (folder / "cut.png", "truncated"),
            "bomb": (folder / "bomb.png", "DecompressionBomb"), "1x1": (folder / "dot.png", "1x1 px")}


# ------------------------------------------------------------------------------------------
# the page's work without the page


@pytest.mark.slow
def test_answers_are_predict_and_retrieve_and_bad_uploads_get_a_message(demo_single, features, tmp_path):
    from toolkit.demo import Classifier, Demo, Gallery
    from toolkit.predict import predict

    demo = Demo(Classifier.open(demo_single, None), Gallery.open(features), NEIGHBOURS)
    png, cls, where = digit_png(features, 3, tmp_path / "digit.png")
    want = predict(demo_single, [png])[0]
    answer = demo.answer(str(png))
    assert not answer.refused and demo.classifier.run.weights == "best"  # the default where the run kept them
    assert list(answer.classes.items()) == want["topk"]  # the same classes and probabilities, in order
    captions = [caption for _, caption in answer.neighbours]
    assert len(captions) == NEIGHBOURS and captions[0] == f"1.000 {cls} {where}"  # the image itself comes first
    for kind, (path, says) in bad_files(tmp_path / "bad").items():
        refused = demo.answer(str(path), path.name)
        assert refused.refused and refused.classes is None and refused.neighbours is None, kind
        assert refused.status.startswith(f"Cannot use {path.name}: ") and says in refused.status, refused.status
    assert list(demo.answer(str(png)).classes.items()) == want["topk"]  # still answering after them


@pytest.mark.slow
def test_a_features_folder_that_is_not_complete_is_one_line_and_exit_2(demo_single, features, tmp_path, capsys):
    partial = tmp_path / "partial"
    shutil.copytree(features, partial)
    (partial / "meta.json").unlink()  # what an interrupted extraction leaves
    refused_in_process(capsys, main, [demo_single, "--features", partial], "no finished extraction")
    damaged = tmp_path / "damaged"
    shutil.copytree(features, damaged)
    shard = damaged / "shards" / "part-000001.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    refused_in_process(capsys, main, [demo_single, "--features", damaged], "part-000001", "damaged")


@pytest.mark.slow
def test_an_image_folder_run_shows_its_own_files_as_examples_and_neighbours(tmp_path):
    """A run trained on an image folder, with features of its test folder: examples are the
    test split's files, an upload is encoded as `retrieve search --query` encodes a file."""
    from toolkit.demo import Classifier, Demo, Gallery, example_images
    from toolkit.predict import predict

    root, run = make_folder(tmp_path / "data"), tmp_path / "run"
    ok(train(["--config", DEMO, "data.name=imagefolder", f"data.root={root}", "data.image_size=32",
              "data.batch_size=6", "train.epochs=1", "sched.milestones=[]", "log.plots=false",
              "log.tensorboard=false", "log.progress=plain", f"run.dir={run}"]))
    ok(run_module("toolkit.extract", ["data.name=folder", f"data.root={root / 'test'}", f"model.run={run}",
                                      f"run.dir={tmp_path / 'x'}"]))
    listing = sorted(p.name for p in run.iterdir())
    classifier, gallery = Classifier.open(run, None), Gallery.open(tmp_path / "x" / "features")
    examples, notes = example_images(classifier, gallery, tmp_path / "examples")
    assert not notes and len(examples) == len(CLASSES)  # one per class, the run's own test files
    assert all(Path(e).parent.parent == root / "test" for e in examples) and not (tmp_path / "examples").exists()
    query = examples[1]
    answer = Demo(classifier, gallery, 3).answer(query)
    assert list(answer.classes.items()) == predict(run, [query], topk=len(CLASSES))[0]["topk"]
    assert [c for _, c in answer.neighbours][0] == f"1.000 {Path(query).parent.name} {query}"
    assert sorted(p.name for p in run.iterdir()) == listing  # nothing written into RUN


# ------------------------------------------------------------------------------------------
# the page in a browser: one server and one browser for the module


@pytest.fixture(scope="module")
def server(demo_single, features, tmp_path_factory):
    """`python -m toolkit.demo RUN --features F --port P`, until its URL line; stopped at the end
    (test_ctrl_c_stops_the_page_cleanly stops it first and checks how)."""
    logs = tmp_path_factory.mktemp("demo-server")
    port = free_port()
    out, err = open(logs / "stdout", "w"), open(logs / "stderr", "w")
    proc = subprocess.Popen([sys.executable, "-m", "toolkit.demo", str(demo_single), "--features", str(features),
                             "--port", str(port)], cwd=ROOT, env=child_env(), stdout=out, stderr=err)
    deadline = time.monotonic() + 180
    while "demo: serving on " not in (logs / "stdout").read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the demo did not start (exit {proc.poll()}):\n{(logs / 'stderr').read_text()[-3000:]}")
        time.sleep(0.2)
    line = next(ln for ln in (logs / "stdout").read_text().splitlines() if ln.startswith("demo: serving on "))
    yield {"proc": proc, "url": line.split()[3], "port": port, "logs": logs}
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    out.close()
    err.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    why_not = install_chromium()
    if why_not:
        pytest.skip(f"no browser for the demo page: {why_not}")
    driver = chromium(tmp_path_factory.mktemp("chromium"))
    yield driver
    driver.quit()


def upload(driver, path: Path, timeout: float = 60) -> str:
    """Give the page's image input PATH, wait for the status to name it -> the status text.
    While Gradio still works on the event, its progress line ("processing | 0.2/0.1s") sits above
    the new text in the same box: only a status that starts with the file's answer is final."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def status_names_it(d):
        text = d.find_element(By.ID, "status").text
        return text if text.startswith((f"{path.name}: ", f"Cannot use {path.name}")) else False

    driver.find_element(By.CSS_SELECTOR, "#query input[type=file]").send_keys(str(path))
    return WebDriverWait(driver, timeout).until(status_names_it)


def shown_class(driver):
    """The top class the page's label shows, or None where it shows none."""
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.CSS_SELECTOR, "#labels [data-testid=label-output-value]")
    return found[0].text if found else None


def captions(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    return [c.text for c in driver.find_elements(By.CSS_SELECTOR, "#neighbours .caption-label")]


@pytest.mark.slow
def test_the_page_classifies_uploads_shows_neighbours_and_survives_bad_files(server, browser, demo_single, features,
                                                                           tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from toolkit.predict import predict

    browser.get(server["url"])
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#query input[type=file]"))
    facts = browser.find_element(By.ID, "facts").text
    assert "test accuracy" in facts and "lenet" in facts and "360 images" in facts, facts
    assert browser.find_elements(By.CSS_SELECTOR, "#curves img"), "curves.png is not on the page"

    examples = browser.find_elements(By.CSS_SELECTOR, "#examples img")
    assert len(examples) == 10  # one test image per digit
    name = examples[4].get_attribute("src").rsplit("/", 1)[-1]  # CLASS_INDEX.png
    examples[4].click()
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "status").text.startswith(f"{name}: "))
    assert shown_class(browser) is not None
    # a test image is in the gallery (the test split's features): it is its own nearest neighbour
    WebDriverWait(browser, 30).until(lambda d: captions(d)[:1] == [f"1.000 {name.split('_')[0]} digits:test:"
                                                                     f"{name.split('_')[1].split('.')[0]}"])

    first, cls, where = digit_png(features, 3, tmp_path / "first.png")
    status = upload(browser, first)
    want = predict(demo_single, [first])[0]
    assert shown_class(browser) == want["pred"] == cls, status
    WebDriverWait(browser, 30).until(lambda d: len(captions(d)) == NEIGHBOURS)
    assert captions(browser)[0] == f"1.000 {cls} {where}"  # the test image's own row first
    assert len(browser.find_elements(By.CSS_SELECTOR, "#neighbours img")) == NEIGHBOURS

    for kind, (path, says) in bad_files(tmp_path / "bad").items():
        status = upload(browser, path)
        assert status.startswith(f"Cannot use {path.name}") and says in status, (kind, status)
        assert shown_class(browser) is None and not captions(browser), kind  # the last image's answer is gone

    second, cls2, where2 = digit_png(features, 8, tmp_path / "second.png")
    assert cls2 != cls  # a different answer from the first, so a stale page cannot pass
    upload(browser, second)
    assert shown_class(browser) == predict(demo_single, [second])[0]["pred"] == cls2
    WebDriverWait(browser, 30).until(lambda d: captions(d)[:1] == [f"1.000 {cls2} {where2}"])
    shot = tmp_path / "demo.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000


@pytest.mark.slow
def test_the_page_listens_on_loopback_only_and_ctrl_c_stops_it_cleanly(server):
    psutil = pytest.importorskip("psutil")
    proc = server["proc"]
    assert proc.poll() is None, (server["logs"] / "stderr").read_text()[-3000:]
    sockets = [c.laddr for c in psutil.Process(proc.pid).net_connections(kind="inet")
               if c.status == psutil.CONN_LISTEN]
    assert (("127.0.0.1", server["port"]) in [(a.ip, a.port) for a in sockets]), sockets
    assert all(a.ip.startswith("127.") or a.ip == "::1" for a in sockets), f"listening beyond loopback: {sockets}"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    err = (server["logs"] / "stderr").read_text()
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "demo: stopped", err[-3000:]


def test_ctrl_c_does_not_wait_forever_on_a_server_thread_that_hangs(tmp_path):
    """serve() with a page whose close() never returns: Ctrl-C still ends with 130 and says what
    it left, within CLOSE_WAIT_S. Also run where SIGINT arrives ignored (a background job of a
    non-interactive shell, as CI may start the suite): serve() installs Python's handler itself."""
    code = textwrap.dedent("""
        import os, signal, threading, time
        from toolkit import demo
        demo.CLOSE_WAIT_S = 1.0

        class Page:
            def launch(self, **kw):
                threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
                return None, "http://127.0.0.1:1/", None
            def close(self):
                threading.Event().wait()   # never returns

        code, stopped = demo.serve(Page(), "127.0.0.1", 1)
        print(code, stopped, flush=True)
    """)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "130 False"
    assert "did not end within 1 s and are left behind" in proc.stderr
    assert time.monotonic() - start < 30
