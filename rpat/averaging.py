"""Weight averaging (EMA) of a model, as ReBAT keeps it (docs/faithfulness.md "Weight averaging").

theta_WA <- d theta_WA + (1 - d) theta for every parameter, and the same for BatchNorm running
mean/var; num_batches_tracked is copied. With d = 0 the average is an exact copy of the model.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightAverage(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.module = copy.deepcopy(model)
        for p in self.module.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        for avg, cur in zip(self.module.parameters(), model.parameters()):
            avg.mul_(decay).add_(cur.detach(), alpha=1.0 - decay)
        for (name, avg), cur in zip(self.module.named_buffers(), model.buffers()):
            if name.endswith("num_batches_tracked") or not avg.dtype.is_floating_point:
                avg.copy_(cur)
            else:
                avg.mul_(decay).add_(cur.detach(), alpha=1.0 - decay)
