"""Plain conv nets: E4's small "base model" and E5's VGG-16-BN (CIFAR variant).

* `base_cnn`: 4 stages of conv3x3-BN-ReLU + max-pool 2 (widths 32/64/128/256), global average
  pool, Linear 256 -> N. Works at 32, 112, 224 px (any size >= 16).
* `vgg16_bn_cifar`: VGG-16 with BatchNorm, conv config 64,64,M,128,128,M,256x3,M,512x3,M,512x3,M,
  adaptive average pool to 1x1, Linear 512 -> N. 1x1 map at 32x32; any size >= 32.
"""

from collections.abc import Sequence

import torch
from torch import nn

from toolkit.catalog import MODELS
from toolkit.models.weights import load_pretrained


def conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def make_layers(cfg: Sequence[int | str], in_channels: int = 3) -> nn.Sequential:
    layers: list[nn.Module] = []
    c = in_channels
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += conv_bn_relu(c, int(v))
            c = int(v)
    return nn.Sequential(*layers)


class PlainCNN(nn.Module):
    """`features` (conv stack) -> `pool` (global average, flatten) -> `classifier` (Linear)."""

    def __init__(self, cfg: Sequence[int | str], num_classes: int):
        super().__init__()
        self.features = make_layers(cfg)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        width = [v for v in cfg if v != "M"][-1]
        self.classifier = nn.Linear(int(width), num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))


BASE_CNN = (32, "M", 64, "M", 128, "M", 256, "M")
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


@MODELS.register("base_cnn")
def base_cnn(num_classes: int, pretrained: str | None = None) -> nn.Module:
    """E4's base CNN: 4 stages of conv3x3-BN-ReLU + max-pool (32/64/128/256), global average pool; any size >= 16."""
    return load_pretrained(PlainCNN(BASE_CNN, num_classes), pretrained, "base_cnn")


@MODELS.register("vgg16_bn_cifar")
def vgg16_bn_cifar(num_classes: int, pretrained: str | None = None) -> nn.Module:
    """VGG-16 with BatchNorm, CIFAR variant: global average pool, one Linear 512 -> N; any size >= 32."""
    return load_pretrained(PlainCNN(VGG16, num_classes), pretrained, "vgg16_bn_cifar")
