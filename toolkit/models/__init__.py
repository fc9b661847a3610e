"""Models by name: `MODELS.build(name, num_classes=N)`; `MODELS.names()` lists them."""

from toolkit.registry import Registry

MODELS = Registry("model")

from toolkit.models import lenet, resnet_cifar  # noqa: E402,F401  (register entries)

__all__ = ["MODELS"]
