"""A local demo page for a trained run: drop an image, see its top classes and its nearest gallery images.

    python -m toolkit.demo RUN                                     # http://127.0.0.1:7860/, Ctrl-C stops it
    python -m toolkit.demo RUN --features RUN/features --port 8080 # also the 8 nearest gallery images
    python -m toolkit.demo RUN --weights last --neighbours 12 --host 0.0.0.0

The page (Gradio, `pip install -e '.[demo]'`) shows an image input (upload, drag and drop or paste)
with a row of examples from the run's test split; the top 5 classes with their probabilities;
with --features, the nearest gallery images as thumbnails titled with their cosine similarity,
class and path (E3); and the run's summary (model, dataset, weights, test accuracy, best epoch)
with its curves.png.

Nothing is computed differently from the CLIs. The classes come from toolkit.predict (`open_run`:
the run's weights, `--weights best|last` with predict's default rule, its class names and
preprocessing; an upload goes through predict's `ImageFiles` and `predict_batches`, with the
run's precision and test-time flip), so the page and `python -m toolkit.predict RUN img.png`
give the same numbers. The neighbours come from toolkit.retrieve: the upload is encoded by its
`QueryEncoder` (the features' own model, layer and preprocessing, as `retrieve search --query`
encodes a file) and searched with its exact `topk_search`; thumbnails are drawn by its
`GalleryImages` (a dataset's rows from the split itself). A digits gallery has no files: an
upload is encoded as the split's pictures were (32 px, the run's statistics).

Uploads are untrusted: a file that is not an image, is empty or truncated, or is a decompression
bomb (the toolkit's own decoder, toolkit.data.images, refuses them) or is smaller than
MIN_SIDE px gets a message on the page, and the server goes on serving. A RUN that is not a
finished training run, or a --features directory that is not a complete extraction, is one
`error:` line and exit 2 before any server starts.

Where it listens: 127.0.0.1 unless --host says otherwise; never a public share link; Gradio's
analytics, monitoring page and MCP server are off. Nothing is written into RUN: examples, uploads
and Gradio's cache live in a temporary folder that is removed when the server stops. The
gallery's features stay in memory while it serves (rows x dim x 4 bytes; `retrieve search`
streams them instead); Gradio's queue answers one upload at a time. Exit codes: 1 runtime
failure, 2 bad input (nothing served), 130 stopped by Ctrl-C and 143 by SIGTERM (no traceback).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from toolkit.errors import ConfigError, ToolkitError

DEMO_EXTRA = "pip install -e '.[demo]'"
TOP_CLASSES = 5  # classes shown with their probabilities (fewer when the run has fewer)
MIN_SIDE = 8  # px: the smallest images the toolkit trains on (sklearn's digits) are 8x8; below
#               that an upload is a few flat pixels blown up to the run's size, and the page says so
#               rather than show confident-looking probabilities for it
MAX_EXAMPLES = 10  # example images under the input: one per class, first classes first
MAX_UPLOAD = "25mb"  # Gradio refuses larger uploads before they reach the toolkit's decoder
THUMB_PX = 160  # gallery thumbnails: larger images are shrunk to this side, smaller ones enlarged
SEARCH_CHUNK = 65536  # gallery rows per matrix product in the exact search (memory: 1 x chunk scores)
CURVES = "curves.png"  # written by training (log.plots) and `python -m toolkit.report RUN`
CLOSE_WAIT_S = 10.0  # after Ctrl-C/SIGTERM, how long the server's threads get to end before they are left
IDLE = "Drop an image here (or pick an example) to classify it."
# Small images (digits: 32 px) fill the input box with their pixels sharp, rather than sit in its middle.
# Neighbours' captions wrap rather than end in "..." (similarity, class and path are all wanted).
CSS = ("#query img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }\n"
       "#neighbours .caption-label { white-space: normal; overflow-wrap: anywhere; }")


class UploadRefused(ValueError):
    """An upload the page cannot use; the message is shown on the page as it is."""


# ------------------------------------------------------------------------------------------
# classes: toolkit.predict's code, loaded once


@dataclass
class Classifier:
    """A finished run loaded by toolkit.predict, ready for one image at a time."""

    run: Any  # toolkit.predict.LoadedRun
    device: Any  # torch.device
    precision: str  # "no" | "bf16" | "fp16": the run's, as predict chooses it
    notes: List[str] = field(default_factory=list)

    @classmethod
    def open(cls, run_dir: Path, weights: Optional[str]) -> "Classifier":
        """predict's checks (a finished run, intact weights, class names, sizes) or one ConfigError."""
        import torch

        from toolkit.predict import open_run, run_precision

        run = open_run(run_dir, weights)
        if run.preprocess.channels != 3:  # predict refuses image files for such runs, in the same words
            raise ConfigError(f"run {run.path}: trained on {run.preprocess.channels}-channel images; image files "
                              "are read as 3-channel RGB")
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        precision, note = run_precision(run, None, device.type == "cuda")
        run.model = run.model.to(device)
        if run.cfg.train.channels_last:
            run.model = run.model.to(memory_format=torch.channels_last)
        return cls(run, device, precision, [note] if note else [])

    def top(self, path: str, k: int) -> List[Tuple[str, float]]:
        """The image's k most likely classes [(class, probability)], as toolkit.predict computes
        them; UploadRefused with predict's reason where the file does not decode."""
        from toolkit.predict import ImageFiles, make_loader, predict_batches, to_rows

        source = ImageFiles([path], [-1], self.run.preprocess, self.run.classes)
        t = self.run.cfg.train
        part = predict_batches(self.run.model, make_loader(source, [[0]], 0), self.device, source.normalize, k,
                               self.precision, t.channels_last, str(t.tta))
        row = to_rows([part], source, self.run.classes)[0]
        if row["error"]:
            raise UploadRefused(row["error"])
        return row["topk"]


def check_side(path: str) -> None:
    """UploadRefused for an image under MIN_SIDE px on a side (read from the header of a file
    that has already decoded)."""
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
    if min(w, h) < MIN_SIDE:
        raise UploadRefused(f"the image is {w}x{h} px; the demo needs at least {MIN_SIDE} px on each side "
                            "(smaller, it is a few flat pixels enlarged to the model's input size)")


# ------------------------------------------------------------------------------------------
# neighbours: toolkit.retrieve's code over a complete features directory


@dataclass
class Gallery:
    """A complete features directory, held in memory (N x D float32) for repeated searches."""

    path: Path
    meta: Dict[str, Any]
    manifest: List[Dict[str, str]]
    features: Any  # (N, D) float32, L2-normalised
    encoder: Any  # toolkit.retrieve.QueryEncoder
    images: Any  # toolkit.retrieve.GalleryImages

    @classmethod
    def open(cls, features_dir: Path) -> "Gallery":
        """Every check retrieve makes (meta.json, markers, checksums, manifest) or one ConfigError;
        a dataset's split is rebuilt once here, so a dataset that changed is refused now."""
        import torch.nn.functional as F

        from toolkit.features import load_features, read_manifest
        from toolkit.retrieve import GalleryImages, QueryEncoder

        features_dir = Path(features_dir).absolute()
        loaded = load_features(features_dir)
        meta = loaded.meta
        if len(loaded.features) == 0:
            raise ConfigError(f"--features: {features_dir} holds no images (every one was bad: see bad_images.txt)")
        pre = meta.get("preprocess") or {}
        if pre.get("kind") == "dataset" and not {"image_size", "mean", "std"} <= set(pre):
            raise ConfigError(f"--features: {features_dir} does not record the image size and normalisation of its "
                              f"{pre.get('dataset')} images, so an upload cannot be encoded as they were")
        feats = loaded.features if meta.get("l2_normalize", True) else F.normalize(loaded.features, dim=1)
        manifest = read_manifest(features_dir, meta)
        encoder = QueryEncoder(features_dir, meta, what="--features", dataset_images=True)
        images = GalleryImages(features_dir, meta, manifest)
        images.row(0)  # a dataset's split is rebuilt and checked against the manifest here, not on a request
        return cls(features_dir, meta, manifest, feats, encoder, images)

    def nearest(self, path: str, k: int) -> List[Dict[str, Any]]:
        """The k gallery rows most similar to the image file: [{rank, row, cosine, class, path}]."""
        from toolkit.retrieve import chunks, topk_search

        try:
            q = self.encoder([path])  # (1, D), L2-normalised, as the gallery was extracted
        except ToolkitError as e:  # retrieve's "--query: cannot read image ..." line
            raise UploadRefused(str(e)) from None
        scores, rows = topk_search(q, chunks(self.features, SEARCH_CHUNK), k)  # (1, k') each
        return [{"rank": r, "row": row, "cosine": s, "class": self.manifest[row]["class"],
                 "path": self.manifest[row]["path"]}
                for r, (s, row) in enumerate(zip(scores[0].tolist(), rows[0].tolist()), 1)]

    def thumbnail(self, row: int):
        """Gallery row's picture as a PIL image about THUMB_PX on its longer side."""
        return thumbnail(self.images.row(row))


def thumbnail(img):
    """PIL image or (H, W, 3) uint8 array -> a PIL image about THUMB_PX on its longer side; small
    images (digits: 32 px) are enlarged with nearest neighbour so their pixels stay sharp. None
    (a gallery file that no longer reads) -> a grey square: its caption still names it."""
    import numpy as np
    from PIL import Image

    if img is None:
        return Image.new("RGB", (THUMB_PX, THUMB_PX), (128, 128, 128))
    im = Image.fromarray(np.asarray(img)) if not hasattr(img, "convert") else img.convert("RGB")
    scale = THUMB_PX / max(im.size)
    if scale < 1:
        im.thumbnail((THUMB_PX, THUMB_PX))
    elif scale >= 2:
        n = int(scale)
        im = im.resize((im.width * n, im.height * n), Image.NEAREST)
    return im


# ------------------------------------------------------------------------------------------
# one request


@dataclass
class Answer:
    """What the page shows for one upload: classes {class: p}, gallery [(image, caption)], status."""

    classes: Optional[Dict[str, float]]
    neighbours: Optional[List[Tuple[Any, str]]]
    status: str  # plain text: what happened, or why the upload cannot be used
    refused: bool = False

    def markdown(self) -> str:
        """The status line as the page shows it: the image's name or the refusal in bold."""
        head, sep, rest = self.status.partition(": ")
        return f"**{_md(head)}**{sep}{_md(rest)}" if sep else _md(self.status)


@dataclass
class Demo:
    """The page's work, without the page: `answer(path)` for an uploaded file."""

    classifier: Classifier
    gallery: Optional[Gallery]
    neighbours: int

    def answer(self, path: Optional[str], name: Optional[str] = None) -> Answer:
        """Classes and neighbours for the image file; a message instead of them for an upload
        that cannot be used (never raises for a bad file: the server goes on serving)."""
        if path is None:
            return Answer(None, None, IDLE)
        name = name or Path(path).name
        try:
            top = self.classifier.top(path, min(TOP_CLASSES, len(self.classifier.run.classes)))
            check_side(path)
            hits = self.gallery.nearest(path, self.neighbours) if self.gallery is not None else None
        except UploadRefused as e:
            return Answer(None, None, f"Cannot use {name}: {e}", refused=True)
        status = f"{name}: {top[0][0]} ({top[0][1]:.1%}), {self.classifier.run.weights} weights"
        gallery = None
        if hits is not None:
            gallery = [(self.gallery.thumbnail(h["row"]), f"{h['cosine']:.3f} {h['class']} {h['path']}")
                       for h in hits]
            status += f"; the {len(hits)} nearest of {len(self.gallery.manifest)} gallery images below"
        return Answer({c: p for c, p in top}, gallery, status)


def _md(text: str) -> str:
    """Text shown literally within a Markdown line (a file named `__init__.png` is not bold)."""
    return "".join("\\" + ch if ch in "\\`*_[]<>|~" else ch for ch in text)


# ------------------------------------------------------------------------------------------
# what the page shows besides: the run's facts, its curves, examples


def read_summary(run_dir: Path) -> Dict[str, Any]:
    import json

    from toolkit.rundir import SUMMARY

    try:
        found = json.loads((run_dir / SUMMARY).read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def tested_accuracy(summary: Dict[str, Any], weights: str) -> Optional[float]:
    """The test accuracy of the weights the page uses, where the run tested them (summary.json:
    test_acc is `tested_weights`'s; test_acc_best the best's when both were tested)."""
    if summary.get("tested_weights", "last") == weights:
        return summary.get("test_acc")
    return summary.get("test_acc_best") if weights == "best" else None


def run_facts(classifier: Classifier, summary: Dict[str, Any], gallery: Optional[Gallery]) -> str:
    """The Markdown above the input: model, dataset, weights, test accuracy, best epoch, gallery."""
    run = classifier.run
    params = sum(p.numel() for p in run.model.parameters())
    acc = tested_accuracy(summary, run.weights)
    tested = f"{acc:.2%}" if isinstance(acc, float) else "not measured for these weights"
    if isinstance(acc, float) and summary.get("num_test_samples"):
        tested += f" on {summary['num_test_samples']} images"
    lines = [f"**Run** `{run.path}`",
             f"**Model** {run.cfg.model.name}, {params:,} parameters; **dataset** {run.cfg.data.name}, "
             f"{len(run.classes)} classes",
             f"**Weights** {run.weights} (`{run.weights_path.name}`); **test accuracy** {tested}"]
    if summary.get("best_epoch") is not None:
        best_val = summary.get("best_val_acc")
        lines.append(f"**Best epoch** {summary['best_epoch']} of {summary.get('epochs', '?')} (by "
                     f"{summary.get('monitor', 'val_acc')}"
                     + (f"; best validation accuracy {best_val:.2%})" if isinstance(best_val, float) else ")"))
    if gallery is not None:
        m = gallery.meta.get("model") or {}
        lines.append(f"**Gallery** `{gallery.path}`: {len(gallery.manifest)} images, {gallery.meta.get('dim')}-d "
                     f"features (layer {gallery.meta.get('layer')}) of {m.get('name', '?')}")
    return "  \n".join(lines)


def load_curves(run_dir: Path):
    """RUN/curves.png as a PIL image (shown by the page from Gradio's cache, not served from RUN), or None."""
    from toolkit.data.images import load_rgb

    try:
        return load_rgb(str(run_dir / CURVES))
    except Exception:  # missing (log.plots=false) or unreadable: the page says how to draw it
        return None


def example_images(classifier: Classifier, gallery: Optional[Gallery], out: Path) -> Tuple[List[str], List[str]]:
    """-> (up to MAX_EXAMPLES image files, notes): one per class from the run's test split (its
    files, or PNGs written to OUT of a dataset's pictures as the model saw them), else from a
    gallery of image files."""
    try:
        return _split_examples(classifier, out), []
    except ConfigError as e:
        note = f"no examples from the run's test split ({e})"
    if gallery is not None and gallery.meta.get("preprocess", {}).get("kind") != "dataset":
        return _first_per_class([(r["path"], r["class"]) for r in gallery.manifest]), [note + "; from the gallery"]
    return [], [note]


def _split_examples(classifier: Classifier, out: Path) -> List[str]:
    from PIL import Image

    from toolkit.predict import display_image, split_source

    run = classifier.run
    source = split_source(run.cfg, "test", run.classes, run.preprocess)  # refused where the data changed
    picks = _first_per_class([(i, run.classes[int(y)]) for i, y in enumerate(source.labels.tolist())])
    files = []
    for i in picks:
        path = source.path(i)
        if not Path(path).is_file():  # a dataset's picture: (3, S, S) uint8, the normalisation undone
            x = display_image(source, i, run.preprocess)
            out.mkdir(parents=True, exist_ok=True)
            path = str(out / f"{run.classes[int(source.labels[i])]}_{i}.png")
            Image.fromarray(x.permute(1, 2, 0).numpy()).save(path)
        files.append(path)
    return files


def _first_per_class(items: Sequence[Tuple[Any, str]]) -> List[Any]:
    """The first item of each class, in the order the classes first appear, at most MAX_EXAMPLES."""
    seen: Dict[str, Any] = {}
    for item, cls in items:
        if cls not in seen:
            seen[cls] = item
            if len(seen) == MAX_EXAMPLES:
                break
    return list(seen.values())


# ------------------------------------------------------------------------------------------
# the page


def build_page(demo: Demo, facts: str, curves, examples: List[str]):
    """The Gradio Blocks of the page. Element ids (facts, query, examples, status, labels,
    neighbours, curves) are what tests/test_demo.py drives."""
    import gradio as gr

    def on_image(payload):
        # preprocess=False below: the upload reaches the toolkit's decoder untouched (Gradio's
        # own Image preprocessing opens it with Pillow first and turns a bad file into a bare
        # "Error" toast). payload: the upload's FileData as a dict, its file in Gradio's cache.
        path = payload.get("path") if isinstance(payload, dict) else None
        name = payload.get("orig_name") if isinstance(payload, dict) else None
        if payload is not None and path is None:
            a = Answer(None, None, "Cannot use this image: only uploaded files are read (drop or choose a file)", True)
        else:
            a = demo.answer(path, name)
        return a.classes, a.neighbours, a.markdown()

    name = f"{demo.classifier.run.cfg.run.name} ({demo.classifier.run.path.name})"
    with gr.Blocks(title=f"toolkit demo: {name}", analytics_enabled=False) as page:
        gr.Markdown(f"## {_md(name)}")
        gr.Markdown(facts, elem_id="facts")
        with gr.Row():
            with gr.Column(scale=1):
                query = gr.Image(type="filepath", sources=["upload", "clipboard"], label="Image", elem_id="query",
                                 height=320)
                if examples:
                    gr.Examples(examples=[[p] for p in examples], inputs=[query], cache_examples=False,
                                examples_per_page=MAX_EXAMPLES, label="Examples", elem_id="examples")
            with gr.Column(scale=1):
                status = gr.Markdown(Answer(None, None, IDLE).markdown(), elem_id="status")
                labels = gr.Label(num_top_classes=TOP_CLASSES, label="Top classes", elem_id="labels")
                neighbours = gr.Gallery(label="Nearest gallery images (cosine, class, path)", elem_id="neighbours",
                                        columns=3, object_fit="contain", format="png",
                                        visible=demo.gallery is not None)
        if curves is not None:
            gr.Image(value=curves, label=CURVES, interactive=False, elem_id="curves", buttons=[])
        else:
            gr.Markdown(f"No {CURVES} in the run (log.plots=false); `python -m toolkit.report RUN` draws it.",
                        elem_id="curves")
        query.change(on_image, inputs=[query], outputs=[labels, neighbours, status], preprocess=False,
                     api_visibility="private")
    return page


class _Terminated(Exception):
    """SIGTERM while serving."""


def serve(page, host: str, port: Optional[int]) -> Tuple[int, bool]:
    """Start the server, print its URL, wait for Ctrl-C or SIGTERM, stop it -> (130 or 143,
    whether the server's threads ended within CLOSE_WAIT_S)."""
    try:
        _app, url, _share = page.launch(
            server_name=host, server_port=port, share=False, prevent_thread_lock=True, quiet=True,
            show_error=False, inbrowser=False, max_file_size=MAX_UPLOAD, ssr_mode=False, mcp_server=False,
            enable_monitoring=False, pwa=False, footer_links=[], css=CSS)
    except OSError as e:  # Gradio: "Cannot find empty port in range: 7911-7911. You can specify ..."
        why = str(e).split(". ")[0] if str(e) else type(e).__name__
        raise ConfigError(f"--port: cannot listen on {host}:{port or 'the default ports 7860-7959'} ({why}); "
                          "choose another --port") from None

    def on_term(_signum, _frame):
        raise _Terminated

    old = signal.signal(signal.SIGTERM, on_term)
    # Ctrl-C stops the page even where the process started with SIGINT ignored (a background
    # job of a non-interactive shell), in which case Python installs no KeyboardInterrupt of its own.
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    print(f"demo: serving on {url} (Ctrl-C stops it)", flush=True)
    code = 0
    try:
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:
        code = 130
    except _Terminated:
        code = 143
    finally:
        signal.signal(signal.SIGTERM, old)
        signal.signal(signal.SIGINT, old_int)
        # Gradio's close joins its server and file-serving threads; should one of them not end,
        # Ctrl-C still returns (a safety net: no such hang has been seen).
        closer = threading.Thread(target=page.close, name="demo-close", daemon=True)
        closer.start()
        closer.join(CLOSE_WAIT_S)
    stopped = not closer.is_alive()
    print("demo: stopped" if stopped else f"demo: stopped (the server's threads did not end within "
          f"{CLOSE_WAIT_S:.0f} s and are left behind)", file=sys.stderr, flush=True)
    return code, stopped


# ------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    from toolkit.clihelp import epilog

    p = argparse.ArgumentParser(prog="python -m toolkit.demo", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=epilog(examples="\n".join(__doc__.split("\n")[2:5]), docs="docs/demo.md"))
    p.add_argument("run", type=Path, help="a finished training run's directory")
    p.add_argument("--features", type=Path, help="a complete features directory (python -m toolkit.extract): "
                   "show the nearest gallery images")
    p.add_argument("--weights", choices=("best", "last"),
                   help="best (model_best.safetensors) or last (model.safetensors); default: best where it exists")
    p.add_argument("--neighbours", type=int, default=8, help="gallery images shown with --features (default 8)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, help="port (default: the first free one from 7860)")
    return p.parse_args(argv)


def check_gradio() -> None:
    """Gradio is an extra: without it, one line naming the install command (before any work)."""
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        raise ConfigError(f"the demo page needs Gradio, which is not installed: {DEMO_EXTRA} (in the repository)")


def gradio_environment(tmp: Path) -> None:
    """Before Gradio is imported: analytics off, and its cache (uploads, thumbnails) in TMP,
    which goes when the server stops, unless the user chose a folder for it."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("GRADIO_TEMP_DIR", str(tmp / "gradio"))


def cli(args: argparse.Namespace) -> int:
    """Every check, then the page until it is stopped."""
    check_gradio()
    if args.neighbours < 1:
        raise ConfigError(f"--neighbours: {args.neighbours}; must be >= 1")
    if args.port is not None and not 0 < args.port < 65536:
        raise ConfigError(f"--port: {args.port}; must be in 1..65535")
    classifier = Classifier.open(args.run, args.weights)
    gallery = Gallery.open(args.features) if args.features is not None else None
    tmp = Path(tempfile.mkdtemp(prefix="toolkit-demo-"))
    try:
        examples, notes = example_images(classifier, gallery, tmp)
        for line in classifier.notes + notes:
            print(f"demo: note: {line}", flush=True)
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"demo: note: listening on {args.host}: anyone who can reach this machine there can use the page",
                  flush=True)
        gradio_environment(tmp)
        demo = Demo(classifier, gallery, args.neighbours)
        page = build_page(demo, run_facts(classifier, read_summary(classifier.run.path), gallery),
                          load_curves(classifier.run.path), examples)
        code, stopped = serve(page, args.host, args.port)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not stopped:  # the threads that did not end would hold up the interpreter's exit as well
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    from toolkit.errors import run_cli

    code, result = run_cli(lambda: cli(args))
    return code or result or 0


if __name__ == "__main__":
    sys.exit(main())
