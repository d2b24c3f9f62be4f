"""Attacks: one PGD engine = inner loss x random start x step rule x projection, plus a BN-mode policy.

All attacks take inputs in [0, 1] and return a detached adversarial batch in [0, 1] inside the
threat-model ball around ``x``. Gradients are taken with ``torch.autograd.grad`` w.r.t. the
perturbation only, so attack iterations never compute or accumulate parameter gradients.

Threat models (``norm``): ``linf`` and ``l2``.

Inner losses ``loss(logits, y, ref) -> scalar`` (maximised):
  ce      mean cross-entropy                                      (PGD-AT, MART, PGD-20 evaluation)
  kl      sum_i KL(softmax(ref_i) || softmax(logits_i))            (TRADES; ref = clean logits)
  cw      mean of CW margin max_{j!=y} z_j - z_y                    (CW-inf evaluation)

Random starts (``init``):
  uniform   delta ~ U[-eps, eps]^d (linf) or (u - x) * min(1, eps/||u - x||) with u ~ U[0,1]^d
            (l2, advertorch's start towards a random image); then box-clipped
  normal    x + 0.001 * N(0, I), no projection (TRADES/MART)
  ball      linf: U[-eps, eps]^d; l2: eps * u * n/||n||, n ~ N(0, I), u ~ U(0, 1) (ReBAT's start)
  none      delta = 0
Steps: linf  x <- Proj(x + step * sign(g));  l2  x <- Proj(x + step * g / N(g)), N from the caller's
:class:`L2Rule` (the published attacks guard the division differently, docs/faithfulness.md D18).
Projection: clip to the eps-ball around x, then to the box [0, 1]; with ``box_first`` (advertorch's
L2 PGD, used by PGD-AT and Consistency-AT) the box clip comes first and the L2 rescale second.
Either order keeps the result inside both sets; they differ only where the box clip is active.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from rpat import distributed

NORMS = ("linf", "l2")
NORM_DISPLAY = {"linf": "Linf", "l2": "L2"}  # the paper's names
INITS = ("uniform", "normal", "ball", "none")
BN_MODES = ("eval", "train", "keep")


@contextlib.contextmanager
def bn_mode(model: nn.Module, mode: str) -> Iterator[None]:
    """Run the block with every module in ``mode`` ('eval', 'train' or 'keep'); restore each module's flag."""
    if mode not in BN_MODES:
        raise ValueError(f"bn mode {mode!r} not in {BN_MODES}")
    if mode == "keep":
        yield
        return
    saved = [(m, m.training) for m in model.modules()]
    model.train(mode == "train")
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def ce_loss(logits: torch.Tensor, y: torch.Tensor, ref: torch.Tensor | None = None) -> torch.Tensor:
    return F.cross_entropy(logits, y)


def kl_loss(logits: torch.Tensor, y: torch.Tensor, ref: torch.Tensor | None = None) -> torch.Tensor:
    return F.kl_div(F.log_softmax(logits, dim=1), F.softmax(ref, dim=1), reduction="sum")


def cw_margin_loss(logits: torch.Tensor, y: torch.Tensor, ref: torch.Tensor | None = None) -> torch.Tensor:
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(dim=1)
    return (other - true).mean()


INNER_LOSSES: dict[str, Callable[..., torch.Tensor]] = {"ce": ce_loss, "kl": kl_loss, "cw": cw_margin_loss}


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(p=2, dim=1).view(-1, *([1] * (t.dim() - 1)))


@dataclass(frozen=True)
class L2Rule:
    """How an L2 step normalises the gradient and how the eps-ball projection rescales (docs/faithfulness.md D18).

    step:        g / max(||g||, floor)  when ``floor`` > 0, else  g / (||g|| + add)
    projection:  ``renorm``: delta * eps / (||delta|| + 1e-7) where ||delta|| > eps (``Tensor.renorm``);
                 otherwise delta * min(1, eps / ||delta||).
    """

    add: float = 0.0
    floor: float = 0.0
    renorm: bool = False

    def __post_init__(self):
        if not (self.add > 0) ^ (self.floor > 0):
            raise ValueError(f"an L2 rule guards the step with exactly one of add, floor > 0 (got {self})")

    def direction(self, g: torch.Tensor) -> torch.Tensor:
        n = _flat_norm(g)
        return g / (n.clamp_min(self.floor) if self.floor > 0 else n + self.add)

    def shrink(self, delta: torch.Tensor, eps: float) -> torch.Tensor:
        if self.renorm:
            return delta.flatten(1).renorm(2, 0, eps).reshape_as(delta)
        n = _flat_norm(delta)
        return delta * torch.where(n > eps, eps / n, torch.ones_like(n))


# The published attacks' constants: advertorch's PGD (PGD-AT, Consistency-AT, evaluation), TRADES' and
# MART's own L2 branches, ReBAT's attack_pgd.
ADVERTORCH_L2 = L2Rule(floor=1e-6)
TRADES_L2 = L2Rule(add=1e-8, renorm=True)
REBAT_L2 = L2Rule(add=1e-10, renorm=True)


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str, box_first: bool = False,
            l2: L2Rule = ADVERTORCH_L2) -> torch.Tensor:
    """Project ``x_adv`` onto {x' : ||x' - x|| <= eps} then onto the box [0, 1] (or box first, then ball);
    the L2 rescale follows ``l2``."""
    if box_first:
        x_adv = x_adv.clamp(0.0, 1.0)
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    elif norm == "l2":
        delta = l2.shrink(delta, eps)
    else:
        raise ValueError(f"norm {norm!r} not in {NORMS}")
    return (x + delta).clamp(0.0, 1.0)


def random_start(x: torch.Tensor, eps: float, norm: str, init: str, generator: torch.Generator | None = None) -> torch.Tensor:
    def rand(fn, shape=x.shape):  # drawn for the whole global batch in a distributed step (rpat/distributed.py)
        return distributed.draw(fn, shape, generator=generator, device=x.device, dtype=x.dtype)

    if init == "none":
        return x.clone()
    if init == "normal":
        return x + 0.001 * rand(torch.randn)
    if init not in ("uniform", "ball"):
        raise ValueError(f"init {init!r} not in {INITS}")
    if norm == "linf":
        return (x + (2 * rand(torch.rand) - 1) * eps).clamp(0.0, 1.0)
    if init == "ball":
        n = rand(torch.randn)
        radius = rand(torch.rand, (x.shape[0],) + (1,) * (x.dim() - 1))
        return (x + eps * radius * n / _flat_norm(n).clamp_min(1e-12)).clamp(0.0, 1.0)
    delta = rand(torch.rand) - x
    delta = delta * torch.clamp(eps / _flat_norm(delta).clamp_min(1e-12), max=1.0)
    return (x + delta).clamp(0.0, 1.0)


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step: float,
    steps: int,
    norm: str = "linf",
    loss: str = "ce",
    init: str = "uniform",
    bn: str = "eval",
    ref_logits: torch.Tensor | None = None,
    box_first: bool = False,
    l2: L2Rule = ADVERTORCH_L2,
    generator: torch.Generator | None = None,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Maximise ``loss`` over the ``norm``-ball of radius ``eps`` around ``x`` with ``steps`` steps of size ``step``.

    ``bn`` is the module mode during the attack ('eval' for the four baselines, 'train' for ReBAT);
    the model's previous mode is restored. ``ref_logits`` feeds the KL loss (computed here in the
    attack's BN mode when omitted). ``l2`` holds the L2 step's and projection's constants (default:
    advertorch's, the evaluation adversary's). ``start`` replaces the random start (a start drawn for more
    examples than this batch, so that splitting them into batches leaves every example's start unchanged).
    Returns a detached tensor.
    """
    if norm not in NORMS:
        raise ValueError(f"norm {norm!r} not in {NORMS}")
    if eps < 0 or step < 0 or steps < 0:
        raise ValueError(f"eps, step and steps must be >= 0 (got {eps}, {step}, {steps})")
    inner = INNER_LOSSES[loss]
    x = x.detach()
    with bn_mode(model, bn):
        if loss == "kl" and ref_logits is None:
            with torch.no_grad():
                ref_logits = model(x)
        ref = ref_logits.detach() if ref_logits is not None else None
        x_adv = random_start(x, eps, norm, init, generator) if start is None else start.detach()
        for _ in range(steps):
            x_adv = x_adv.detach().requires_grad_(True)
            with torch.enable_grad():
                objective = inner(model(x_adv), y, ref)
                (g,) = torch.autograd.grad(objective, x_adv)
            with torch.no_grad():
                if norm == "linf":
                    x_adv = x_adv + step * g.sign()
                else:
                    x_adv = x_adv + step * l2.direction(g)
                x_adv = project(x_adv, x, eps, norm, box_first, l2)
        if init == "normal" and steps == 0:
            x_adv = project(x_adv, x, eps, norm)
    return x_adv.detach()


def uniform_noise(x: torch.Tensor, eps: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """clip(x + u, 0, 1), u ~ U[-eps, eps]^d: the 'random' perturbation of the paper's analysis."""
    u = (2 * distributed.draw(torch.rand, x.shape, generator=generator, device=x.device, dtype=x.dtype) - 1) * eps
    return (x + u).clamp(0.0, 1.0)
