"""The `MODELS` registry every model entry registers in.

It lives here, not in toolkit/models/__init__.py, so that an entry module imports only this one
and `toolkit.models` (which imports every entry to register it) is not imported back.
"""

from toolkit.registry import Registry

MODELS = Registry("model")  # builders: (num_classes, pretrained=None) -> nn.Module
