"""Weight averaging of a model: ReBAT's teacher and ``train.weight_average`` (EMA, SWA) for every method.

One update rule serves all of them (docs/recipes.md "Weight averaging")::

    theta_avg <- d theta_avg + (1 - d) theta,   d = min(D, cap(n))

for every parameter and every BatchNorm running mean/variance, where D is the epoch's decay (0: the
average becomes an exact copy of the model) and n the number of models in the average since it last
was a copy. The rule's cap: ``constant`` 1 (ReBAT, plain EMA), ``ramp`` (1 + t)/(10 + t) with t = n - 1
(the decay ramp of Gowal et al. 2020 / Rebuffi et al. 2021), ``swa`` n/(n + 1) (with D = 1: the equal-weight
mean of every model since averaging began, Izmailov et al. 2018). Integer buffers (``num_batches_tracked``)
and constant buffers (the model's input normalisation, not part of its state) are copied, not averaged.

:class:`WeightAverage` is a :class:`torch.optim.swa_utils.AveragedModel` with ``use_buffers=True``: its
``module`` is the averaged network and its ``n_averaged`` buffer (n) is saved with it, so a resumed run
continues the same decay ramp. Its update is its own, not ``update_parameters``: that one reads
``n_averaged`` on the host every step (a device synchronisation) and blends integer buffers, whereas this
one keeps n on the host and reproduces the published ReBAT update bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

RULES = ("constant", "ramp", "swa")


def decay_cap(rule: str, n: int) -> float:
    """The largest decay the rule allows with ``n`` models in the average."""
    if rule == "ramp":
        return n / (n + 9.0)  # (1 + t) / (10 + t), t = n - 1 updates since the last copy
    if rule == "swa":
        return n / (n + 1.0)
    return 1.0


def step_decay(rule: str, decay: float, n: int) -> float:
    """The decay of one update: the epoch's ``decay`` capped by the rule (0 stays 0: a copy)."""
    return min(decay, decay_cap(rule, n)) if decay > 0 else 0.0


class WeightAverage(AveragedModel):
    def __init__(self, model: nn.Module, rule: str = "constant"):
        if rule not in RULES:
            raise ValueError(f"unknown averaging rule {rule!r}; rules: {', '.join(RULES)}")
        super().__init__(model, use_buffers=True)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.rule = rule
        persistent = set(self.module.state_dict())
        # per buffer of the module (in ``buffers()`` order): average it, or copy it
        self._averaged = [name in persistent and b.dtype.is_floating_point for name, b in self.module.named_buffers()]
        self.count = 1  # the average starts as a copy of the model: one model
        self.n_averaged.fill_(1)

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        """One update with the epoch's ``decay`` (see the module docstring); no host synchronisation."""
        d = step_decay(self.rule, decay, self.count)
        for avg, cur in zip(self.module.parameters(), model.parameters()):
            avg.mul_(d).add_(cur.detach(), alpha=1.0 - d)
        for avg, cur, blend in zip(self.module.buffers(), model.buffers(), self._averaged):
            if blend:
                avg.mul_(d).add_(cur.detach(), alpha=1.0 - d)
            else:
                avg.copy_(cur)
        self.count = self.count + 1 if d > 0 else 1
        self.n_averaged.fill_(self.count)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        out = super().load_state_dict(averaged_state(state_dict), strict=strict, assign=assign)
        self.count = int(self.n_averaged)
        return out


def averaged_state(state: dict) -> dict:
    """A saved average's state in the current layout: states saved before the average carried its step counter
    hold the averaged module's weights alone (one model in the average, as ReBAT's constant decay needs no more)."""
    if "n_averaged" in state:
        return state
    return {"n_averaged": torch.tensor(1), **{f"module.{k}": v for k, v in state.items()}}
