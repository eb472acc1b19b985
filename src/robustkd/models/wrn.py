"""Wide ResNet WRN-d-k for CIFAR-sized inputs (Zagoruyko & Komodakis, 2016).

Pre-activation basic blocks, group widths 16k, 32k, 64k after a 16-channel stem, (d-4)/6 blocks
per group. Module names follow the layout FKD ("A Comprehensive Overhaul of Feature
Distillation") used, so its distillation points (group outputs and the BatchNorm that follows
each) can be named directly.

No operation here works in place: a forward hook that keeps a module's output (a BatchNorm's
pre-ReLU feature, say) must still see that value after the rest of the forward pass has run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robustkd.errors import ConfigError
from robustkd.models.base import DistillLayer


def init_weights(model: nn.Module) -> None:
    """Standard CIFAR init: Kaiming-normal (fan_out) convs, BN at identity, zero fc bias.

    Shared by all built-in models so that a teacher and a student start from the same recipe.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


def wrn_blocks_per_group(depth: int) -> int:
    """Blocks per group for a WRN of this depth; a depth that is not 6n+4 is a config error."""
    if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise ConfigError(
            f"WRN depth must be 6n+4 (10, 16, 22, 28, 34, 40, ...), got {depth!r}"
        )
    return (depth - 4) // 6


class WideBasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3, plus shortcut.

    When the width or stride changes, the 1x1 ``shortcut`` conv reads the pre-activated input
    (as in the original WRN), otherwise the raw input is added unchanged.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if in_planes != out_planes or stride != 1:
            self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        out = self.conv1(act)
        out = self.conv2(self.dropout(self.relu2(self.bn2(out))))
        residual = x if self.shortcut is None else self.shortcut(act)
        return out + residual


class WideGroup(nn.Module):
    """One group of blocks at a fixed width; blocks live in ``layer`` (``blockN.layer.i``)."""

    def __init__(self, num_blocks: int, in_planes: int, out_planes: int, stride: int,
                 dropout: float = 0.0):
        super().__init__()
        self.layer = nn.Sequential(*[
            WideBasicBlock(in_planes if i == 0 else out_planes, out_planes,
                           stride if i == 0 else 1, dropout)
            for i in range(num_blocks)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor``; global pooling is adaptive so any input size works."""

    classifier_name = "fc"

    def __init__(self, depth: int, widen_factor: int, num_classes: int, in_channels: int = 3,
                 dropout: float = 0.0):
        super().__init__()
        n = wrn_blocks_per_group(depth)
        if not isinstance(widen_factor, int) or widen_factor < 1:
            raise ConfigError(f"WRN widen factor must be a positive integer, got {widen_factor!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not (
            0 <= dropout < 1
        ):
            raise ConfigError(f"WRN dropout must be in [0, 1), got {dropout!r}")
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = WideGroup(n, widths[0], widths[1], 1, dropout)
        self.block2 = WideGroup(n, widths[1], widths[2], 2, dropout)
        self.block3 = WideGroup(n, widths[2], widths[3], 2, dropout)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.fc = nn.Linear(widths[3], num_classes)
        self.num_features = widths[3]
        self.arch = f"wrn{depth}_{widen_factor}"
        self.arch_kwargs = {"num_classes": num_classes, "in_channels": in_channels,
                            "dropout": float(dropout)}
        init_weights(self)

    def distill_layers(self) -> list[DistillLayer]:
        """Group outputs, each with the pre-ReLU BatchNorm that reads it (FKD's choice)."""
        return [
            DistillLayer("block1", "block2.layer.0.bn1", "block2.layer.0.bn1"),
            DistillLayer("block2", "block3.layer.0.bn1", "block3.layer.0.bn1"),
            DistillLayer("block3", "bn1", "bn1"),
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.block3(self.block2(self.block1(out)))
        out = self.relu(self.bn1(out))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.fc(out)
