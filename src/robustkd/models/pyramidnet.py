"""PyramidNet for CIFAR (Han, Kim & Kim, 2017) with additive widening.

Width grows by ``alpha / N`` at every block (N = total number of blocks), rounded to an integer
per block. Blocks start with BN, have no ReLU after the addition, and use parameter-free
shortcuts: 2x2 average pooling when the block downsamples and zero-padding of the new channels.
Module names match FKD's PyramidNet, so its distillation points can be named directly.
Nothing works in place, so a kept hook output is not overwritten later in the pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robustkd.errors import ConfigError
from robustkd.models.base import DistillLayer
from robustkd.models.wrn import init_weights


def pyramidnet_blocks_per_stage(depth: int, bottleneck: bool) -> int:
    """Blocks per stage: (depth-2)/9 with bottlenecks, (depth-2)/6 with basic blocks."""
    per_block = 9 if bottleneck else 6
    if not isinstance(depth, int) or depth < per_block + 2 or (depth - 2) % per_block:
        kind, examples = (
            ("bottleneck", "11, 20, 29, ..., 164, 200, 272") if bottleneck
            else ("basic", "8, 14, 20, ..., 110, 164")
        )
        raise ConfigError(
            f"PyramidNet depth with {kind} blocks must be {per_block}n+2 ({examples}), "
            f"got {depth!r}"
        )
    return (depth - 2) // per_block


def _shortcut(x: torch.Tensor, out_channels: int, stride: int) -> torch.Tensor:
    """Average-pool on downsampling, then zero-pad extra channels at the end."""
    if stride != 1:
        x = F.avg_pool2d(x, 2, stride=2, ceil_mode=True)
    extra = out_channels - x.shape[1]
    if extra > 0:
        x = F.pad(x, (0, 0, 0, 0, 0, extra))
    return x


class PyramidBasicBlock(nn.Module):
    """BN-conv3x3-BN-ReLU-conv3x3-BN, plus padded shortcut; no ReLU after the sum."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.stride = stride
        self.out_planes = planes
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.bn1(x))
        out = self.bn3(self.conv2(self.relu(self.bn2(out))))
        return out + _shortcut(x, self.out_planes, self.stride)


class PyramidBottleneck(nn.Module):
    """BN-conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1(x4)-BN, plus padded shortcut."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.stride = stride
        self.out_planes = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, self.out_planes, 1, bias=False)
        self.bn4 = nn.BatchNorm2d(self.out_planes)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.bn1(x))
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.bn4(self.conv3(self.relu(self.bn3(out))))
        return out + _shortcut(x, self.out_planes, self.stride)


class PyramidNet(nn.Module):
    """PyramidNet-``depth`` with widening factor ``alpha``; pooling is adaptive."""

    classifier_name = "fc"

    def __init__(self, depth: int, alpha: float, num_classes: int, in_channels: int = 3,
                 bottleneck: bool = False):
        super().__init__()
        if not isinstance(bottleneck, bool):
            raise ConfigError(f"PyramidNet bottleneck must be true or false, got {bottleneck!r}")
        n = pyramidnet_blocks_per_stage(depth, bottleneck)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha < 0:
            raise ConfigError(f"PyramidNet alpha must be a non-negative number, got {alpha!r}")
        block = PyramidBottleneck if bottleneck else PyramidBasicBlock
        step = alpha / (3 * n)
        self._width = 16.0  # running (unrounded) width, advanced by ``step`` per block
        self._in_planes = 16
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_stage(block, n, step, 1)
        self.layer2 = self._make_stage(block, n, step, 2)
        self.layer3 = self._make_stage(block, n, step, 2)
        self.bn_final = nn.BatchNorm2d(self._in_planes)
        self.relu_final = nn.ReLU()
        self.fc = nn.Linear(self._in_planes, num_classes)
        self.num_features = self._in_planes
        self.arch = "pyramidnet"
        self.arch_kwargs = {"num_classes": num_classes, "in_channels": in_channels,
                            "depth": depth, "alpha": alpha, "bottleneck": bottleneck}
        init_weights(self)

    def _make_stage(self, block: type[nn.Module], n: int, step: float,
                    stride: int) -> nn.Sequential:
        blocks = []
        for i in range(n):
            self._width += step
            planes = int(round(self._width))
            blocks.append(block(self._in_planes, planes, stride if i == 0 else 1))
            self._in_planes = planes * block.expansion
        return nn.Sequential(*blocks)

    def distill_layers(self) -> list[DistillLayer]:
        """Stage outputs, each with the BatchNorm that reads it next (FKD's choice)."""
        return [
            DistillLayer("layer1", "layer2.0.bn1", "layer2.0.bn1"),
            DistillLayer("layer2", "layer3.0.bn1", "layer3.0.bn1"),
            DistillLayer("layer3", "bn_final", "bn_final"),
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(self.conv1(x))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = self.relu_final(self.bn_final(out))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.fc(out)
