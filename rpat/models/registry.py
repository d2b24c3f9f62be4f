"""The model registry (re-exported by :mod:`rpat.models`): :func:`register`, :func:`build` and the
:class:`Normalized` wrapper every built model is in; the architectures' modules import it to register themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from rpat import registries, zoo
from rpat.errors import UnknownName


@dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: Callable[..., nn.Module]
    description: str
    image_sizes: tuple[int, ...] | None  # None: any size
    display: str = ""  # the paper's name (tables, plots)


MODELS: dict[str, ModelSpec] = {}


def register(name: str, description: str, image_sizes: Sequence[int] | None = None, display: str = ""):
    """Register ``builder(num_classes, in_channels, image_size) -> nn.Module`` under ``name``."""

    def deco(builder):
        registries.add(MODELS, name, ModelSpec(name, builder, description,
                                               tuple(image_sizes) if image_sizes else None, display or name), "model")
        return builder

    return deco


class Normalized(nn.Module):
    """``net((x - mean) / std)``: normalisation inside the model, inputs in [0, 1]."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def build(
    name: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Normalized:
    """Build a registered model, normalising inputs by ``mean``/``std`` (identity if omitted)."""
    if zoo.is_zoo_model(name):
        raise UnknownName(f"{name} is a pretrained RobustBench model: it is loaded from the zoo's file, not built "
                          "for training; evaluate it with method pretrained")
    if name not in MODELS:
        raise UnknownName(f"unknown model {name!r}; registered models: {', '.join(sorted(MODELS))}")
    spec = MODELS[name]
    if spec.image_sizes is not None and image_size not in spec.image_sizes:
        raise ValueError(
            f"model {name!r} supports image sizes {list(spec.image_sizes)}, not {image_size}; "
            "choose another model or dataset"
        )
    net = spec.builder(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    mean = list(mean) if mean is not None else [0.0] * in_channels
    std = list(std) if std is not None else [1.0] * in_channels
    return Normalized(net, mean, std)


META_KEYS = ("model_name", "num_classes", "in_channels", "image_size", "mean", "std")


def meta(name: str, *, num_classes: int, in_channels: int, image_size: int, mean, std) -> dict:
    """What a checkpoint records to rebuild its model (:func:`build_from_meta`)."""
    return {"model_name": name, "num_classes": num_classes, "in_channels": in_channels, "image_size": image_size,
            "mean": list(mean), "std": list(std)}


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
