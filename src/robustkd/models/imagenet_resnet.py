"""ResNet-18/34/50/101/152 for ImageNet-sized inputs (He et al., 2016), without torchvision.

Layout (the common "v1.5" variant): 7x7/2 stem conv, BN, ReLU, 3x3/2 max-pool; four stages at
widths 64/128/256/512 of basic blocks (18, 34) or bottlenecks (50+, output width x4); the first
block of stages 2-4 downsamples (in the 3x3 conv of a bottleneck); a 1x1 conv + BN projection
(``downsample``) whenever the shape changes; global average pooling and ``fc``. Parameter names
follow the usual ImageNet layout (``layer2.0.downsample.0``, ``fc`` ...), so weights trained
elsewhere in that layout load with ``robustkd import`` without renaming.

As in :mod:`robustkd.models.resnet`, a post-activation stage ends in a ReLU, which removes the
negative responses FKD distils; each block therefore passes ``residual + shortcut`` through an
``nn.Identity`` named ``preact`` (no parameters) before the final ReLU. Nothing works in place,
so a hooked output is still intact after the rest of the forward pass.

``small_input=True`` replaces the stem by a 3x3/1 conv without max-pool (the usual adaptation
for 32-64 px images), so the last stage is 4x4 rather than 1x1 on 32 px inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robustkd.errors import ConfigError
from robustkd.models.base import DistillLayer
from robustkd.models.wrn import init_weights

# depth -> (bottleneck?, blocks per stage)
RESNET_CONFIGS: dict[int, tuple[bool, tuple[int, int, int, int]]] = {
    18: (False, (2, 2, 2, 2)),
    34: (False, (3, 4, 6, 3)),
    50: (True, (3, 4, 6, 3)),
    101: (True, (3, 4, 23, 3)),
    152: (True, (3, 8, 36, 3)),
}


def _projection(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
                         nn.BatchNorm2d(out_planes))


class ResNetBasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, add shortcut, ``preact`` tap, ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = _projection(in_planes, planes, stride)
        self.preact = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(self.preact(out + shortcut))


class ResNetBottleneck(nn.Module):
    """conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1(x4)-BN, add shortcut, ``preact``, ReLU."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != out_planes:
            self.downsample = _projection(in_planes, out_planes, stride)
        self.preact = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(self.preact(out + shortcut))


class ImageNetResNet(nn.Module):
    """ResNet-``depth`` (18, 34, 50, 101, 152); pooling is adaptive so any input size works."""

    classifier_name = "fc"

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3,
                 small_input: bool = False):
        super().__init__()
        if depth not in RESNET_CONFIGS:
            raise ConfigError(f"ImageNet ResNet depth must be one of {sorted(RESNET_CONFIGS)}, "
                              f"got {depth!r}")
        if not isinstance(small_input, bool):
            raise ConfigError(f"small_input must be true or false, got {small_input!r}")
        bottleneck, counts = RESNET_CONFIGS[depth]
        block = ResNetBottleneck if bottleneck else ResNetBasicBlock
        self.depth = depth
        self.counts = counts
        self.last_bn = "bn3" if bottleneck else "bn2"
        if small_input:
            self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self._in_planes = 64
        self.layer1 = self._make_stage(block, 64, counts[0], 1)
        self.layer2 = self._make_stage(block, 128, counts[1], 2)
        self.layer3 = self._make_stage(block, 256, counts[2], 2)
        self.layer4 = self._make_stage(block, 512, counts[3], 2)
        self.fc = nn.Linear(self._in_planes, num_classes)
        self.num_features = self._in_planes
        self.arch = f"imagenet_resnet{depth}"
        self.arch_kwargs = {"num_classes": num_classes, "in_channels": in_channels,
                            "small_input": small_input}
        init_weights(self)

    def _make_stage(self, block: type[nn.Module], planes: int, n: int,
                    stride: int) -> nn.Sequential:
        blocks = []
        for i in range(n):
            blocks.append(block(self._in_planes, planes, stride if i == 0 else 1))
            self._in_planes = planes * block.expansion
        return nn.Sequential(*blocks)

    def distill_layers(self) -> list[DistillLayer]:
        """Stage outputs, the pre-ReLU sum of each stage's last block, and its last BN.

        The BN ignores the shortcut's contribution to the sum; FKD's margins for ResNets are
        taken from it all the same (the closest BN to the pre-ReLU point).
        """
        return [
            DistillLayer(f"layer{i}", f"layer{i}.{n - 1}.preact",
                         f"layer{i}.{n - 1}.{self.last_bn}")
            for i, n in enumerate(self.counts, start=1)
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.fc(out)
