"""Shared test builders, one import for every test module: `from helpers import ok, train, make_folder`.

tests/ is on sys.path: pytest inserts the rootdir conftest's folder (tests/conftest.py, default
"prepend" import mode), and pyproject.toml's `pythonpath = ["tests"]` says so explicitly.
No test module imports another test module or conftest; what two of them need lives here.

  cli.py     run the real CLIs (train, launch, run_module) and read a run directory
  images.py  image-folder trees, truncated files, decompression bombs
  cifar.py   CIFAR-10/100 batches in torchvision's pickled format
"""

from .cifar import CIFAR10_CLASSES, cifar_batch, dump_pickle, make_cifar10, make_cifar100
from .cli import (DEMO, ROOT, assert_same_weights, child_env, free_port, imported_by, launch, metrics, ok,
                  refused_in_process,
                  run_module,
                         summary, train, weights)
from .images import (CLASSES, KINDS, PER_CLASS, build_imagefolder, decode_folder_args, decoded_batches,
                            flat_image, make_decode_folder, make_folder, png_bomb, truncated_bmp, truncated_jpeg,
                            truncated_png)

__all__ = ["CIFAR10_CLASSES", "CLASSES", "DEMO", "KINDS", "PER_CLASS", "ROOT", "assert_same_weights",
           "build_imagefolder", "child_env", "cifar_batch", "decode_folder_args", "decoded_batches", "dump_pickle",
           "flat_image", "free_port", "imported_by", "launch", "make_cifar10", "make_cifar100", "make_decode_folder", "make_folder",
           "metrics", "ok", "png_bomb", "refused_in_process", "run_module", "summary", "train", "truncated_bmp", "truncated_jpeg",
           "truncated_png", "weights"]
