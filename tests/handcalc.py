"""Shared helpers for tests with hand-derived values: tiny float64 models and plain-float formulas."""

from __future__ import annotations

import math

import torch
from torch import nn

class PowNet(nn.Module):
    """z(x) = W (flatten(x) ** power), a bias-free nn.Linear with weights set explicitly."""

    def __init__(self, W, power: int = 1):
        super().__init__()
        self.power = power
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(len(W[0]), len(W), bias=False, dtype=torch.float64)
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor(W, dtype=torch.float64))

    def forward(self, x):
        return self.linear(self.flatten(x) ** self.power)


class Recorder(nn.Module):
    """Counts forward calls and keeps a copy of each call's input."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.inputs: list[torch.Tensor] = []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.model(x)


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def lab(ys):
    return torch.tensor(ys, dtype=torch.long)


def val(tensor) -> float:
    return float(tensor.detach())


def h_logits(W, rows, power=1):
    """z_c(x) = sum_j W[c][j] * x_j ** power."""
    return [[sum(w * v**power for w, v in zip(w_c, row)) for w_c in W] for row in rows]


def h_softmax(z, T=1.0):
    m = max(z)
    e = [math.exp((v - m) / T) for v in z]
    s = sum(e)
    return [v / s for v in e]


def h_ce(Z, Y):
    """Mean over the batch of -log softmax(z_i)[y_i] = logsumexp(z_i) - z_i[y_i]."""
    out = 0.0
    for z, y in zip(Z, Y):
        m = max(z)
        out += m + math.log(sum(math.exp(v - m) for v in z)) - z[y]
    return out / len(Z)
