"""The model side of extraction: the network a features directory is computed with, and the
module that turns images into feature vectors.

    model, record = build_model(cfg.model, seed=cfg.run.seed)   # cfg: toolkit.config.ExtractConfig
    pre = run_preprocess(cfg.model.run)                          # the run's image size, channels, mean/std
    feats = Extractor(model, "features")(x)                      # x (B, 3, H, W) -> (B, D), L2-normalised

Used by `toolkit/extract.py` (the job) and `toolkit/retrieve.py` (encoding query images exactly
as the gallery was encoded).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.config import Config, ExtractModelConfig, load_config
from toolkit.errors import ConfigError
from toolkit.rundir import RunDir

LAYERS_BUILTIN = ("features", "logits")


def load_run_config(run_dir: Path) -> Config:
    """The config of a finished training run (`model.run`); a one-line error if it is not one."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "model.safetensors").is_file():
        raise ConfigError(f"config: model.run: {run_dir} is not a finished training run "
                          "(needs config.yaml and model.safetensors)")
    return load_config(str(run_dir / "config.yaml"))


def run_preprocess(run_dir: Path, key: str = "config: model.run") -> Dict[str, Any]:
    """What a finished training run fed its model: {"image_size", "channels", "mean", "std"}.

    Read from RUN/data.json, the dataset's own record of what it produced: config.yaml's
    data.image_size is null whenever the dataset chose the size (digits: 32), and mean/std may
    have been computed from the training split (digits, cifar). Channels: one mean per channel.
    `key` starts the error line (extraction's config key; toolkit.predict names the run)."""
    path = RunDir(Path(run_dir)).data
    try:
        meta = json.loads(path.read_text())
        size, mean, std = meta["image_size"], [float(v) for v in meta["mean"]], [float(v) for v in meta["std"]]
    except FileNotFoundError:
        raise ConfigError(f"{key}: {path} is missing: the run does not say which image size and "
                          "normalisation it was trained with") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"{key}: {path} lacks or mangles image_size, mean or std") from None
    ok = (isinstance(size, int) and not isinstance(size, bool) and size >= 1 and len(mean) == len(std) >= 1
          and all(math.isfinite(v) for v in mean + std) and all(v > 0 for v in std))
    if not ok:
        raise ConfigError(f"{key}: {path} lacks or mangles image_size, mean or std")
    return {"image_size": size, "channels": len(mean), "mean": mean, "std": std}


def load_run_weights(name: str, weights: Path, num_classes: Optional[int] = None,
                     key: str = "config: model.run") -> nn.Module:
    """Model `name` with a run's weights file (model.safetensors or model_best.safetensors), in
    eval mode on the CPU; one ConfigError line, starting with `key`, for a file that does not
    read or whose keys and shapes do not fit `name`. The number of classes is the head's
    (`classifier.weight`) unless given."""
    from safetensors.torch import load_file

    from toolkit.models import MODELS

    try:
        sd = load_file(str(weights))
    except Exception as e:
        raise ConfigError(f"{key}: cannot read {weights} ({type(e).__name__}: {e})") from None
    head = sd.get("classifier.weight")
    if num_classes is None and head is None:
        raise ConfigError(f"{key}: {weights} does not fit {name}: it has no classifier.weight")
    model = MODELS.build(name, num_classes=num_classes or int(head.shape[0]), pretrained=None)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ConfigError(f"{key}: {weights} does not fit {name}: {_first_line(e)}") from None
    return model.eval()


def _first_line(e: Exception) -> str:
    """torch's load_state_dict error, cut to its first line that says something."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict"):
        return lines[1][:300]
    return lines[0][:300] if lines else type(e).__name__


def build_model(m: ExtractModelConfig, seed: int = 0) -> tuple[nn.Module, Dict[str, Any]]:
    """-> model in eval mode, and the record of where it came from (for meta.json). Weights that
    are not loaded from a file are initialised from `seed`: the same on every rank and rerun."""
    torch.manual_seed(seed)
    from toolkit.models import MODELS, check_pretrained

    if m.run is not None:
        run_dir = Path(m.run).absolute()
        train_cfg = load_run_config(run_dir)
        name = train_cfg.model.name
        if m.name is not None and m.name != name:
            raise ConfigError(f"config: model.name: {m.name} differs from the run's model {name}; leave it out")
        weights = run_dir / "model.safetensors"
        model = load_run_weights(name, weights, m.num_classes)
        num_classes = m.num_classes or int(model.classifier.weight.shape[0])
        record = {"name": name, "num_classes": num_classes, "run": str(run_dir), "weights": str(weights)}
    else:
        check_pretrained(m.name, m.pretrained)
        num_classes = m.num_classes or 1000
        model = MODELS.build(m.name, num_classes=num_classes, pretrained=m.pretrained)
        record = {"name": m.name, "num_classes": num_classes, "pretrained": m.pretrained}
    return model.eval(), record


class _Stop(Exception):
    """Raised by the layer hook: nothing after the chosen layer needs computing."""


class Extractor(nn.Module):
    """x (B, 3, H, W) -> features (B, D) float32 from `layer`, L2-normalised if asked.

    A module's 4-D output is global-average-pooled to (B, C); other shapes are flattened."""

    def __init__(self, model: nn.Module, layer: str = "features", l2_normalize: bool = True):
        super().__init__()
        self.model, self.layer, self.l2 = model, layer, l2_normalize
        self._out: Optional[torch.Tensor] = None
        if layer not in LAYERS_BUILTIN:
            modules = dict(model.named_modules())
            if layer not in modules:
                top = [n for n, _ in model.named_children()]
                raise ConfigError(f"config: extract.layer: no module {layer!r} in {type(model).__name__}; use "
                                  f"features, logits or a module name (top level: {', '.join(top)})")
            modules[layer].register_forward_hook(self._hook)

    def _hook(self, _module, _args, out) -> None:
        self._out = out
        raise _Stop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layer == "features":
            f = self.model.forward_features(x)
        elif self.layer == "logits":
            f = self.model(x)
        else:
            try:
                self.model(x)
                raise RuntimeError(f"layer {self.layer} did not run in the forward pass")
            except _Stop:
                f, self._out = self._out, None
        if f.ndim == 4:
            f = f.mean(dim=(2, 3))  # (B, C, H, W) -> (B, C)
        f = f.flatten(1).float()  # (B, D)
        return F.normalize(f, dim=1) if self.l2 else f
