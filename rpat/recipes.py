"""The training recipes that compose with every objective (docs/recipes.md): weight averaging (EMA, SWA),
adversarial weight perturbation (AWP), an ε ramp-up, extra training data. Here: how they change one epoch's
plan (the combinations a config may not ask for are checked with the config: rpat/config.py).

ε ramp-up (``train.eps_warmup_epochs`` = W > 0): epoch e trains against ε·min(1, e/W), the attack's step
size unchanged (Andriushchenko & Flammarion 2020 ramp ε linearly over SVHN's first 5 epochs, per iteration;
rpat per epoch, through the epoch plan). Validation and evaluation always use the full ε.
"""

from __future__ import annotations

from dataclasses import replace

from rpat.objectives import EpochPlan, Objective
from rpat.settings import CellSettings, WeightAverageSettings


def eps_scale(epoch: int, warmup_epochs: int) -> float:
    """The fraction of ε trained against in ``epoch`` (1-based): min(1, epoch / W), 1 without a ramp."""
    return min(1.0, epoch / warmup_epochs) if warmup_epochs > 0 else 1.0


def average_decay(wa: WeightAverageSettings, epoch: int) -> float:
    """The epoch's decay of ``train.weight_average`` (0: the average is a copy of the model; SWA: 1, the
    equal-weight cap of rpat/averaging.py decides)."""
    if wa.kind == "swa":
        return 1.0 if epoch >= wa.swa_start else 0.0
    return wa.decay if epoch > wa.warmup_epochs else 0.0


def average_rule(wa: WeightAverageSettings) -> str:
    """The per-step cap of rpat/averaging.py for ``train.weight_average`` (``constant`` when it is off: a
    teacher's decay comes from its objective's epoch plan)."""
    if wa.kind == "swa":
        return "swa"
    return "ramp" if wa.kind == "ema" and wa.ramp else "constant"


def epoch_plan(objective: Objective, s: CellSettings, epoch: int, resumed: bool = False) -> EpochPlan:
    """The objective's plan for ``epoch`` (``resumed``: the first epoch of a resumed job) with the recipes
    applied: ε ramp-up, weight-average decay."""
    plan = objective.epoch_plan(s.method, s.threat, epoch, resumed=resumed)
    changes = {}
    scale = eps_scale(epoch, s.train.eps_warmup_epochs)
    if scale < 1.0:
        changes["threat"] = plan.threat.replace(eps=plan.threat.eps * scale)
    if s.train.weight_average.kind != "none":
        changes["average_decay"] = average_decay(s.train.weight_average, epoch)
    return replace(plan, **changes) if changes else plan
