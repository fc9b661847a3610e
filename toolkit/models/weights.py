"""Pretrained weights for every model entry, from local files only (never a download).

`pretrained` SPEC, as given to `MODELS.build(name, num_classes=N, pretrained=SPEC)`:

* a torchvision weights enum name (torchvision backbones only): `IMAGENET1K_V1`, `DEFAULT`,
  `ResNet50_Weights.IMAGENET1K_V2`, ... It is resolved with
  `torchvision.models.get_model_weights(arch)` and read from the torch hub cache
  `Path(torch.hub.get_dir()) / "checkpoints" / <filename of weights.url>`; when the file is not
  there a one-line ConfigError says where to put it.
* a path to a state dict: `.safetensors` (read with safetensors) or anything else (`.pth`, `.pt`,
  ...: `torch.load(..., weights_only=True)`, so a file holding arbitrary pickled objects is
  refused, never unpickled). It may hold a full torchvision state dict or the state dict of the
  toolkit's own model (e.g. `RUN/model.safetensors` of an earlier run; `module.` and
  `_orig_mod.` prefixes left by DDP / torch.compile are stripped).

Loading rule (`load_into`): every key outside the head must be present with the same shape
(a missing, unexpected or mis-shaped key is a ConfigError naming the first such key; BatchNorm
`num_batches_tracked` may be missing, as in old torchvision files). The head (the final Linear)
is loaded only when its shapes equal the new head's (same number of classes); otherwise it is
dropped and the new head keeps its fresh initialisation (e.g. the ImageNet 1000-class head).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from toolkit.catalog import HEADS
from toolkit.errors import ConfigError

log = logging.getLogger(__name__)

KEY = "model.pretrained"
_ENUM_RE = re.compile(r"^(?:[A-Za-z][A-Za-z0-9_]*\.)?[A-Z][A-Z0-9_]*$")
_STATE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")



def _one_line(text: str) -> str:
    return " ".join(str(text).split())


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Sentences of PyTorch's refusal that advise loading the file anyway (weights_only=False, or
# allowlisting the globals it names): for a file from elsewhere that is what would run its code.
_UNSAFE_ADVICE = ("weights_only` set to `False", "weights_only=False", "can still be loaded", "Please use",
                  "add_safe_globals", "safe_globals(", "if you trust")


def refusal_reason(exc: BaseException) -> str:
    """Why torch.load(weights_only=True) refused a file, in one line and without PyTorch's advice
    to load it unsafely: the WeightsUnpickler's own reason when there is one."""
    text = _ANSI.sub("", str(exc))
    m = re.search(r"WeightsUnpickler error:\s*([^\n]*)", text)
    why = m.group(1) if m else next((line for line in text.splitlines() if line.strip() and not any(
        a in line for a in _UNSAFE_ADVICE)), type(exc).__name__)
    why = why.split(" Please use")[0].split(" was not an allowed global")[0]  # the advice follows
    return _one_line(why)[:200]


def is_enum_spec(spec: str) -> bool:
    """True when SPEC names torchvision weights rather than a file (an existing file wins)."""
    if os.path.exists(spec) or spec.lower().endswith(_STATE_SUFFIXES) or "/" in spec or os.sep in spec:
        return False
    return bool(_ENUM_RE.match(spec))


# ---------------------------------------------------------------------------------------------
# torchvision enum -> local cache file


def resolve_weights(arch: str, spec: str):
    """The torchvision WeightsEnum member for SPEC (`NAME` or `ClassName.NAME`), or ConfigError."""
    from torchvision.models import get_model_weights

    enum_cls = get_model_weights(arch)
    cls_name, _, name = spec.rpartition(".")
    names = [n for n in enum_cls.__members__]
    if cls_name and cls_name != enum_cls.__name__:
        raise ConfigError(f"{KEY}: {spec!r} are not weights for {arch}; use {enum_cls.__name__}.NAME "
                          f"with NAME one of: {', '.join(names)}")
    if name not in enum_cls.__members__:
        raise ConfigError(f"{KEY}: unknown {arch} weights {spec!r}; choose one of: {', '.join(names)} "
                          f"(or pass a state-dict path)")
    return enum_cls[name]


def cache_path(weights) -> Path:
    """Where torch.hub would store `weights.url`: TORCH_HOME/hub/checkpoints/<filename>."""
    filename = os.path.basename(urlparse(weights.url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def cached_weights_path(arch: str, spec: str) -> Path:
    """The local cache file for enum SPEC; ConfigError (one line) when it is not there."""
    weights = resolve_weights(arch, spec)
    path = cache_path(weights)
    if not path.is_file():
        raise ConfigError(f"{KEY}: {arch} weights {weights} are not in the local cache {path}; "
                          f"download {weights.url} there on a machine with internet "
                          f"(or pass a state-dict path)")
    return path


# ---------------------------------------------------------------------------------------------
# reading a state-dict file


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors by name from a `.safetensors` or a torch-saved state dict, safely (weights_only).

    Every failure is a one-line ConfigError: missing file, unreadable file, a pickle that
    `weights_only=True` refuses, or content that is not a mapping of names to tensors. A torch
    file holding `{"state_dict": {...}}` or `{"model": {...}}` is unwrapped.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{KEY}: state-dict file {str(path)!r} does not exist")
    if p.suffix.lower() == ".safetensors":
        try:
            from safetensors.torch import load_file
            sd = load_file(str(p), device="cpu")
        except Exception as e:  # noqa: BLE001  any read error becomes a one-line ConfigError
            raise ConfigError(f"{KEY}: cannot read safetensors file {p}: {_one_line(e)[:200]}") from None
        return dict(sd)
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  refused pickle, corrupt file, ...: one line, never a fallback
        raise ConfigError(f"{KEY}: {p} is not a state dict that loads safely (torch.load with "
                          f"weights_only=True: {refusal_reason(e)}); save a plain state dict "
                          f"or a .safetensors file") from None
    if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ConfigError(f"{KEY}: {p} does not hold a state dict (a mapping of names to tensors)")
    return dict(obj)


def strip_wrapper_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop `module.` (DDP) / `_orig_mod.` (torch.compile) when every key carries it."""
    changed = True
    while changed and sd:
        changed = False
        for pre in _WRAPPER_PREFIXES:
            if all(k.startswith(pre) for k in sd):
                sd = {k[len(pre):]: v for k, v in sd.items()}
                changed = True
    return sd


def read_spec(spec: str, arch: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, source label) for SPEC. `arch` is the torchvision name, or None for the
    toolkit's own models, which accept only a path."""
    if not isinstance(spec, (str, os.PathLike)) or not str(spec).strip():
        raise ConfigError(f"{KEY}: expected a weights name or a state-dict path, got {spec!r}")
    spec = str(spec)
    if arch is not None and is_enum_spec(spec):
        path = cached_weights_path(arch, spec)
        return strip_wrapper_prefixes(read_state_dict(path)), f"{arch} weights {spec} ({path})"
    _no_enum(spec, arch)
    return strip_wrapper_prefixes(read_state_dict(spec)), spec


def _no_enum(spec: str, arch: str | None) -> None:
    if arch is None and is_enum_spec(spec):
        raise ConfigError(f"{KEY}: {spec!r} is neither a state-dict file nor usable here: only the "
                          f"torchvision backbones take weights names; this model takes a path")


def check_pretrained(model_name: str, spec: str | None) -> None:
    """Cheap up-front check for config validation (no model built, no weights read): for a
    torchvision entry an enum name resolves and its cache file exists, otherwise the path exists.
    Raises the same one-line ConfigErrors as `MODELS.build(model_name, ..., pretrained=spec)`."""
    if spec is None:
        return
    arch = model_name if model_name in HEADS else None
    if not isinstance(spec, (str, os.PathLike)) or not str(spec).strip():
        raise ConfigError(f"{KEY}: expected a weights name or a state-dict path, got {spec!r}")
    spec = str(spec)
    if arch is not None and is_enum_spec(spec):
        cached_weights_path(arch, spec)
        return
    _no_enum(spec, arch)
    if not Path(spec).is_file():
        raise ConfigError(f"{KEY}: state-dict file {spec!r} does not exist")


# ---------------------------------------------------------------------------------------------
# loading into a module


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def load_into(module: nn.Module, sd: Mapping[str, torch.Tensor], *, head_prefix: str,
              head: nn.Module, source: str, model_name: str) -> bool:
    """Load SD into MODULE: all keys not under HEAD_PREFIX strictly (shapes checked first), and
    the keys under HEAD_PREFIX into HEAD only when they fit it exactly. Returns whether the head
    was loaded. HEAD may be a module outside MODULE (a new head not attached yet)."""
    target = module.state_dict()
    body = {k: v for k, v in sd.items() if not k.startswith(head_prefix)}
    head_sd = {k[len(head_prefix):]: v for k, v in sd.items() if k.startswith(head_prefix)}
    where = f"{KEY}: {source} does not fit {model_name}"
    for k, v in body.items():
        if k not in target:
            raise ConfigError(f"{where}: unexpected key {k!r}")
    for k, v in target.items():
        if k.startswith(head_prefix):
            continue
        if k not in body:
            if k.endswith("num_batches_tracked"):
                continue
            raise ConfigError(f"{where}: missing key {k!r}")
        if _shape(body[k]) != _shape(v):
            raise ConfigError(f"{where}: key {k!r} has shape {_shape(body[k])} in the file but "
                              f"{_shape(v)} in the model")
    _, unexpected = module.load_state_dict(body, strict=False)  # missing: head, num_batches_tracked
    assert not unexpected, unexpected
    head_target = head.state_dict()
    fits = bool(head_sd) and set(head_sd) == set(head_target) and all(
        _shape(head_sd[k]) == _shape(head_target[k]) for k in head_target)
    if fits:
        head.load_state_dict(head_sd)
    elif head_sd:
        log.info("%s: head of %s dropped (shapes %s != %s); new head initialised fresh", KEY, source,
                 {k: _shape(v) for k, v in head_sd.items()},
                 {k: _shape(v) for k, v in head_target.items()})
    return fits


def load_pretrained(model: nn.Module, spec: str | None, model_name: str) -> nn.Module:
    """For the toolkit's own models: load a state-dict path SPEC (the head `classifier.` only
    when it fits); None does nothing. Returns MODEL."""
    if spec is None:
        return model
    sd, source = read_spec(spec, arch=None)
    load_into(model, sd, head_prefix="classifier.", head=model.classifier, source=source,
              model_name=model_name)
    return model
