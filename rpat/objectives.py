"""Training objectives and the RPAT term.

An objective is two pure pieces:
  * ``attack(model, x, y, threat, hp, generator) -> x_adv``: how it generates its training inputs;
  * ``loss(model, x, y, x_adv, hp) -> LossOut``: the loss on given inputs, its named parts, and
    the logits it computed (so RPAT can reuse them, REFERENCE.md table 1.10).
``compute_loss`` composes a baseline with the RPAT toggle. To evaluate any objective on
precomputed adversarial inputs (no attack involved)::

    from rpat.objectives import OBJECTIVES, compute_loss
    loss, parts = compute_loss(OBJECTIVES["trades"], model, x, y, x_adv, hp={"beta": 6.0},
                               rpat={"weight": 1.0, "clean_weight": 0.5})

``model`` is any callable mapping a batch to logits; every forward is a separate call (BatchNorm
batch statistics depend on the batch, DECISIONS.md item 2). ``hp`` holds the method's own
hyperparameters (defaults in ``Objective.defaults``); ``rpat=None`` turns RPAT off.

Notation: z(.) logits, CE mean cross-entropy, KL_bm(p||q) = (1/B) sum_i sum_c p_ic log(p_ic/q_ic),
MSE mean over batch x classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from rpat import attacks

Tensor = torch.Tensor


@dataclass
class LossOut:
    loss: Tensor
    parts: dict[str, Tensor]
    logits: dict[str, Tensor] = field(default_factory=dict)  # 'clean', 'adv' when computed


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
    # rpat_loss(model, x, y, x_adv, hp, rpat) -> LossOut (RPAT++ replaces ReBAT's regulariser).
    rpat_loss: Callable[..., LossOut] | None = None
    uses_teacher: bool = False  # needs hp['teacher'], a weight-averaged model (ReBAT, RPAT++)
    # Validation metric that picks the best checkpoint: 'pgd' (robust accuracy) for adversarial
    # training, 'clean' for standard and noise training, whose robust accuracy is ~0 throughout.
    select_on: str = "pgd"


OBJECTIVES: dict[str, Objective] = {}


def register(obj: Objective) -> Objective:
    if obj.name in OBJECTIVES:
        raise ValueError(f"objective {obj.name!r} is registered twice")
    OBJECTIVES[obj.name] = obj
    return obj


# ---------------------------------------------------------------------------------------------
# The RPAT term


def rpat_term(z_mid: Tensor, z_clean: Tensor, z_adv: Tensor, clean_weight: float = 0.5) -> Tensor:
    """MSE(z(x_mid), r z(x) + (1-r) z(x')) with x_mid = r x + (1-r) x', r = ``clean_weight``.

    This is the released code's form (DECISIONS.md item 1). The paper prints the slope form
    MSE((z(x~)-z(x))/a, (z(x')-z(x~))/(1-a)) with a = 1-r the weight of the adversarial end;
    code form = (a(1-a))^2 * slope form, i.e. 1/16 of it at r = 0.5. Nothing is detached.
    """
    target = clean_weight * z_clean + (1.0 - clean_weight) * z_adv
    return F.mse_loss(z_mid, target)


def interpolate(x: Tensor, x_adv: Tensor, clean_weight: float) -> Tensor:
    """x_mid = r x + (1-r) x'."""
    return clean_weight * x + (1.0 - clean_weight) * x_adv


RPAT_DEFAULTS = {"weight": 1.0, "clean_weight": 0.5, "start_epoch": 1}


def compute_loss(
    objective: Objective,
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    x_adv: Tensor,
    hp: dict | None = None,
    rpat: dict | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Baseline loss, plus ``rpat['weight'] * rpat_term`` when ``rpat`` is given.

    Forward order follows the reference: the baseline's forwards, then x_mid, then a clean forward
    only if the baseline did not compute one (PGD-AT, Consistency-AT).
    Parts: the baseline's parts, ``rpat`` (unweighted), ``rpat_weighted``, and ``total``.
    """
    hp = {**objective.defaults, **(hp or {})}
    if rpat is not None and not objective.supports_rpat:
        raise ValueError(f"objective {objective.name!r} has no RPAT variant")
    if rpat is not None and objective.rpat_loss is not None:
        out = objective.rpat_loss(model, x, y, x_adv, hp, {**RPAT_DEFAULTS, **rpat})
        parts = dict(out.parts)
        parts["total"] = out.loss
        return out.loss, parts
    out = objective.loss(model, x, y, x_adv, hp)
    loss, parts = out.loss, dict(out.parts)
    if rpat is not None:
        r = float(rpat.get("clean_weight", RPAT_DEFAULTS["clean_weight"]))
        lam = float(rpat.get("weight", RPAT_DEFAULTS["weight"]))
        z_mid = model(interpolate(x, x_adv, r))
        z_clean = out.logits["clean"] if "clean" in out.logits else model(x)
        term = rpat_term(z_mid, z_clean, out.logits["adv"], r)
        parts["rpat"] = term
        parts["rpat_weighted"] = lam * term
        loss = loss + lam * term
    parts["total"] = loss
    return loss, parts


# ---------------------------------------------------------------------------------------------
# Attacks used for training


def pgd_attack(model, x, y, threat: dict, hp: dict, generator=None) -> Tensor:
    """PGD on mean CE, uniform random start, advertorch's L2 projection order (REFERENCE.md 2.1)."""
    return attacks.pgd(
        model, x, y, eps=threat["eps"], step=threat["step"], steps=threat["steps"], norm=threat["norm"],
        loss="ce", init="uniform", bn=threat.get("bn", "eval"), box_first=True, generator=generator,
    )


def trades_attack(model, x, y, threat: dict, hp: dict, generator=None) -> Tensor:
    """Maximise sum KL(softmax(z(x)) || softmax(z(x'))) from x + 0.001 N(0, I) (REFERENCE.md 2.2)."""
    return attacks.pgd(
        model, x, y, eps=threat["eps"], step=threat["step"], steps=threat["steps"], norm=threat["norm"],
        loss="kl", init="normal", bn=threat.get("bn", "eval"), generator=generator,
    )


def mart_attack(model, x, y, threat: dict, hp: dict, generator=None) -> Tensor:
    """PGD on mean CE from x + 0.001 N(0, I) (REFERENCE.md 2.3)."""
    return attacks.pgd(
        model, x, y, eps=threat["eps"], step=threat["step"], steps=threat["steps"], norm=threat["norm"],
        loss="ce", init="normal", bn=threat.get("bn", "eval"), generator=generator,
    )


def no_attack(model, x, y, threat: dict, hp: dict, generator=None) -> Tensor:
    return x.detach()


def noise_attack(model, x, y, threat: dict, hp: dict, generator=None) -> Tensor:
    """clip(x + U[-eps, eps]^d, 0, 1)."""
    return attacks.uniform_noise(x.detach(), threat["eps"], generator)


# ---------------------------------------------------------------------------------------------
# Losses


def kl_batchmean(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """KL_bm(softmax(p) || softmax(q)); gradients flow into both sides."""
    return F.kl_div(F.log_softmax(q_logits, dim=1), F.softmax(p_logits, dim=1), reduction="batchmean")


def ce_loss(model, x, y, x_adv, hp) -> LossOut:
    """L = CE(z(x), y)."""
    z = model(x)
    ce = F.cross_entropy(z, y)
    return LossOut(ce, {"ce": ce}, {"clean": z})


def adversarial_ce_loss(model, x, y, x_adv, hp) -> LossOut:
    """L = CE(z(x'), y) (PGD-AT; with noisy x', training on uniform noise)."""
    z_adv = model(x_adv)
    ce = F.cross_entropy(z_adv, y)
    return LossOut(ce, {"ce": ce}, {"adv": z_adv})


def trades_loss(model, x, y, x_adv, hp) -> LossOut:
    """L = CE(z(x), y) + beta KL_bm(softmax(z2(x)) || softmax(z(x'))).

    z2 is a second, separate clean forward as in the reference (REFERENCE.md 1.4) unless
    ``hp['second_clean_forward']`` is false, which reuses z(x) (same value; one forward fewer,
    BatchNorm running statistics updated once instead of twice).
    """
    z_clean = model(x)
    z_adv = model(x_adv)
    z_clean2 = model(x) if hp.get("second_clean_forward", True) else z_clean
    ce = F.cross_entropy(z_clean, y)
    kl = kl_batchmean(z_clean2, z_adv)
    beta = float(hp["beta"])
    return LossOut(ce + beta * kl, {"ce": ce, "trades_kl": kl, "trades_kl_weighted": beta * kl},
                   {"clean": z_clean, "adv": z_adv})


def mart_loss(model, x, y, x_adv, hp) -> LossOut:
    """MART (REFERENCE.md 1.6).

    y'_i = most likely wrong class under p_adv;
    L_adv = CE(z(x'), y) + (1/B) sum_i -log(1.0001 - p_adv[i, y'_i] + 1e-12)
    L_rob = (1/B) sum_i KL(p_nat_i || p_adv_i + 1e-12) * (1.0000001 - p_nat[i, y_i])
    L = L_adv + beta L_rob.
    """
    z_clean = model(x)
    z_adv = model(x_adv)
    p_adv = F.softmax(z_adv, dim=1)
    p_nat = F.softmax(z_clean, dim=1)
    top2 = p_adv.topk(2, dim=1).indices
    runner_up = torch.where(top2[:, 0] == y, top2[:, 1], top2[:, 0])
    ce = F.cross_entropy(z_adv, y)
    bce = (-torch.log(1.0001 - p_adv.gather(1, runner_up[:, None]).squeeze(1) + 1e-12)).mean()
    # xlogy: a clean probability that underflows to 0 contributes 0 (KLDivLoss in the reference), not NaN
    kl = (torch.xlogy(p_nat, p_nat) - p_nat * torch.log(p_adv + 1e-12)).sum(dim=1)
    rob = (kl * (1.0000001 - p_nat.gather(1, y[:, None]).squeeze(1))).mean()
    beta = float(hp["beta"])
    loss = ce + bce + beta * rob
    return LossOut(loss, {"ce": ce, "mart_bce": bce, "mart_kl": rob, "mart_kl_weighted": beta * rob},
                   {"clean": z_clean, "adv": z_adv})


def js_divergence(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """0.5 [KL_bm(p || m) + KL_bm(q || m)], p = softmax(z1/T), q = softmax(z2/T), m = (p+q)/2 clamped at 1e-8."""
    p = F.softmax(z1 / temperature, dim=1)
    q = F.softmax(z2 / temperature, dim=1)
    log_m = ((p + q) / 2).clamp_min(1e-8).log()
    return 0.5 * (F.kl_div(log_m, p, reduction="batchmean") + F.kl_div(log_m, q, reduction="batchmean"))


def consistency_loss(model, x, y, x_adv, hp) -> LossOut:
    """Consistency-AT (REFERENCE.md 1.8): the batch holds two views [x1; x2] with labels [y; y].

    L = CE(z(x'), y_pair) + w JS_T(z(x'_1), z(x'_2)), w = ``weight``, T = ``temperature``.
    """
    z_adv = model(x_adv)
    ce = F.cross_entropy(z_adv, y)
    z1, z2 = z_adv.chunk(2)
    js = js_divergence(z1, z2, float(hp["temperature"]))
    w = float(hp["weight"])
    return LossOut(ce + w * js, {"ce": ce, "consistency_js": js, "consistency_js_weighted": w * js}, {"adv": z_adv})


def rebat_attack(model, x, y, threat: dict, hp: dict, generator=None) -> Tensor:
    """PGD on mean CE with ReBAT's start (REFERENCE.md 2.4), BatchNorm in ``hp['attack_bn']`` mode (train)."""
    return attacks.pgd(
        model, x, y, eps=threat["eps"], step=threat["step"], steps=threat["steps"], norm=threat["norm"],
        loss="ce", init="ball", bn=hp.get("attack_bn", "train"), generator=generator,
    )


def _guard_huge(loss: Tensor, reg: Tensor) -> Tensor:
    """A regulariser >= 1e10 makes the loss NaN, so the epoch-end check stops the run (the reference
    silently dropped it, DECISIONS.md item 3); no host synchronisation here."""
    return torch.where(reg < 1e10, loss, torch.full_like(loss, float("nan")))


def rebat_loss(model, x, y, x_adv, hp) -> LossOut:
    """ReBAT (REFERENCE.md 1.11): L = CE(z(x'), y) + beta KL_bm(softmax(w(x')) || softmax(z(x'))),
    w = hp['teacher'] (weight-averaged model, no gradient); the KL term only when hp['reg_active']."""
    z_adv = model(x_adv)
    ce = F.cross_entropy(z_adv, y)
    parts = {"ce": ce}
    loss = ce
    if hp.get("reg_active", True):
        with torch.no_grad():
            w = hp["teacher"](x_adv)
        kl = kl_batchmean(w, z_adv)
        beta = float(hp["beta"])
        loss = _guard_huge(ce + beta * kl, kl)
        parts.update({"rebat_kl": kl, "rebat_kl_weighted": beta * kl})
    return LossOut(loss, parts, {"adv": z_adv})


def rpat_plus_plus_loss(model, x, y, x_adv, hp, rpat) -> LossOut:
    """RPAT++ (DECISIONS.md item 3): ReBAT with its KL term replaced by the robust-perception KL term

        L = CE(z(x'), y) + lam KL_bm( softmax(w(x_mid) - r w(x)) || softmax((1-r) z(x')) ),
        x_mid = r x + (1-r) x',  r = rpat['clean_weight'],  w = the weight-averaged teacher (no gradient).

    Robust perception asks z(x_mid) ~ r z(x) + (1-r) z(x'): the teacher supplies z(x_mid) - r z(x),
    the online model's (1-r) z(x') must match it. The reference writes it with the delta weight
    a = 1-r (x + a delta, student a z, target minus (1-a) z(x)); identical at r = 0.5."""
    z_adv = model(x_adv)
    ce = F.cross_entropy(z_adv, y)
    parts = {"ce": ce}
    loss = ce
    if hp.get("reg_active", True):
        r = float(rpat["clean_weight"])
        with torch.no_grad():
            u = hp["teacher"](x)
            v = hp["teacher"](interpolate(x, x_adv, r))
        term = kl_batchmean(v - r * u, (1.0 - r) * z_adv)
        lam = float(rpat["weight"])
        loss = _guard_huge(ce + lam * term, term)
        parts.update({"rpat": term, "rpat_weighted": lam * term})
    return LossOut(loss, parts, {"adv": z_adv})


register(Objective("ce", "standard training: CE on clean inputs (no attack)", no_attack, ce_loss, supports_rpat=False,
                   select_on="clean"))
register(Objective("noise", "CE on clip(x + U[-eps, eps]) (the paper's perception analysis)", noise_attack,
                   adversarial_ce_loss, select_on="clean"))
register(Objective("pgd_at", "PGD-AT (Madry et al.): CE on PGD examples", pgd_attack, adversarial_ce_loss))
register(Objective("trades", "TRADES (Zhang et al.): CE + beta KL(clean || adv)", trades_attack, trades_loss,
                   defaults={"beta": 6.0, "second_clean_forward": True}))
register(Objective("mart", "MART (Wang et al.): boosted CE + beta misclassification-aware KL", mart_attack, mart_loss,
                   defaults={"beta": 6.0}))
register(Objective("consistency", "Consistency-AT (Tack et al.): PGD-AT on two views + JS consistency",
                   pgd_attack, consistency_loss, defaults={"weight": 1.0, "temperature": 0.5}, views=2))
register(Objective("rebat", "ReBAT (Wang et al.): PGD-AT + weight averaging + KL to the averaged model; "
                   "+RPAT is RPAT++ (the KL term replaced by the robust-perception KL term)",
                   rebat_attack, rebat_loss, rpat_loss=rpat_plus_plus_loss, uses_teacher=True,
                   defaults={"beta": 1.0, "decay": 0.999, "warmup_epoch": 106, "attack_bn": "train",
                             "clean_bn_forward": True,
                             "stronger_attack": {"enabled": False, "eps": 10 / 255, "steps": 12, "start_epoch": 101}}))


def objective_info() -> list[dict]:
    return [
        {"name": o.name, "description": o.description, "defaults": o.defaults, "supports_rpat": o.supports_rpat,
         "rpat_variant": "replaces the regulariser (RPAT++)" if o.rpat_loss else
         ("adds lambda * MSE term" if o.supports_rpat else None),
         "views": o.views, "uses_teacher": o.uses_teacher}
        for o in OBJECTIVES.values()
    ]
