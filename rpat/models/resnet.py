"""ResNets for CIFAR-sized inputs (docs/faithfulness.md: "Models", D6).

``resnet18``: the real ResNet-18. BasicBlocks [2, 2, 2, 2] (widths 64-128-256-512), 3x3 stem conv + BN + ReLU,
no max-pool, adaptive average pooling, Linear(512, C) named ``linear``. 11,173,962 parameters for 10 classes.

``resnet18_bottleneck``: the network the RPAT_Benchmarks code calls "resnet18", kept for exact reproduction of its
numbers. Bottleneck blocks [2, 2, 2, 2] with expansion 4 (2048-d features), same stem, Linear(2048, C) named
``linear``. 13,958,986 parameters for 10 classes.

Input size: the stem conv has stride 1 for images smaller than 64 and stride 2 for 64x64 and larger (the reference's
Tiny-ImageNet setting), so a 64x64 image gives the same feature-map sizes as a 32x32 one (4x4 before pooling).
Pooling is adaptive, so any size works; the parameter count does not depend on the size.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from rpat.models.registry import register


def shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    """Identity, or a 1x1 conv + BN where the block changes resolution or width."""
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False), nn.BatchNorm2d(out_planes))


def stack(block, in_planes: int, planes: int, num_blocks: int, stride: int) -> tuple[nn.Sequential, int]:
    """``num_blocks`` blocks, the first with ``stride``; returns them and their output width."""
    layers = []
    for s in [stride] + [1] * (num_blocks - 1):
        layers.append(block(in_planes, planes, s))
        in_planes = planes * block.expansion
    return nn.Sequential(*layers), in_planes


def stem_stride(image_size: int) -> int:
    """Stride 2 from 64x64 on, so the later stages see the feature-map sizes they were designed for at 32x32."""
    return 2 if image_size >= 64 else 1


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.shortcut = shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        num_blocks: list[int],
        num_classes: int,
        in_channels: int = 3,
        stride: int = 1,
    ):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], 1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], 2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], 2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], 2)
        # The reference pools with a fixed kernel 4, which ties each network to one input size; adaptive pooling is
        # the same operation on the 4x4 map and also accepts other sizes.
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, block, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layer, self.in_planes = stack(block, self.in_planes, planes, num_blocks, stride)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(torch.flatten(self.pool(out), 1))


@register("resnet18", "ResNet-18: BasicBlock [2,2,2,2], 3x3 stem, no max-pool (11,173,962 params for 10 classes)",
          display="ResNet-18")
def resnet18(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, in_channels, stem_stride(image_size))


@register(
    "resnet18_bottleneck",
    "the RPAT_Benchmarks 'resnet18': Bottleneck [2,2,2,2], 2048-d features (13,958,986 params for 10 classes)",
    display="ResNet-18 (Bottleneck)",
)
def resnet18_bottleneck(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return ResNet(Bottleneck, [2, 2, 2, 2], num_classes, in_channels, stem_stride(image_size))
