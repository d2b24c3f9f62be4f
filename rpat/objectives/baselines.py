"""Standard training, noise training and the paper's four baselines: PGD-AT, TRADES, MART, Consistency-AT.

Each is one :func:`register` call of an attack and a loss; the docstrings give the math, and
docs/faithfulness.md what the published code does and where rpat departs from it.
"""

from __future__ import annotations

from functools import partial
from typing import Mapping

import torch
import torch.nn.functional as F

from rpat import attacks
from rpat.objectives.registry import LossOut, Objective, StepContext, Tensor, kl_batchmean, register
from rpat.settings import Threat

# ---------------------------------------------------------------------------------------------
# Attacks used for training


def threat_pgd(model, x, y, threat: Threat, hp: Mapping, generator=None, *, loss: str, init: str,
               box_first: bool = False, bn: str = "eval", l2: attacks.L2Rule = attacks.ADVERTORCH_L2) -> Tensor:
    """PGD with the threat model's eps, step size and number of steps."""
    return attacks.pgd(model, x, y, eps=threat.eps, step=threat.step, steps=threat.steps, norm=threat.norm,
                       loss=loss, init=init, bn=bn, box_first=box_first, l2=l2, generator=generator)


# PGD on mean CE, uniform random start, advertorch's L2 constants and projection order (PGD-AT, Consistency-AT).
pgd_attack = partial(threat_pgd, loss="ce", init="uniform", box_first=True)
# Maximise sum KL(softmax(z(x)) || softmax(z(x'))) from x + 0.001 N(0, I), TRADES' L2 constants (TRADES).
trades_attack = partial(threat_pgd, loss="kl", init="normal", l2=attacks.TRADES_L2)
# PGD on mean CE from x + 0.001 N(0, I), the same L2 constants (MART).
mart_attack = partial(threat_pgd, loss="ce", init="normal", l2=attacks.TRADES_L2)


def no_attack(model, x, y, threat: Threat, hp: Mapping, generator=None) -> Tensor:
    return x.detach()


def noise_attack(model, x, y, threat: Threat, hp: Mapping, generator=None) -> Tensor:
    """clip(x + U[-eps, eps]^d, 0, 1)."""
    return attacks.uniform_noise(x.detach(), threat.eps, generator)


# ---------------------------------------------------------------------------------------------
# Losses


def ce_loss(model, x, y, x_adv, hp, ctx: StepContext | None = None) -> LossOut:
    """L = CE(z(x), y)."""
    z = model(x)
    ce = F.cross_entropy(z, y)
    return LossOut(ce, {"ce": ce}, {"clean": z})


def adversarial_ce_loss(model, x, y, x_adv, hp, ctx: StepContext | None = None) -> LossOut:
    """L = CE(z(x'), y) (PGD-AT; with noisy x', training on uniform noise)."""
    z_adv = model(x_adv)
    ce = F.cross_entropy(z_adv, y)
    return LossOut(ce, {"ce": ce}, {"adv": z_adv})


def trades_loss(model, x, y, x_adv, hp, ctx: StepContext | None = None) -> LossOut:
    """L = CE(z(x), y) + beta KL_bm(softmax(z2(x)) || softmax(z(x'))).

    z2 is a second, separate clean forward as in the published code unless
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


def mart_loss(model, x, y, x_adv, hp, ctx: StepContext | None = None) -> LossOut:
    """MART.

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


def consistency_loss(model, x, y, x_adv, hp, ctx: StepContext | None = None) -> LossOut:
    """Consistency-AT: the batch holds two views [x1; x2] with labels [y; y].

    L = CE(z(x'), y_pair) + w JS_T(z(x'_1), z(x'_2)), w = ``weight``, T = ``temperature``.
    """
    z_adv = model(x_adv)
    ce = F.cross_entropy(z_adv, y)
    z1, z2 = z_adv.chunk(2)
    js = js_divergence(z1, z2, float(hp["temperature"]))
    w = float(hp["weight"])
    return LossOut(ce + w * js, {"ce": ce, "consistency_js": js, "consistency_js_weighted": w * js}, {"adv": z_adv})


register(Objective("ce", "standard training: CE on clean inputs (no attack)", no_attack, ce_loss, supports_rpat=False,
                   select_on="clean", display="Standard"))
register(Objective("noise", "CE on clip(x + U[-eps, eps]) (the paper's perception analysis)", noise_attack,
                   adversarial_ce_loss, select_on="clean", display="Noise"))
register(Objective("pgd_at", "PGD-AT (Madry et al.): CE on PGD examples", pgd_attack, adversarial_ce_loss,
                   supports_awp=True, display="PGD-AT"))
register(Objective("trades", "TRADES (Zhang et al.): CE + beta KL(clean || adv)", trades_attack, trades_loss,
                   defaults={"beta": 6.0, "second_clean_forward": True}, supports_awp=True, display="TRADES",
                   help={"beta": "β, the weight of the KL term (Zhang et al. 2019, TRADES; 6 in the RPAT paper)",
                         "second_clean_forward": "a second train-mode clean forward as the KL target, as the RPAT "
                         "paper's released code does; false reuses the first clean logits (docs/faithfulness.md D2)"}))
register(Objective("mart", "MART (Wang et al.): boosted CE + beta misclassification-aware KL", mart_attack, mart_loss,
                   defaults={"beta": 6.0}, supports_awp=True, display="MART",
                   help={"beta": "β, the weight of the misclassification-aware KL term (Wang et al. 2020, MART; 6 "
                         "in the RPAT paper, docs/faithfulness.md D4)"}))
register(Objective("consistency", "Consistency-AT (Tack et al.): PGD-AT on two views + JS consistency",
                   pgd_attack, consistency_loss, defaults={"weight": 1.0, "temperature": 0.5}, views=2,
                   help={"weight": "the weight of the Jensen-Shannon consistency term between the two views' "
                         "adversarial predictions (Tack et al. 2022)",
                         "temperature": "the softmax temperature of the consistency term (Tack et al. 2022)"},
                   supports_awp=True, display="Consistency-AT"))
