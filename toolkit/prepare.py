"""Decode an image folder once into uint8 arrays that the `prepared` dataset loads with no per-image work.

    python -m toolkit.prepare --root /data/e4 --image-size 112 --out /data/e4_112
    python -m toolkit.prepare --root /data/e4 --image-size 112 --out /data/e4_112 --splits train val test extra --workers 4
    python -m toolkit.train --config configs/folder35_base_cnn.yaml data.name=prepared data.root=/data/e4_112
    toolkit-prepare --root /data/e4 --image-size 112 --out /data/e4_112   # the console command, from any directory

Input: the layout `imagefolder` reads, `ROOT/<split>/<class>/<image>` (toolkit/data/imagefolder.py
says which files count and in which order). `--splits` defaults to every visible folder in ROOT
(train, val, test first); class names are the class folders of the first split named, and a
class folder in another split that is not among them is an error, as in `imagefolder`.

Per image: exactly `imagefolder`'s pipeline (`load_resized`: shorter side to N, centre crop,
RGB), so a prepared set holds the pixels the folder dataset would feed the model. Every image
is first checked like `imagefolder` checks it when it builds (`check_image`: truncated or
corrupt files, decompression bombs); any bad file stops the command with one line naming the
first in path order, before anything is written. Decoding runs on a thread pool (Pillow,
libjpeg-turbo, libpng and the resize kernel release the GIL), one torch thread per worker.

Output, OUT/:
    manifest.json          format, version, image size, class names, ImageNet mean/std, the
                           source root, per split: size, file, byte count, the source files
                           (relative to ROOT, in array order)
    <split>.safetensors    labels (N,) int64, images (N, 3, S, S) uint8, streamed in blocks,
                           so memory stays at one block whatever the split's size

Atomic: everything is written to a hidden `.OUT.partial` beside OUT and renamed into place
when complete, so an interrupted run never leaves an OUT that looks complete (the partial
folder is removed on the way out). An existing OUT is refused unless `--force`, and even then
only if it is a prepared folder (its manifest says so) or empty. The prepared copy does not
follow later edits of ROOT: prepare again.

One writer per OUT: the partial folder is this command's run directory, locked as training locks
its own (toolkit.rundir.run_lock) before anything is checked or written, so a second prepare into
the same OUT stops with the holder's pid and touches nothing; a partial folder left by a killed
run is unlocked and is emptied and reused. The image side is bounded (`MAX_IMAGE_SIZE`), and a
block holds at most what fits in a share of memory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import struct
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from toolkit.clihelp import epilog
from toolkit.data.imagefolder import BATCH_MEMORY_SHARE, check_image_size, memory_bytes
from toolkit.data.prepared import FORMAT, MANIFEST, VERSION  # the reader owns the format
from toolkit.errors import ConfigError, ToolkitError
from toolkit.rundir import LOCK, replace_dir, run_lock, write_atomic, write_atomic_json

BLOCK = 256  # images decoded and written per block: (256, 3, 224, 224) uint8 is 37 MiB


def block_size(image_size: int, memory: int) -> int:
    """Images per block: BLOCK, or fewer where BLOCK images of this size would take more than
    BATCH_MEMORY_SHARE of memory (a block is held as decoded uint8 and again as one stacked array)."""
    per_image = 2 * 3 * image_size * image_size
    return max(1, min(BLOCK, int(BATCH_MEMORY_SHARE * memory) // per_image)) if memory else BLOCK


def _reword(e: ConfigError) -> ConfigError:
    """imagefolder's scan errors name `data.root`; here the folder is --root."""
    return ConfigError(str(e).replace("config: data.root: ", "--root: ", 1))


def scan(root: Path, splits: Optional[Sequence[str]], out: Optional[Path] = None
         ) -> Tuple[List[str], Dict[str, Tuple[List[str], List[int]]]]:
    """-> class names, {split: (paths, labels)} in `imagefolder`'s order."""
    from toolkit.data.imagefolder import scan_split
    from toolkit.data.images import visible_dirs

    if not root.is_dir():
        raise ConfigError(f"--root: {root} not found (expected {root}/<split>/<class>/<image>)")
    present = visible_dirs(root)
    if splits is None:
        skip = out.resolve() if out is not None else None
        present = [s for s in present if (root / s).resolve() != skip]
        splits = [s for s in ("train", "val", "test") if s in present] + \
                 [s for s in present if s not in ("train", "val", "test")]
        if not splits:
            raise ConfigError(f"--root: no split folders in {root} (expected {root}/train/<class>/<image>, val/, test/)")
    splits = list(splits)
    for s in splits:
        if not s or s in (".", "..") or "/" in s or "\\" in s:
            raise ConfigError(f"--splits: {s!r} is not a split folder name")
        if not (root / s).is_dir():
            raise ConfigError(f"--splits: {root / s} not found (splits here: {', '.join(present) or 'none'})")
    dupes = sorted({s for s in splits if splits.count(s) > 1})
    if dupes:
        raise ConfigError(f"--splits: {', '.join(dupes)} listed twice")
    first = root / splits[0]
    class_names = visible_dirs(first)
    if not class_names:
        raise ConfigError(f"--root: no class folders in {first} (expected {first}/<class>/<image>)")
    try:
        parts = {s: scan_split(root / s, class_names, first) for s in splits}
    except ConfigError as e:
        raise _reword(e) from None
    return class_names, parts


# ------------------------------------------------------------------------------------------
# safetensors, streamed


def _header(n: int, image_size: int, metadata: Dict[str, str]) -> bytes:
    """The safetensors header for labels (n,) int64 then images (n, 3, S, S) uint8. Labels go
    first so both tensors start 8-byte aligned (safetensors' own writer orders by alignment)."""
    label_bytes, image_bytes = 8 * n, n * 3 * image_size * image_size
    header = {"__metadata__": metadata,
              "labels": {"dtype": "I64", "shape": [n], "data_offsets": [0, label_bytes]},
              "images": {"dtype": "U8", "shape": [n, 3, image_size, image_size],
                         "data_offsets": [label_bytes, label_bytes + image_bytes]}}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text


def write_split(path: Path, paths: Sequence[str], labels: Sequence[int], image_size: int,
                pool: ThreadPoolExecutor, metadata: Dict[str, str],
                advance: Callable[[int], None] = lambda n: None, block: int = BLOCK) -> int:
    """Decode `paths` in blocks of `block` on `pool` and stream them into one safetensors file; -> bytes."""
    from toolkit.data.images import load_resized

    def one(p: str) -> torch.Tensor:
        return load_resized(p, image_size)  # (3, S, S) uint8

    with open(path, "wb") as f:
        f.write(_header(len(paths), image_size, metadata))
        f.write(torch.tensor(list(labels), dtype=torch.int64).numpy().astype("<i8").tobytes())
        for start in range(0, len(paths), block):
            some = paths[start:start + block]
            images = torch.stack(list(pool.map(one, some)))  # (b, 3, S, S) uint8
            f.write(images.numpy().tobytes())
            advance(len(some))
        f.flush()
        os.fsync(f.fileno())
    return path.stat().st_size


# ------------------------------------------------------------------------------------------
# progress: a rich bar on a terminal, else a plain line every ~10%


class _Progress:
    def __init__(self, mode: str):
        self.mode = mode
        self._rich = None
        if mode == "auto":
            from rich.console import Console

            self.mode = "rich" if Console(stderr=True).is_terminal else "plain"

    def phase(self, name: str, total: int) -> Callable[[int], None]:
        t0, done, shown = time.perf_counter(), [0], [0]
        if self.mode == "rich":
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            if self._rich is None:
                self._rich = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[ips]} img/s"), TimeElapsedColumn(),
                                      TextColumn("eta"), TimeRemainingColumn(), console=Console(stderr=True))
                self._rich.start()
            task = self._rich.add_task(name, total=total, ips="-")

            def advance(n: int) -> None:
                done[0] += n
                self._rich.update(task, advance=n, ips=f"{done[0] / (time.perf_counter() - t0):,.0f}")
            return advance

        def advance(n: int) -> None:
            done[0] += n
            if self.mode == "plain" and (done[0] - shown[0] >= max(1, total // 10) or done[0] == total):
                shown[0] = done[0]
                rate = done[0] / max(time.perf_counter() - t0, 1e-9)
                print(f"prepare: {name} {done[0]}/{total} ({done[0] / total:.0%}) {rate:,.0f} img/s",
                      file=sys.stderr, flush=True)
        return advance

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()


# ------------------------------------------------------------------------------------------
# the command


def _is_replaceable(out: Path) -> bool:
    """--force replaces only what this command wrote (or an empty folder), never a random folder."""
    if out.is_dir() and not any(out.iterdir()):
        return True
    try:
        return json.loads((out / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _check_out(out: Path, force: bool) -> None:
    if out.exists() or out.is_symlink():
        if not force:
            raise ConfigError(f"--out: {out} exists; pass --force to replace it")
        if not _is_replaceable(out):
            raise ConfigError(f"--out: {out} exists and is not a prepared folder (no {MANIFEST} written by "
                              "toolkit.prepare); refusing to replace it, even with --force")


class _Partial:
    """The locked `.OUT.partial` folder: removed on the way out unless it has become OUT (then
    the name may already be another prepare's, which must not be touched)."""

    def __init__(self, path: Path):
        self.path, self.moved = path, False

    def remove(self) -> None:
        if not self.moved:
            shutil.rmtree(self.path, ignore_errors=True)


def _staging(out: Path, stack: contextlib.ExitStack) -> _Partial:
    """Create and lock `.OUT.partial` beside OUT (removed on the way out, however this ends).
    Another prepare into OUT holds it: one line with its pid, and nothing of its is touched."""
    tmp = out.parent / f".{out.name}.partial"
    if tmp.is_symlink() or (tmp.exists() and not tmp.is_dir()):  # not ours: never emptied
        raise ConfigError(f"--out: {tmp} exists and is not a folder this command made; remove it or choose "
                          "another --out")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out: cannot create {tmp}: {e.strerror}") from None
    try:
        stack.enter_context(run_lock(tmp))
    except ConfigError as e:
        raise ConfigError(str(e).replace("config: run.dir: ", "--out: ", 1).replace("choose another run.dir",
                                                                                    "choose another --out")) from None
    partial = _Partial(tmp)
    stack.callback(partial.remove)  # ours from here on: a failure leaves nothing
    for p in tmp.iterdir():  # what a killed run left (its lock is free, so it is gone): ours to remove
        if p.name == LOCK:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    return partial


def prepare(root: str, image_size: int, out: str, splits: Optional[Sequence[str]] = None,
            workers: Optional[int] = None, force: bool = False, progress: str = "none") -> dict:
    """Write OUT (see the module docstring); returns the manifest."""
    with contextlib.ExitStack() as stack:
        return _prepare(root, image_size, out, splits, workers, force, progress, stack)


def _prepare(root: str, image_size: int, out: str, splits: Optional[Sequence[str]], workers: Optional[int],
             force: bool, progress: str, stack: contextlib.ExitStack) -> dict:
    from PIL import Image

    from toolkit.data.images import IMAGENET_MEAN, IMAGENET_STD, check_image, describe_bad_images

    check_image_size(image_size, "--image-size")
    block = block_size(image_size, memory_bytes())
    workers = workers or os.cpu_count() or 1
    if workers < 1:
        raise ConfigError(f"--workers: {workers} is not a positive integer")
    root_path, out_path = Path(root), Path(out)
    _check_out(out_path, force)
    class_names, parts = scan(root_path, splits, out_path)
    every = list(dict.fromkeys(p for paths, _ in parts.values() for p in paths))
    partial = _staging(out_path, stack)
    tmp = partial.path
    _check_out(out_path, force)  # again, under the lock: another prepare may have finished meanwhile
    bar = _Progress(progress)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the pool is the parallelism; intra-op threads would oversubscribe
    try:
        with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=workers) as pool:
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # set here: the threads see it
            advance = bar.phase("check", len(every))
            reasons = []
            for start in range(0, len(every), BLOCK):
                reasons += list(pool.map(check_image, every[start:start + BLOCK]))
                advance(len(every[start:start + BLOCK]))
            bad = [(p, r) for p, r in zip(every, reasons) if r is not None]
            if bad:
                raise ConfigError(f"--root: {describe_bad_images(bad)}; nothing written to {out_path}")
            manifest = {"format": FORMAT, "version": VERSION, "image_size": image_size,
                        "class_names": class_names, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                        "source_root": str(root_path.resolve()), "splits": {}}
            for name, (paths, labels) in parts.items():
                file = f"{name}.safetensors"
                meta = {"format": FORMAT, "version": str(VERSION), "split": name}
                shown = bar.phase(name, len(paths))
                write_atomic(tmp / file, lambda t: write_split(t, paths, labels, image_size, pool, meta, shown, block))
                size = (tmp / file).stat().st_size
                manifest["splits"][name] = {"size": len(paths), "file": file, "bytes": size,
                                            "files": [Path(p).relative_to(root_path).as_posix() for p in paths]}
        write_atomic_json(tmp / MANIFEST, manifest)  # written last: a folder without it is not complete
        _check_out(out_path, force)  # again: something may have appeared there meanwhile
        replace_dir(tmp, out_path, out_path.parent / f".{out_path.name}.old-{os.getpid()}")
        partial.moved = True
        # The lock file moved into OUT with the rest; the next prepare locks a new partial folder.
        (out_path / LOCK).unlink(missing_ok=True)
        return manifest
    finally:
        torch.set_num_threads(threads)
        bar.close()


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="toolkit.prepare", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=epilog(examples="\n".join(__doc__.split("\n")[2:6])))
    p.add_argument("--root", required=True, help="image folder: ROOT/<split>/<class>/<image>")
    p.add_argument("--image-size", type=int, required=True, help="S: shorter side to S, centre crop S x S")
    p.add_argument("--out", required=True, help="the prepared folder to write (data.root of data.name=prepared)")
    p.add_argument("--splits", nargs="+", help="split folders to prepare (default: all in ROOT; classes "
                                               "come from the first)")
    p.add_argument("--workers", type=int, default=None, help="decoding threads (default: CPU count)")
    p.add_argument("--force", action="store_true", help="replace an existing prepared OUT")
    p.add_argument("--progress", choices=["auto", "rich", "plain", "none"], default="auto")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    try:
        m = prepare(args.root, args.image_size, args.out, args.splits, args.workers, args.force, args.progress)
    except ToolkitError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted (nothing written)", file=sys.stderr, flush=True)
        return 130
    except OSError as e:  # disk full, permissions: one line, the partial folder is gone
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    sizes = ", ".join(f"{k} {v['size']:,}" for k, v in m["splits"].items())
    total = sum(v["size"] for v in m["splits"].values())
    mib = sum(v["bytes"] for v in m["splits"].values()) / 2**20
    print(f"prepared {total:,} images ({sizes}) at {m['image_size']} px, {len(m['class_names'])} classes: "
          f"{args.out} ({mib:,.1f} MiB) in {time.perf_counter() - t0:.1f} s")
    print(f"train on it with: data.name=prepared data.root={args.out}")
    return 0


if __name__ == "__main__":
    from toolkit.errors import leave  # sys.exit, minus the teardown of every module

    leave(main())
