"""MobileNetV2 (Sandler et al., 2018), without torchvision.

A 3x3/2 stem (32 channels), seventeen inverted-residual blocks in seven groups
``(expansion t, channels c, blocks n, first stride s)``, a 1x1 conv to 1280 channels, global
pooling, dropout and a linear classifier. Widths are scaled by ``width_mult`` and rounded to
multiples of 8. Parameter names follow the usual layout (``features.N``, ``classifier.1``), so
weights trained elsewhere in that layout load with ``robustkd import``.

Distillation points (4, at strides 4, 8, 16 and 32, the same resolutions as the stages of an
ImageNet ResNet, so ResNet -> MobileNetV2 pairs line up one to one). An inverted-residual block
ends *linearly* (projection conv + BN, plus the residual; no activation follows), so its output
already carries the negative responses FKD distils: for the first three points the stage output
is also the "pre-ReLU" feature, and the projection BN of the group's last block gives the
margins (ignoring the residual, as for ResNets). The fourth point is the 1280-channel head,
whose BN output (before ReLU6) is a classic pre-activation feature with its own BN. The groups
ending at strides 4/8/16 are the 24-, 32- and 96-channel ones (the narrow linear bottlenecks, not
the wide expanded features: those live inside a block and are not a stage output a detox mask
could replace).

``small_input=True`` makes the stem and the 24-channel group stride 1 (the usual CIFAR
adaptation): the points are then at strides 1, 2, 4 and 8.

Nothing works in place (ReLU6 included), so a hooked output is still intact after the pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robustkd.errors import ConfigError
from robustkd.models.base import DistillLayer

# (expansion t, output channels c, blocks n, stride of the first block s)
MOBILENETV2_GROUPS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
_POINT_GROUPS = (1, 2, 4)  # groups (0-based) whose last block is a distillation point


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a width to a multiple of ``divisor`` without losing more than 10% of it."""
    out = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if out < 0.9 * value:
        out += divisor
    return out


class ConvBNAct(nn.Sequential):
    """Conv (no bias) - BN - ReLU6; ``0``, ``1``, ``2`` are the conv, BN and activation."""

    def __init__(self, in_planes: int, out_planes: int, kernel: int = 3, stride: int = 1,
                 groups: int = 1):
        super().__init__(
            nn.Conv2d(in_planes, out_planes, kernel, stride=stride, padding=(kernel - 1) // 2,
                      groups=groups, bias=False),
            nn.BatchNorm2d(out_planes),
            nn.ReLU6(),
        )


class InvertedResidual(nn.Module):
    """Expand (1x1, unless t = 1) - depthwise 3x3 - linear 1x1 projection + BN, plus identity.

    The identity is added only when the block keeps stride and width. ``conv`` ends with the
    projection conv and its BN, whose name :attr:`project_bn` gives.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, expansion: int):
        super().__init__()
        hidden = int(round(in_planes * expansion))
        self.use_residual = stride == 1 and in_planes == out_planes
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(ConvBNAct(in_planes, hidden, kernel=1))
        layers += [
            ConvBNAct(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_planes, 1, bias=False),
            nn.BatchNorm2d(out_planes),
        ]
        self.conv = nn.Sequential(*layers)
        self.project_bn = f"conv.{len(layers) - 1}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 with width multiplier; pooling is adaptive so any input size works."""

    classifier_name = "classifier.1"

    def __init__(self, num_classes: int, in_channels: int = 3, width_mult: float = 1.0,
                 small_input: bool = False, dropout: float = 0.2):
        super().__init__()
        if isinstance(width_mult, bool) or not isinstance(width_mult, (int, float)) or not (
            width_mult > 0
        ):
            raise ConfigError(f"MobileNetV2 width_mult must be a positive number, "
                              f"got {width_mult!r}")
        if not isinstance(small_input, bool):
            raise ConfigError(f"small_input must be true or false, got {small_input!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not (
            0 <= dropout < 1
        ):
            raise ConfigError(f"MobileNetV2 dropout must be in [0, 1), got {dropout!r}")
        stem = make_divisible(32 * width_mult)
        last = make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [ConvBNAct(in_channels, stem, stride=1 if small_input else 2)]
        in_planes = stem
        ends = []
        for g, (t, c, n, s) in enumerate(MOBILENETV2_GROUPS):
            out_planes = make_divisible(c * width_mult)
            if small_input and g == 1:
                s = 1
            for i in range(n):
                features.append(InvertedResidual(in_planes, out_planes, s if i == 0 else 1, t))
                in_planes = out_planes
            ends.append(len(features) - 1)
        features.append(ConvBNAct(in_planes, last, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))
        self.num_features = last
        self._points = [ends[g] for g in _POINT_GROUPS]
        self.arch = "mobilenetv2"
        self.arch_kwargs = {"num_classes": num_classes, "in_channels": in_channels,
                            "width_mult": float(width_mult), "small_input": small_input,
                            "dropout": float(dropout)}
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)

    def distill_layers(self) -> list[DistillLayer]:
        """Ends of the 24/32/96-channel groups (linear outputs) and the head's pre-ReLU6 BN."""
        layers = []
        for i in self._points:
            name = f"features.{i}"
            layers.append(DistillLayer(name, name, f"{name}.{self.features[i].project_bn}"))
        head = f"features.{len(self.features) - 1}"
        layers.append(DistillLayer(head, f"{head}.1", f"{head}.1"))
        return layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(x)
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.classifier(out)
