"""LeNet-5 for 32x32x3 input: conv 6@5x5, pool, conv 16@5x5, pool, FC 120-84-N."""

import torch
from torch import nn

from toolkit.models import MODELS


class LeNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),  # (B, 6, 14, 14)
            nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),  # (B, 16, 5, 5)
            nn.Flatten(),  # (B, 400)
            nn.Linear(16 * 5 * 5, 120), nn.ReLU(inplace=True),
            nn.Linear(120, 84), nn.ReLU(inplace=True),  # (B, 84): the penultimate features
        )
        self.classifier = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@MODELS.register("lenet")
def lenet(num_classes: int) -> nn.Module:
    return LeNet(num_classes)
