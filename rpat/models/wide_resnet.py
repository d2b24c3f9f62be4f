"""Wide ResNets (docs/faithfulness.md: "Models", D6).

WRN-d-10: 3x3 stem conv 3->16, three groups of (d-4)/6 pre-activation blocks (BN-ReLU-conv3x3-BN-ReLU-conv3x3) with
160, 320, 640 channels and strides 1, 2, 2, final BN-ReLU, adaptive average pooling, Linear(640, C) named ``fc``.
Where a block changes the channel count, its BN-ReLU output feeds both the conv path and a 1x1 conv shortcut;
otherwise the shortcut is the raw input. No dropout. Initialisation as in the reference: conv weights kaiming normal
(fan_out, relu), i.e. N(0, sqrt(2 / (k*k*out_channels))); BN weight 1, bias 0; Linear bias 0.

``wrn34_10``: 46,160,474 parameters for 10 classes (the RPAT_SOTAs WRN-34-10, but respecting num_classes).
``wrn28_10``: 36,479,194 parameters for 10 classes (the RPAT_Benchmarks ``wrn2810``).

Input size: the stem conv has stride 1 for images smaller than 64 and stride 2 for 64x64 and larger (the reference's
Tiny-ImageNet setting), so a 64x64 image gives the same feature-map sizes as a 32x32 one (8x8 before pooling).
Pooling is adaptive, so any size works; the parameter count does not depend on the size.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from rpat.models.registry import register
from rpat.models.resnet import stem_stride


class WideBasicBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.convShortcut: nn.Module | None = None
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        # As in the reference: a projection reads the pre-activated input, the identity the raw one.
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        out = self.conv1(act)
        out = self.conv2(F.relu(self.bn2(out)))
        return shortcut + out


class NetworkBlock(nn.Module):
    def __init__(self, num_layers: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(
            *[WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
              for i in range(num_layers)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen_factor: int, num_classes: int, in_channels: int = 3, stride: int = 1):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, channels[0], 3, stride=stride, padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2)
        # Pre-activation blocks end on a convolution, so the head needs its own BN-ReLU.
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels[3], num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn1(out))
        return self.fc(torch.flatten(self.pool(out), 1))


@register("wrn34_10", "WideResNet-34-10, pre-activation blocks, no dropout (46,160,474 params for 10 classes)",
          display="WRN-34-10")
def wrn34_10(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return WideResNet(34, 10, num_classes, in_channels, stem_stride(image_size))


@register("wrn28_10", "WideResNet-28-10, pre-activation blocks, no dropout (36,479,194 params for 10 classes)",
          display="WRN-28-10")
def wrn28_10(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return WideResNet(28, 10, num_classes, in_channels, stem_stride(image_size))
