"""Pre-activation ResNet-18 as in the ReBAT / RPAT_SOTAs code (docs/faithfulness.md: "Models", D6).

``preact_resnet18``: 3x3 stem conv (no BN), PreActBlocks [2, 2, 2, 2] (widths 64-128-256-512), final BN-ReLU,
adaptive average pooling, Linear(512, C) named ``linear``. In a PreActBlock the identity shortcut adds the raw input
and the projection shortcut (1x1 conv, no BN) reads the pre-activated input. 11,172,170 parameters for 10 classes.

This is not the RPAT_Benchmarks ``pre_resnet18`` (no final BN-ReLU, stride-2 stem at every size, 11,171,274
parameters), which docs/faithfulness.md "Models" shows fails on 32x32 inputs.

Input size: the stem conv has stride 1 for images smaller than 64 and stride 2 for 64x64 and larger, so a 64x64 image
gives the same feature-map sizes as a 32x32 one. Pooling is adaptive, so any size works; the parameter count does not
depend on the size.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from rpat.models.registry import register
from rpat.models.resnet import stack, stem_stride


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes * self.expansion:
            # Wrapped in Sequential so state_dict keys match the reference's ("shortcut.0.weight").
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes * self.expansion, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        # As in the ReBAT code: the projection sees the pre-activated input, the identity the raw one.
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    def __init__(self, num_blocks: list[int], num_classes: int, in_channels: int = 3, stride: int = 1):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=stride, padding=1, bias=False)
        self.layer1 = self._make_layer(64, num_blocks[0], 1)
        self.layer2 = self._make_layer(128, num_blocks[1], 2)
        self.layer3 = self._make_layer(256, num_blocks[2], 2)
        self.layer4 = self._make_layer(512, num_blocks[3], 2)
        # Pre-activation blocks end on a convolution, so the head needs its own BN-ReLU.
        self.bn = nn.BatchNorm2d(512 * PreActBlock.expansion)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512 * PreActBlock.expansion, num_classes)

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layer, self.in_planes = stack(PreActBlock, self.in_planes, planes, num_blocks, stride)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        return self.linear(torch.flatten(self.pool(out), 1))


@register(
    "preact_resnet18",
    "PreActResNet-18 of the ReBAT/SOTAs code, final BN-ReLU (11,172,170 params for 10 classes)",
    display="PreActResNet-18",
)
def preact_resnet18(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return PreActResNet([2, 2, 2, 2], num_classes, in_channels, stem_stride(image_size))
