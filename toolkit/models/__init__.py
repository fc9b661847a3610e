"""Models by name: `MODELS.build(name, num_classes=N, pretrained=SPEC_OR_None)`; `MODELS.names()`
lists them.

Every model exposes `classifier` (last layer(s), features -> logits) and
`forward_features(x) -> (B, D)` with `forward(x) == classifier(forward_features(x))`.
`pretrained`: see toolkit.models.weights; freezing: toolkit.models.freeze.
"""

from toolkit.catalog import MODELS  # an entry's module is imported when the entry is first built
from toolkit.models.freeze import FREEZE_MODES, apply_freeze, set_train_mode
from toolkit.models.weights import check_pretrained

__all__ = ["FREEZE_MODES", "MODELS", "apply_freeze", "check_pretrained", "set_train_mode"]
