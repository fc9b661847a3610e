"""Residual CNNs with a 3x3 stride-1 stem and no max-pool (CIFAR style), global-average-pooled,
so any input size >= 32 works.

* `resnet18_cifar`: ResNet-18, CIFAR variant (32x32 input keeps 4x4 at the last stage).
* `res_basic`: E4's small residual CNN from BasicBlocks: stem 32, stages 32/64/128, 2 blocks each.
* `res_bottleneck`: E4's small residual CNN from Bottleneck blocks (expansion 4): stem 32,
  stage widths 32/64/128 (outputs 128/256/512), 2 blocks each.
* `resnet9`: the ResNet-9 of the CIFAR-10 speed records (Myrtle.ai, "How to train your ResNet",
  D. Page 2018: 94% in 24 epochs): conv-BN-ReLU 64, then 128 + max-pool + a residual pair,
  256 + max-pool, 512 + max-pool + a residual pair, global max-pool, Linear, logits x 0.125.
  6.6M parameters; configs/cifar10_fast.yaml trains it.
"""

from collections.abc import Sequence

import torch
from torch import nn

from toolkit.catalog import MODELS
from toolkit.models.weights import load_pretrained


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (stride here), 1x1 expand to planes * 4; projection shortcut when needed."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or in_planes != out:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out, 1, stride, bias=False),
                                          nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + self.shortcut(x))


class ResNetCifar(nn.Module):
    """Stem conv3x3(width)-BN-ReLU; stage i has `layers[i]` blocks of width `width * 2**i`
    (stride 2 from the second stage on); global average pool; Linear head."""

    def __init__(self, layers: Sequence[int] = (2, 2, 2, 2), num_classes: int = 10, width: int = 64,
                 block: type[nn.Module] = BasicBlock):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))  # (B, 64, 32, 32)
        stages, in_planes = [], width
        for i, n in enumerate(layers):
            planes, stride = width * 2**i, (1 if i == 0 else 2)
            blocks = []
            for j in range(n):
                blocks.append(block(in_planes, planes, stride if j == 0 else 1))
                in_planes = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)  # (B, 512, 4, 4) for resnet18_cifar at 32x32
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())  # (B, 512)
        self.classifier = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.layers(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))


@MODELS.register("resnet18_cifar")
def resnet18_cifar(num_classes: int, pretrained: str | None = None) -> nn.Module:
    """ResNet-18, CIFAR variant: 3x3 stride-1 stem, no max-pool, 11M parameters; any input >= 32 px."""
    return load_pretrained(ResNetCifar((2, 2, 2, 2), num_classes), pretrained, "resnet18_cifar")


@MODELS.register("res_basic")
def res_basic(num_classes: int, pretrained: str | None = None) -> nn.Module:
    """E4's small residual CNN of BasicBlocks: stem 32, stages 32/64/128, 2 blocks each."""
    model = ResNetCifar((2, 2, 2), num_classes, width=32, block=BasicBlock)
    return load_pretrained(model, pretrained, "res_basic")


@MODELS.register("res_bottleneck")
def res_bottleneck(num_classes: int, pretrained: str | None = None) -> nn.Module:
    """E4's small residual CNN of Bottleneck blocks: stem 32, stage widths 32/64/128 (outputs x4), 2 blocks each."""
    model = ResNetCifar((2, 2, 2), num_classes, width=32, block=Bottleneck)
    return load_pretrained(model, pretrained, "res_bottleneck")


def _cbr(c_in: int, c_out: int, pool: bool = False) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, *([nn.MaxPool2d(2)] if pool else []))


class _Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(_cbr(c, c), _cbr(c, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ScaledLinear(nn.Linear):
    """Linear whose output is multiplied by a fixed factor (not trained)."""

    def __init__(self, in_features: int, out_features: int, factor: float, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.factor


class ResNet9(nn.Module):
    def __init__(self, num_classes: int = 10, scale: float = 0.125):
        super().__init__()
        self.layers = nn.Sequential(
            _cbr(3, 64),  # (B, 64, 32, 32)
            _cbr(64, 128, pool=True), _Residual(128),  # (B, 128, 16, 16)
            _cbr(128, 256, pool=True),  # (B, 256, 8, 8)
            _cbr(256, 512, pool=True), _Residual(512),  # (B, 512, 4, 4)
        )
        self.pool = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten())  # (B, 512)
        # The fixed x0.125 keeps the logits small, as the record runs do; it belongs to the head so
        # that classifier(forward_features(x)) == forward(x).
        self.classifier = ScaledLinear(512, num_classes, scale)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.layers(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))


@MODELS.register("resnet9")
def resnet9(num_classes: int, pretrained: str | None = None) -> nn.Module:
    """ResNet-9 of the CIFAR-10 speed records (Myrtle.ai), 6.6M parameters; configs/cifar10_fast.yaml trains it."""
    return load_pretrained(ResNet9(num_classes), pretrained, "resnet9")
