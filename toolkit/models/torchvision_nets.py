"""torchvision backbones (built with weights=None) with a new final Linear for `num_classes`.

The model is `TorchvisionNet`: `backbone` is the torchvision network with its final Linear
replaced by nn.Identity, so `backbone(x)` = `forward_features(x)` is the penultimate vector
(ResNet: pooled 512/2048; VGG: the 4096 after classifier[:6], i.e. FC-ReLU-Dropout-FC-ReLU-
Dropout; MobileNetV3-small: the 1024 after classifier[:3]); `classifier` is the new
nn.Linear(in, num_classes). State-dict keys: `backbone.<torchvision key>` and
`classifier.weight/bias`.

`pretrained` (see toolkit.models.weights): a weights enum name (`IMAGENET1K_V1`, `DEFAULT`,
`ResNet50_Weights.IMAGENET1K_V2`) read from the local torch hub cache only, or a state-dict
path (torchvision layout or this wrapper's layout). The weights are loaded into the torchvision
network BEFORE its head is replaced; the old head is kept only when it has the new shape
(so the ImageNet 1000-class head is dropped unless num_classes == 1000).
"""

from __future__ import annotations

import torch
from torch import nn

from toolkit.catalog import MODELS
from toolkit.catalog import HEADS
from toolkit.models.weights import load_into, read_spec


def _set_submodule(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _to_torchvision_keys(sd: dict[str, torch.Tensor], head: str) -> dict[str, torch.Tensor]:
    """A TorchvisionNet state dict (`backbone.*`, `classifier.*`) -> torchvision layout;
    a torchvision one is returned as is."""
    if not any(k.startswith("backbone.") for k in sd):
        return sd
    out = {}
    for k, v in sd.items():
        if k.startswith("backbone."):
            out[k[len("backbone."):]] = v
        elif k.startswith("classifier."):
            out[f"{head}.{k[len('classifier.'):]}"] = v
        else:
            out[k] = v  # reported as unexpected by load_into
    return out


class TorchvisionNet(nn.Module):
    """`forward(x) == classifier(forward_features(x))`; see the module docstring."""

    def __init__(self, arch: str, backbone: nn.Module, classifier: nn.Linear):
        super().__init__()
        self.arch = arch
        self.backbone = backbone
        self.classifier = classifier

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(x))


def build_torchvision(arch: str, num_classes: int, pretrained: str | None = None) -> TorchvisionNet:
    import torchvision

    if arch not in HEADS:
        raise ValueError(f"no head known for torchvision {arch!r}")
    net = torchvision.models.get_model(arch, weights=None)  # 1000-class ImageNet layout
    head_path = HEADS[arch]
    old_head = net.get_submodule(head_path)
    assert isinstance(old_head, nn.Linear), (arch, old_head)
    new_head = nn.Linear(old_head.in_features, num_classes)
    if pretrained is not None:
        sd, source = read_spec(pretrained, arch=arch)
        load_into(net, _to_torchvision_keys(sd, head_path), head_prefix=head_path + ".",
                  head=new_head, source=source, model_name=arch)
    _set_submodule(net, head_path, nn.Identity())
    return TorchvisionNet(arch, net, new_head)


def _register(arch: str) -> None:
    def builder(num_classes: int, pretrained: str | None = None) -> nn.Module:
        return build_torchvision(arch, num_classes, pretrained)

    builder.__name__ = arch
    builder.__doc__ = f"torchvision {arch} (weights=None) with a new Linear head; see {__name__}."
    MODELS.register(arch)(builder)


for _arch in HEADS:
    _register(_arch)
