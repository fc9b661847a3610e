"""Train a classifier from one config.

    accelerate launch toolkit/train.py --config configs/digits_lenet.yaml optim.lr=0.05
    accelerate launch --config_file launch/cpu_ddp.yaml toolkit/train.py --config ...
    python -m toolkit.train --config configs/digits_lenet.yaml train.epochs=3
    toolkit-train --config digits_lenet train.epochs=3          # the console command, from any directory

Overrides are `section.key=value`; see docs/quickstart.md for the sections. Exit codes:
0 done, 1 runtime failure, 2 bad config or path, 3 too many non-finite losses, 4 stopped on a
preemption request (SIGUSR1 or RUN/.preempt) after saving a checkpoint, 143 the same on SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from toolkit.clihelp import TRAIN_SECTIONS, config_help, epilog


# The section lines are plain text (toolkit.clihelp): `--help` answers without importing torch.
EXAMPLES = """\
  toolkit-train --config digits_lenet optim.lr=0.05 train.epochs=5     # a shipped config, by name
  python -m toolkit.train --config configs/digits_lenet.yaml --print-config
  python -m toolkit.train train.resume=auto run.dir=runs/digits_lenet/20261127-140000   # continue a run
"""
EPILOG = epilog(TRAIN_SECTIONS, EXAMPLES)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="toolkit.train", description=__doc__.split("\n")[0],
                                epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", help=config_help("digits_lenet"))
    p.add_argument("overrides", nargs="*", help="section.key=value, applied after the YAML")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    # Imported here so that `--help` and config errors answer fast.
    from toolkit.config import load_config, to_yaml
    from toolkit.errors import run_cli

    def work():
        cfg = load_config(args.config, args.overrides)
        if cfg.train.resume != "none":  # continue with the run's own config, from its checkpoint
            from toolkit.engine.resume import config_for_resume

            cfg, changes = config_for_resume(cfg, args.config, args.overrides)
            if changes and os.environ.get("RANK", "0") == "0":
                print("resume: the checkpoint's config, with " + "; ".join(changes), flush=True)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return None
        from toolkit.engine import fit

        return fit(cfg)

    code, summary = run_cli(work)
    if code or summary is None:
        return code
    if os.environ.get("RANK", "0") == "0":
        print(f"run directory: {summary['run_dir']}")
        print(f"test accuracy: {summary['test_acc']:.2%} on {summary['num_test_samples']} images "
              f"(best val {summary['best_val_acc']:.2%}), {summary['images_per_s']:,.0f} img/s"
              f"{' (from epoch 2)' if summary['images_per_s_from_epoch'] == 2 else ''}, "
              f"{summary['wall_s']:.1f} s")
        if summary.get("test_acc_best") is not None:
            print(f"best weights (epoch {summary['best_epoch']} by {summary['monitor']}): test accuracy "
                  f"{summary['test_acc_best']:.2%}, in model_best.safetensors")
    return 0


def _exit(code: int) -> None:
    """Exit. A rank of a multi-process run leaves without Python's finalization: its work is
    written and its process group destroyed by then, and gloo's threads could still abort the
    interpreter's teardown (SIGABRT, "terminate called without an active exception"), turning a
    finished run into a failed launch. One process leaves through toolkit.errors.leave (threads
    joined and atexit handlers run, but no module teardown)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    from toolkit.errors import leave

    leave(code)


def cli() -> None:
    """The `toolkit-train` console command: main(), left the way a rank must leave (`_exit`)."""
    _exit(main())


if __name__ == "__main__":
    cli()
