"""Adversarial weight perturbation (AWP; Wu et al. 2020, "Adversarial Weight Perturbation Helps Robust
Generalization"): before each optimiser step, move the weights one step up the adversarial loss.

Per step, in the published order (docs/recipes.md "AWP"):

1. the adversarial examples x' are made with the unperturbed model;
2. a proxy copy of the model (train mode, so its BatchNorm batch statistics are used and the model's running
   statistics are untouched) takes the gradient g_l of the objective's own loss L(x, y, x') for every weight
   w_l with more than one dimension (convolution and linear weights; biases and BatchNorm stay put), and
   v_l = ||w_l|| g_l / (||g_l|| + 1e-20)                 (layer-wise scaling);
3. w_l <- w_l + gamma v_l;
4. the training loss (with RPAT if on) is computed on the perturbed weights, back-propagated, and the
   optimiser steps (momentum and weight decay see the perturbed weights, as published);
5. w_l <- w_l - gamma v_l: the perturbation is removed from the updated weights.

The published code takes one SGD step on the proxy with loss -L and rescales the weight change
``lr * g_l``; the rescaling cancels the proxy's learning rate, so rpat rescales g_l itself (the same
direction, without the rounding of (w + lr g) - w).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Callable, Mapping

import torch
from torch import nn

from rpat import distributed

EPS = 1e-20  # the published guard of ||g||


def layer_perturbation(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """v = ||w|| g / (||g|| + 1e-20): the ascent direction at the weight's own scale (Frobenius norms)."""
    return w.norm() / (g.norm() + EPS) * g


def perturbed_names(model: nn.Module) -> list[str]:
    """The parameters AWP perturbs: those named ``*weight*`` with more than one dimension (as published)."""
    return [n for n, p in model.named_parameters() if p.dim() > 1 and "weight" in n]


class WeightPerturbation:
    """AWP for ``model``: ``loss(proxy, x, y, x_adv, hp, ctx) -> LossOut`` is the loss the ascent step raises
    (the objective's own, without RPAT); ``gamma`` the relative size; AWP is active after ``warmup`` epochs."""

    def __init__(self, model: nn.Module, loss: Callable, gamma: float, warmup: int = 0):
        self.model, self.loss, self.gamma, self.warmup = model, loss, float(gamma), int(warmup)
        self.proxy = copy.deepcopy(model)
        names = perturbed_names(model)
        params, proxy_params = dict(model.named_parameters()), dict(self.proxy.named_parameters())
        self.weights = [params[n] for n in names]
        self.proxy_weights = [proxy_params[n] for n in names]

    def active(self, epoch: int) -> bool:
        return epoch > self.warmup

    def direction(self, x, y, x_adv, hp: Mapping, ctx, amp=None) -> list[torch.Tensor]:
        """v_l for every perturbed weight: the proxy's loss gradient rescaled layer by layer."""
        self.proxy.load_state_dict(self.model.state_dict())
        self.proxy.train()
        with amp if amp is not None else contextlib.nullcontext():
            loss = self.loss(self.proxy, x, y, x_adv, hp, ctx).loss
        grads = torch.autograd.grad(loss, self.proxy_weights, allow_unused=True)
        with torch.no_grad():
            grads = distributed.mean_over_ranks(grads, self.weights)  # the global batch's gradient
            return [layer_perturbation(w, g) for w, g in zip(self.weights, grads)]

    @torch.no_grad()
    def perturb(self, v: list[torch.Tensor]) -> None:
        for w, d in zip(self.weights, v):
            w.add_(self.gamma * d)

    @torch.no_grad()
    def restore(self, v: list[torch.Tensor]) -> None:
        for w, d in zip(self.weights, v):
            w.add_(-self.gamma * d)
