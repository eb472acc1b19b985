"""CIFAR ResNet-(6n+2) (He et al., 2016): post-activation basic blocks, widths 16/32/64.

Shortcuts are option A (parameter-free: subsample, then zero-pad the new channels), the
variant the paper used on CIFAR; it gives ResNet-56 its usual 0.86M parameters on 100 classes.

A post-activation stage ends in a ReLU, so its output has lost the negative responses FKD
distils. Each block therefore passes ``residual + shortcut`` through an ``nn.Identity`` named
``preact`` before the final ReLU, giving hooks a module whose output is the pre-ReLU sum.
Nothing works in place, so a kept hook output is not overwritten later in the pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robustkd.errors import ConfigError
from robustkd.models.base import DistillLayer
from robustkd.models.wrn import init_weights


def resnet_blocks_per_stage(depth: int) -> int:
    """Blocks per stage for a CIFAR ResNet of this depth; depth must be 6n+2."""
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        hint = (f"; the ImageNet ResNet of that depth is imagenet_resnet{depth}"
                if depth in (18, 34, 101, 152) else "")
        raise ConfigError(
            f"ResNet depth must be 6n+2 (8, 14, 20, 32, 44, 56, 110, ...), got {depth!r}{hint}"
        )
    return (depth - 2) // 6


class PadShortcut(nn.Module):
    """Option-A shortcut: spatial subsampling by ``stride`` and symmetric zero channels."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.stride = stride
        self.front = (out_planes - in_planes) // 2
        self.back = out_planes - in_planes - self.front

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.front, self.back))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, add shortcut, ``preact`` tap, ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = PadShortcut(in_planes, planes, stride)
        self.preact = nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(self.preact(out + self.shortcut(x)))


class CifarResNet(nn.Module):
    """ResNet-``depth`` for 32x32-style inputs; pooling is adaptive so other sizes work."""

    classifier_name = "fc"

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3):
        super().__init__()
        n = resnet_blocks_per_stage(depth)
        self.num_blocks = n
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = self._make_stage(n, 16, 16, 1)
        self.layer2 = self._make_stage(n, 16, 32, 2)
        self.layer3 = self._make_stage(n, 32, 64, 2)
        self.fc = nn.Linear(64, num_classes)
        self.num_features = 64
        self.arch = f"resnet{depth}"
        self.arch_kwargs = {"num_classes": num_classes, "in_channels": in_channels}
        init_weights(self)

    @staticmethod
    def _make_stage(n: int, in_planes: int, planes: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes, 1) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def distill_layers(self) -> list[DistillLayer]:
        """Stage outputs, the pre-ReLU sum of each stage's last block, and its last BN."""
        last = self.num_blocks - 1
        return [
            DistillLayer(f"layer{i}", f"layer{i}.{last}.preact", f"layer{i}.{last}.bn2")
            for i in (1, 2, 3)
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.fc(out)
