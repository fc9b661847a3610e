"""One small registry for everything chosen by name (models, datasets, losses, optimizers, ...).

    MODELS = Registry("model", {"toolkit.models.lenet": ("lenet", "simple_cnn")})   # see toolkit.catalog
    @MODELS.register("lenet")                         # in toolkit/models/lenet.py
    def lenet(num_classes: int) -> nn.Module: ...   # its docstring's first sentence: its line in toolkit-list
    MODELS.check("lenet")                             # known by name: nothing imported
    MODELS.build("lenet", num_classes=10)             # imports toolkit.models.lenet on first use
    MODELS.describe("lenet")                          # that line

A registry made without a module table (`Registry("kind")`) knows the names registered so far.
"""

from __future__ import annotations

import importlib
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from toolkit.errors import ConfigError

MAX_DESCRIPTION = 110  # characters of a one-line description (toolkit-list prints one line per name)


def first_sentence(text: Optional[str]) -> str:
    """The first sentence of a docstring's (or comment's) first paragraph, on one line."""
    paragraph = (text or "").strip().split("\n\n")[0]
    line = " ".join(paragraph.split())
    line = re.split(r"(?<=[.!?])\s", line, maxsplit=1)[0]  # "0.1" or "e.g.x" do not end a sentence
    return line if len(line) <= MAX_DESCRIPTION else line[:MAX_DESCRIPTION - 3].rstrip() + "..."


class Registry:
    def __init__(self, kind: str, modules: Optional[Mapping[str, Sequence[str]]] = None):
        """`modules`: module -> the names its import registers (toolkit.catalog lists them)."""
        self.kind = kind
        self._listed = modules is not None
        self._module: Dict[str, str] = {name: module for module, names in (modules or {}).items() for name in names}
        self._entries: Dict[str, Callable[..., Any]] = {}
        self._descriptions: Dict[str, str] = {}

    def register(self, name: str,
                 description: Optional[str] = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator. `description`: the entry's one line where its docstring cannot say it."""
        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            if self._listed and self._module.get(name) != fn.__module__:
                raise ValueError(f"{self.kind} {name!r} is registered in {fn.__module__}, which toolkit.catalog "
                                 f"does not list for it: add it there")
            self._module[name] = fn.__module__
            self._entries[name] = fn
            if description is not None:
                self._descriptions[name] = description
            return fn

        return deco

    def names(self) -> List[str]:
        return sorted(self._module)

    def describe(self, name: str) -> str:
        """One line: the description given at registration, else the builder's docstring's first
        sentence ("" when it has neither; tests/test_list.py requires one for every entry)."""
        self.check(name)
        return self._descriptions.get(name) or first_sentence(self.get(name).__doc__)

    def check(self, name: str, key: str | None = None) -> None:
        """Raise a one-line ConfigError listing the valid names when `name` is unknown."""
        if name not in self._module:
            where = f"config: {key}: " if key else ""
            raise ConfigError(
                f"{where}unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            )

    def get(self, name: str) -> Callable[..., Any]:
        self.check(name)
        if name not in self._entries:
            importlib.import_module(self._module[name])  # its @register calls fill _entries
        if name not in self._entries:
            raise LookupError(f"{self._module[name]} did not register the {self.kind} {name!r} listed for it")
        return self._entries[name]

    def build(self, name: str, **kwargs: Any) -> Any:
        return self.get(name)(**kwargs)

    def __contains__(self, name: str) -> bool:
        return name in self._module
