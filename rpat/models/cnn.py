"""A small CNN for the offline demo (8x8 digits) and quick tests; works at any input size."""

from torch import nn

from rpat.models.registry import register


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


@register("cnn", "small CNN: 3 conv-BN-ReLU blocks (32-64-128), one max-pool, global average pool",
          display="CNN")
def small_cnn(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return nn.Sequential(
        *_block(in_channels, 32),
        *_block(32, 64),
        nn.MaxPool2d(2),
        *_block(64, 128),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, num_classes),
    )
