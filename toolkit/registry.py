"""One small registry for everything chosen by name (models, datasets, losses, optimizers, ...).

    MODELS = Registry("model")
    @MODELS.register("lenet")
    def lenet(num_classes: int) -> nn.Module: ...
    MODELS.build("lenet", num_classes=10)
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List

from toolkit.errors import ConfigError


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._entries[name] = fn
            return fn

        return deco

    def names(self) -> List[str]:
        return sorted(self._entries)

    def check(self, name: str, key: str | None = None) -> None:
        """Raise a one-line ConfigError listing the valid names when `name` is unknown."""
        if name not in self._entries:
            where = f"config: {key}: " if key else ""
            raise ConfigError(
                f"{where}unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            )

    def get(self, name: str) -> Callable[..., Any]:
        self.check(name)
        return self._entries[name]

    def build(self, name: str, **kwargs: Any) -> Any:
        return self.get(name)(**kwargs)

    def __contains__(self, name: str) -> bool:
        return name in self._entries
