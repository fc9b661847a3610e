"""What every CLI's `--help` ends with: the config sections, one line each, and where the rest is.

    argparse.ArgumentParser(..., epilog=epilog(TRAIN_SECTIONS, EXAMPLES))

Plain text that imports nothing, so `--help` answers before torch (or OmegaConf) is loaded.
tests/test_console_commands.py checks these sections, and every key a line names, against the
config dataclasses (toolkit.config.Config, ExtractConfig), so the text cannot drift from them.
"""

from __future__ import annotations

import textwrap
from typing import Sequence, Tuple

DOCS = "docs/quickstart.md"

# (section, one line: what it sets and its main keys). Only real key names before the "...".
Sections = Sequence[Tuple[str, str]]

TRAIN_SECTIONS: Sections = (
    ("run", "the run: name, dir (default runs/<name>/<timestamp>), seed"),
    ("data", "dataset and batches: name, root, image_size, batch_size (global), loader, augment, limit, ..."),
    ("model", "the network: name, num_classes, pretrained, freeze"),
    ("optim", "optimizer: name, lr, momentum, weight_decay, ..."),
    ("sched", "learning-rate schedule: name, milestones, gamma, warmup_epochs, ..."),
    ("loss", "loss: name, label_smoothing, margin, distance, ..."),
    ("train", "the loop: epochs, stages, precision, compile, ema_decay, resume, checkpoint_every_steps, ..."),
    ("log", "console, metrics, trackers and plots: every_n_steps, progress, trackers, plots, ..."),
)

EXTRACT_SECTIONS: Sections = (
    ("run", "name, dir (features go to DIR/features), seed"),
    ("data", "the images: name (folder or a training dataset), root, split, image_size, batch_size, ..."),
    ("model", "name, pretrained, run (a training run's model and weights), num_classes"),
    ("extract", "what is written: layer, l2_normalize, precision, shard_size, ..."),
)



def config_help(example: str) -> str:
    """`--config`'s help: a path, or a shipped config's name (toolkit.config.find_config)."""
    return f"a YAML path, or a shipped config's name (e.g. {example}; all of them: toolkit-list configs)"


def sections_text(sections: Sections) -> str:
    width = max(len(name) for name, _ in sections)
    lines = [f"  {name:<{width}}  {line}" for name, line in sections]
    return f"config sections (set any key with section.key=value; every key and its default: {DOCS}):\n" + \
        "\n".join(lines)


def epilog(sections: Sections = (), examples: str = "", docs: str = "", notes: str = "") -> str:
    """The text after argparse's options: config sections (if the command takes a config),
    examples (commands, indented as given), notes (prose, as given) and the docs to read
    (docs/quickstart.md, plus `docs` where the topic has its own page)."""
    parts = [sections_text(sections)] if sections else []
    if examples:
        parts.append("examples:\n" + textwrap.indent(textwrap.dedent(examples).strip("\n"), "  "))
    if notes:
        parts.append(textwrap.dedent(notes).strip("\n"))
    more = ", ".join(d for d in (DOCS, docs) if d)
    names = "\nthe names a config may choose (models, datasets, configs, ...): toolkit-list" if sections else ""
    parts.append(f"docs: {more} (in the repository){names}")
    return "\n\n".join(parts) + "\n"
