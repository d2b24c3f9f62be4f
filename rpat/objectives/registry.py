"""The objective registry and the RPAT term (re-exported by :mod:`rpat.objectives`): :class:`Objective`,
:func:`register`, :func:`compute_loss` and the pieces objectives share; the methods' modules import it to register
themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from rpat import registries
from rpat.settings import RpatSettings, Threat

Tensor = torch.Tensor


@dataclass
class LossOut:
    loss: Tensor
    parts: dict[str, Tensor]
    logits: dict[str, Tensor] = field(default_factory=dict)  # 'clean', 'adv' when computed


@dataclass(frozen=True)
class StepContext:
    """What a loss may need beyond its inputs: the weight-averaged teacher (no gradient) and whether the
    method's regulariser is active in this epoch."""

    teacher: Callable[[Tensor], Tensor] | None = None
    reg_active: bool = True


@dataclass(frozen=True)
class EpochPlan:
    """One epoch's training settings as an objective plans them: the attack's threat model, whether its
    regulariser is on, the decay of the weight average (0: the average is a copy of the model) and the
    average's BatchNorm mode while it serves as a teacher ('eval' or 'train')."""

    threat: Threat
    reg_active: bool = True
    average_decay: float = 0.0
    average_bn: str = "eval"


def constant_plan(hp: Mapping, threat: Threat, epoch: int, resumed: bool = False) -> EpochPlan:
    return EpochPlan(threat)


@dataclass(frozen=True)
class Objective:
    name: str
    description: str
    attack: Callable[..., Tensor]
    loss: Callable[..., LossOut]
    defaults: dict = field(default_factory=dict)
    supports_rpat: bool = True
    views: int = 1  # augmented views per image in a batch (Consistency-AT: 2)
    # A loss that *replaces* the baseline when RPAT is on, instead of adding the generic MSE term:
    # rpat_loss(model, x, y, x_adv, hp, ctx, rpat) -> LossOut (RPAT++ replaces ReBAT's regulariser).
    rpat_loss: Callable[..., LossOut] | None = None
    uses_teacher: bool = False  # the loss needs a weight-averaged model (StepContext.teacher)
    # AWP (train.awp, rpat/awp.py) may perturb the weights against this objective's own ``loss`` (without
    # RPAT): adversarial training losses only, whose value depends on the model alone (no teacher).
    supports_awp: bool = False
    # Validation metric that picks the best checkpoint: 'pgd' (robust accuracy) for adversarial
    # training, 'clean' for standard and noise training, whose robust accuracy is ~0 throughout.
    select_on: str = "pgd"
    # epoch_plan(hp, threat, epoch, resumed) -> EpochPlan; ``resumed``: the first epoch a resumed job trains
    epoch_plan: Callable[..., EpochPlan] = constant_plan
    # after_step(model, x, hp, amp): called after each optimiser step (ReBAT: a clean train-mode forward)
    after_step: Callable[..., None] | None = None
    # provide(settings, out_dir, tracking) -> train.json record: an objective whose weights come from elsewhere
    # writes the cell's checkpoints and train.json itself instead of training (pretrained zoo models).
    provide: Callable[..., dict] | None = None
    # The attack and loss accept probability-vector targets (CutMix, data.cutmix); otherwise y stays integer.
    mixed_targets: bool = False
    # Allowed values of string hyperparameters (the config schema's enums), e.g. {"attack_bn": BN_MODES}.
    choices: dict = field(default_factory=dict)
    # What each hyperparameter of ``defaults`` does and where its default comes from (the config schema's
    # descriptions, config/README.md); nested keys dotted, e.g. "stronger_attack.eps".
    help: dict = field(default_factory=dict)
    display: str = ""  # the paper's name (tables, plots)
    rpat_display: str = ""  # the name with RPAT on (default: display + "+RPAT")

    def label(self, rpat: bool) -> str:
        """The name tables print for this objective with RPAT off or on."""
        base = self.display or self.name
        return (self.rpat_display or f"{base}+RPAT") if rpat else base


OBJECTIVES: dict[str, Objective] = {}


def register(obj: Objective) -> Objective:
    return registries.add(OBJECTIVES, obj.name, obj, "objective")


# ---------------------------------------------------------------------------------------------
# The RPAT term


def rpat_term(z_mid: Tensor, z_clean: Tensor, z_adv: Tensor, clean_weight: float = 0.5) -> Tensor:
    """MSE(z(x_mid), r z(x) + (1-r) z(x')) with x_mid = r x + (1-r) x', r = ``clean_weight``.

    This is the released code's form (docs/faithfulness.md "The RPAT term"). The paper prints the slope
    form MSE((z(x~)-z(x))/a, (z(x')-z(x~))/(1-a)) with a = 1-r the weight of the adversarial end;
    code form = (a(1-a))^2 * slope form, i.e. 1/16 of it at r = 0.5. Nothing is detached.
    """
    target = clean_weight * z_clean + (1.0 - clean_weight) * z_adv
    return F.mse_loss(z_mid, target)


def interpolate(x: Tensor, x_adv: Tensor, clean_weight: float) -> Tensor:
    """x_mid = r x + (1-r) x'."""
    return clean_weight * x + (1.0 - clean_weight) * x_adv


def kl_batchmean(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """KL_bm(softmax(p) || softmax(q)); gradients flow into both sides."""
    return F.kl_div(F.log_softmax(q_logits, dim=1), F.softmax(p_logits, dim=1), reduction="batchmean")


def compute_loss(
    objective: Objective,
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    x_adv: Tensor,
    hp: Mapping | None = None,
    rpat: RpatSettings | Mapping | None = None,
    *,
    teacher: Callable[[Tensor], Tensor] | None = None,
    reg_active: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Baseline loss, plus ``rpat.weight * rpat_term`` when ``rpat`` is given (a mapping's missing keys
    take the defaults of :class:`rpat.settings.RpatSettings`).

    Forward order follows the reference: the baseline's forwards, then x_mid, then a clean forward
    only if the baseline did not compute one (PGD-AT, Consistency-AT).
    Parts: the baseline's parts, ``rpat`` (unweighted), ``rpat_weighted``, and ``total``.
    """
    hp = {**objective.defaults, **(hp or {})}
    rpat = RpatSettings.of(rpat)
    ctx = StepContext(teacher=teacher, reg_active=reg_active)
    if rpat is not None and not objective.supports_rpat:
        raise ValueError(f"objective {objective.name!r} has no RPAT variant")
    if rpat is not None and objective.rpat_loss is not None:
        out = objective.rpat_loss(model, x, y, x_adv, hp, ctx, rpat)
        return out.loss, {**out.parts, "total": out.loss}
    out = objective.loss(model, x, y, x_adv, hp, ctx)
    loss, parts = out.loss, dict(out.parts)
    if rpat is not None:
        r, lam = float(rpat.clean_weight), float(rpat.weight)
        z_mid = model(interpolate(x, x_adv, r))
        z_clean = out.logits["clean"] if "clean" in out.logits else model(x)
        term = rpat_term(z_mid, z_clean, out.logits["adv"], r)
        parts["rpat"] = term
        parts["rpat_weighted"] = lam * term
        loss = loss + lam * term
    parts["total"] = loss
    return loss, parts


def objective_info() -> list[dict]:
    return [
        {"name": o.name, "display": o.label(False), "description": o.description, "defaults": o.defaults,
         "supports_rpat": o.supports_rpat, "rpat_display": o.label(True) if o.supports_rpat else None,
         "rpat_variant": "replaces the regulariser (RPAT++)" if o.rpat_loss else
         ("adds lambda * MSE term" if o.supports_rpat else None),
         "views": o.views, "uses_teacher": o.uses_teacher, "supports_awp": o.supports_awp}
        for o in OBJECTIVES.values()
    ]
