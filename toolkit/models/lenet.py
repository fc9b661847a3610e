"""LeNet-5 for 32x32x3 input: conv 6@5x5, pool, conv 16@5x5, pool, FC 120-84-N.

`simple_cnn` is the same network (E5's "simple CNN") with an adaptive average pool to 5x5
before the flatten, so it also takes larger inputs (e.g. 112x112); at 32x32 the map is already
5x5, the pool is the identity and simple_cnn computes exactly what lenet computes. The pool has
no parameters, so both share state-dict keys and a lenet checkpoint loads into simple_cnn.
"""

import torch
from torch import nn

from toolkit.catalog import MODELS
from toolkit.models.weights import load_pretrained


class LeNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, adaptive: bool = False):
        super().__init__()
        flatten = nn.Flatten()
        if adaptive:  # parameter-free: the keys stay those of LeNet
            flatten = nn.Sequential(nn.AdaptiveAvgPool2d((5, 5)), nn.Flatten())
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),  # (B, 6, 14, 14)
            nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),  # (B, 16, 5, 5)
            flatten,  # (B, 400)
            nn.Linear(16 * 5 * 5, 120), nn.ReLU(inplace=True),
            nn.Linear(120, 84), nn.ReLU(inplace=True),  # (B, 84): the penultimate features
        )
        self.classifier = nn.Linear(84, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@MODELS.register("lenet")
def lenet(num_classes: int, pretrained: str | None = None) -> nn.Module:
    """LeNet-5, 32x32 input only; `pretrained` may be a state-dict path."""
    return load_pretrained(LeNet(num_classes), pretrained, "lenet")


@MODELS.register("simple_cnn")
def simple_cnn(num_classes: int, pretrained: str | None = None) -> nn.Module:
    """E5's simple CNN: LeNet-5 plus an adaptive 5x5 average pool before the flatten, so any
    input >= 32x32 works (identical to lenet at 32x32; same state-dict keys)."""
    return load_pretrained(LeNet(num_classes, adaptive=True), pretrained, "simple_cnn")
