"""The names a config may choose, one line each: models, datasets, augments, losses, ... and configs.

    python -m toolkit.list                 # the kinds
    python -m toolkit.list models          # every registered model (model.name), one line each
    toolkit-list configs                   # the shipped configs (--config NAME), from any directory

Each entry's line is its registry description (toolkit.registry.Registry.describe: the builder's
docstring's first sentence) or, for configs and spaces, the first sentence of the file's leading
comment. Only the registry asked for is imported (`configs` and `spaces` import no torch), and
torchvision stays unimported: its models are registered by name and built on first use.
Exit codes: 0 listed, 2 an unknown kind.

(The module is `list` because the command is `python -m toolkit.list`; nothing in the package
imports it, so the name never stands in for the builtin there.)
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from toolkit.clihelp import epilog

Entries = List[Tuple[str, str]]  # (name, one-line description)


def _registry(module: str, attr: str) -> Callable[[], Entries]:
    """A registry's entries, its module imported only when this kind is asked for."""
    def entries() -> Entries:
        reg = getattr(importlib.import_module(module), attr)
        return [(name, reg.describe(name)) for name in reg.names()]

    return entries


def yaml_description(path: Path) -> str:
    """The first sentence of a YAML file's leading comment block (the shipped configs open with one)."""
    from toolkit.registry import first_sentence

    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line[1:]
        if text.startswith("   "):  # an indented command line: the prose is over
            break
        lines.append(text.strip())
    return first_sentence(" ".join(lines))


def _shipped(folder: str) -> Callable[[], Entries]:
    def entries() -> Entries:
        from toolkit.config import SHIPPED, shipped_names

        return [(name, yaml_description(SHIPPED / folder / f"{name}.yaml")) for name in shipped_names(folder)]

    return entries


# kind -> (where its names go, its entries). The order is the order `toolkit-list` shows.
KINDS: Dict[str, Tuple[str, Callable[[], Entries]]] = {
    "models": ("model.name=NAME", _registry("toolkit.models", "MODELS")),
    "datasets": ("data.name=NAME", _registry("toolkit.data", "DATASETS")),
    "augments": ("data.augment=NAME", _registry("toolkit.data.augment", "AUGMENTS")),
    "losses": ("loss.name=NAME", _registry("toolkit.losses", "LOSSES")),
    "optimizers": ("optim.name=NAME", _registry("toolkit.optim", "OPTIMIZERS")),
    "schedulers": ("sched.name=NAME", _registry("toolkit.optim", "SCHEDULERS")),
    "configs": ("--config NAME: train, extract, tune", _shipped("")),
    "spaces": ("--space NAME: tune", _shipped("spaces")),
}


def entries(kind: str) -> Entries:
    """(name, description) of every entry of `kind`, sorted by name; ConfigError for an unknown kind."""
    from toolkit.errors import ConfigError

    if kind not in KINDS:
        raise ConfigError(f"unknown kind {kind!r}; choose one of: {', '.join(KINDS)}")
    return KINDS[kind][1]()


def table(rows: Entries) -> str:
    width = max((len(name) for name, _ in rows), default=0)
    return "\n".join(f"  {name:<{width}}  {text}".rstrip() for name, text in rows)


def kinds_text() -> str:
    return "kinds (toolkit-list KIND), and where their names go:\n" + table([(k, key) for k, (key, _) in KINDS.items()])


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="toolkit.list", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=kinds_text() + "\n\n" + epilog(examples="\n".join(__doc__.split("\n")[2:5])))
    p.add_argument("kind", nargs="?", help="what to list; none: the kinds")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    from toolkit.errors import run_cli

    if args.kind is None:
        print(kinds_text())
        return 0
    code, rows = run_cli(lambda: entries(args.kind))
    if code:
        return code
    print(f"{args.kind}, for {KINDS[args.kind][0]}:\n{table(rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
