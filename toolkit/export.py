"""Export a trained run's model to ONNX or TorchScript, with its preprocessing in a JSON beside it.

    python -m toolkit.export RUN --format onnx                  # RUN/export/model.onnx + preprocess.json
    python -m toolkit.export RUN --format torchscript --weights last --out served/
    pip install -e '.[export]'                                  # what --format onnx needs
    toolkit-export RUN --format onnx                            # the console command, from any directory

The model, weights (`--weights best|last`, default best where RUN/model_best.safetensors exists),
image size, channels, mean/std and class names come from RUN, as for `toolkit.predict`.
Written into --out (default RUN/export/): `model.onnx` (torch.onnx.export, the torch.export-based
exporter, input `images` (batch, C, S, S) float32 with a dynamic batch axis, output `logits`)
or `model.pt` (torch.jit.trace), and `preprocess.json`: what an image must go through before
the model (shorter side to image_size, centre crop, RGB, (x / 255 - mean) / std, channels
first), the class names in output order, the weights used and the check's result.

The check: the exported file is loaded back (onnxruntime; torch.jit.load) and run on seeded
random inputs of the run's shape, in batches of 1 and 3, beside the PyTorch model; the largest
absolute difference of the logits is printed. Above TOLERANCE x max(1, largest |logit|) the
export is an error and nothing is left behind: the model is written to a temp file beside its
final name and renamed only once it passed. Float32 on the CPU: the two runtimes order their
sums differently, which moves logits by ~1e-6 relative; 1e-4 leaves room for deep nets and
still catches a wrong op, a lost layer or a wrong weight, which move them by > 1e-2.

Exit codes: 0 done, 1 runtime failure, 2 bad input (not a finished run, missing package, an
existing --out file without --force, a failed check): one line, nothing written.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from toolkit.clihelp import epilog
from toolkit.errors import ConfigError
from toolkit.rundir import EXPORT

FORMATS = {"onnx": "model.onnx", "torchscript": "model.pt"}
PREPROCESS_JSON = "preprocess.json"
# What --format onnx imports: the exporter (onnxscript, onnx) and the runtime that checks it.
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
TOLERANCE = 1e-4  # relative to max(1, largest |logit|); see the module docstring
CHECK_BATCHES = (1, 3)  # the check's batch sizes: one image, and more than the export's example (2)
EXPORT_BATCH = 2  # the example batch: torch.export specialises a batch axis of size 1 to a constant


def check_packages(fmt: str) -> None:
    """One line naming what is missing, before anything is built or written."""
    if fmt != "onnx":
        return
    import importlib

    missing = []
    for name in ONNX_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ConfigError(f"--format onnx: needs {', '.join(ONNX_PACKAGES)}; missing {', '.join(missing)}: "
                          "pip install -e '.[export]' (or pip install " + " ".join(missing) + ")")


def check_inputs(channels: int, size: int, seed: int = 0) -> List[Any]:
    """Seeded normal inputs (B, C, S, S) float32, one per CHECK_BATCHES entry: the scale of
    normalised images, no files needed."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, channels, size, size, generator=g) for b in CHECK_BATCHES]


def export_onnx(model, example, path: Path) -> Callable:
    """Write `path`; -> run(x) with onnxruntime on the written file."""
    import numpy as np
    import onnxruntime
    import torch

    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.onnx.export(model, (example,), dynamo=True, input_names=["images"], output_names=["logits"],
                                dynamic_shapes=({0: batch},), verbose=False)
    program.save(str(path), external_data=False)  # one file: these models are far under ONNX's 2 GB limit
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(x):
        (logits,) = session.run(["logits"], {"images": np.ascontiguousarray(x.numpy())})
        return torch.from_numpy(logits)

    return run


def export_torchscript(model, example, path: Path) -> Callable:
    """Write `path` (torch.jit.trace: these nets have no data-dependent control flow);
    -> run(x) with the module loaded back from the file."""
    import warnings

    import torch

    with warnings.catch_warnings():  # torch 2.14 deprecates torch.jit (four FutureWarnings): said once, in main()
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        traced = torch.jit.trace(model, example)
        torch.jit.save(traced, str(path))
        loaded = torch.jit.load(str(path), map_location="cpu").eval()
    return lambda x: loaded(x)


EXPORTERS = {"onnx": export_onnx, "torchscript": export_torchscript}


def compare(model, run_exported: Callable, inputs: List[Any]) -> Dict[str, float]:
    """-> {"max_abs_diff", "max_abs_logit", "limit"}: the exported model against PyTorch."""
    import torch

    diff, scale = 0.0, 0.0
    with torch.inference_mode():
        for x in inputs:
            ref = model(x).float()  # (B, num_classes)
            got = run_exported(x).float()
            if got.shape != ref.shape:
                raise ConfigError(f"export check: the exported model gives {tuple(got.shape)} for a batch of "
                                  f"{len(x)}, PyTorch {tuple(ref.shape)}")
            diff = max(diff, (got - ref).abs().max().item())
            scale = max(scale, ref.abs().max().item())
    return {"max_abs_diff": diff, "max_abs_logit": scale, "limit": TOLERANCE * max(1.0, scale)}


def out_dir(run_dir: Path, out: Optional[Path], fmt: str, force: bool) -> Path:
    """The folder to write; an explicit one may not hold our files already unless --force
    (RUN/export/ is ours to replace)."""
    default = run_dir / EXPORT
    if out is None:
        return default
    out = out.absolute()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out: {out} is a file; name a folder")
    there = [n for n in (FORMATS[fmt], PREPROCESS_JSON) if (out / n).exists()]
    if there and not force and out != default:
        raise ConfigError(f"--out: {out} already holds {', '.join(there)}; pass --force to overwrite")
    return out


def preprocess_record(loaded, fmt: str, check: Dict[str, float]) -> Dict[str, Any]:
    """preprocess.json: everything a server needs to feed the exported model."""
    tta = str(loaded.cfg.train.tta)
    return {
        "format": fmt, "file": FORMATS[fmt],
        "input": {"name": "images", "shape": ["batch", loaded.preprocess.channels, loaded.preprocess.image_size,
                                              loaded.preprocess.image_size], "dtype": "float32"},
        "output": {"name": "logits", "shape": ["batch", len(loaded.classes)],
                   "note": "raw scores; softmax over axis 1 for probabilities"},
        "image_size": loaded.preprocess.image_size, "channels": loaded.preprocess.channels,
        "mean": loaded.preprocess.mean, "std": loaded.preprocess.std,
        "steps": ["decode as RGB", "resize the shorter side to image_size (bilinear, antialiased)",
                  "centre crop image_size x image_size", "x = (pixels / 255 - mean) / std per channel",
                  "channels first: (C, S, S)"],
        "class_names": loaded.classes,
        "model": loaded.cfg.model.name, "run": str(loaded.path), "weights": loaded.weights,
        "weights_file": loaded.weights_path.name,
        "tta": tta if tta == "none" else f"{tta}: the run evaluated the mean of each image's and its mirror "
                                         "image's logits; the exported model computes one image's",
        "check": {**check, "tolerance": TOLERANCE, "batches": list(CHECK_BATCHES)},
    }


def export(run: Path, fmt: str, weights: Optional[str] = None, out: Optional[Path] = None,
           force: bool = False) -> Dict[str, Any]:
    """Export, check, write; -> a summary. Every check that can refuse comes before any write."""
    import torch

    from toolkit.predict import open_run
    from toolkit.rundir import temp_path, write_atomic_json

    if fmt not in FORMATS:
        raise ConfigError(f"--format: {fmt!r}; choose one of: {', '.join(FORMATS)}")
    check_packages(fmt)
    loaded = open_run(run, weights)
    folder = out_dir(loaded.path, out, fmt, force)
    model = loaded.model.eval()
    pre = loaded.preprocess
    torch.manual_seed(0)
    example = torch.randn(EXPORT_BATCH, pre.channels, pre.image_size, pre.image_size)

    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / FORMATS[fmt]
    tmp = temp_path(final)
    try:
        run_exported = EXPORTERS[fmt](model, example, tmp)
        check = compare(model, run_exported, check_inputs(pre.channels, pre.image_size))
        if check["max_abs_diff"] > check["limit"]:
            raise ConfigError(f"export check: the {fmt} model differs from PyTorch by up to "
                              f"{check['max_abs_diff']:.3g} in the logits, over the tolerance {check['limit']:.3g} "
                              f"({TOLERANCE:g} x max(1, largest |logit| {check['max_abs_logit']:.3g}))")
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        if created:
            _remove_if_empty(folder)
        raise
    write_atomic_json(folder / PREPROCESS_JSON, preprocess_record(loaded, fmt, check))
    return {"model": str(final), "preprocess": str(folder / PREPROCESS_JSON), "format": fmt,
            "weights": loaded.weights, "weights_chosen": loaded.weights_chosen, **check}


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


# ------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="toolkit.export", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=epilog(examples="\n".join(__doc__.split("\n")[2:6])))
    p.add_argument("run", type=Path, help="a finished training run's directory")
    p.add_argument("--format", required=True, choices=sorted(FORMATS), help="onnx or torchscript")
    p.add_argument("--weights", choices=("best", "last"),
                   help="best (model_best.safetensors) or last (model.safetensors); default: best where it exists")
    p.add_argument("--out", type=Path, help="the folder to write (default RUN/export/)")
    p.add_argument("--force", action="store_true", help="overwrite the model and preprocess.json in --out")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    from toolkit.errors import run_cli

    code, s = run_cli(lambda: export(args.run, args.format, args.weights, args.out, args.force))
    if code:
        return code
    why = "" if s["weights_chosen"] else (
        " (default: the run kept model_best.safetensors)" if s["weights"] == "best" else
        " (default: the run has no model_best.safetensors)")
    print(f"export: {s['format']} model with weights {s['weights']}{why}; check: largest |difference| from "
          f"PyTorch {s['max_abs_diff']:.3g} in the logits (tolerance {s['limit']:.3g}), batches of "
          f"{' and '.join(map(str, CHECK_BATCHES))}")
    if s["format"] == "torchscript":
        print("export: note: torch 2.14 deprecates TorchScript (torch.jit) in favour of torch.export; "
              "--format onnx is the one to build on")
    print(f"wrote {s['model']}\nwrote {s['preprocess']}")
    return 0


if __name__ == "__main__":
    from toolkit.errors import leave  # sys.exit, minus the teardown of every module

    leave(main())
