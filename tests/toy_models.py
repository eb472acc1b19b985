"""User-style models outside the registry, importable as factories (tests.toy_models:make)."""

import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def make(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    return TinyNet(num_classes, in_channels)


def make_wide(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    return TinyNet(num_classes, in_channels, width=16)
