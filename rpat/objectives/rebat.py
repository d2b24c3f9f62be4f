"""ReBAT (Wang et al.) and RPAT++ (ReBAT with its regulariser replaced by the robust-perception KL term).

Both train on PGD examples generated with BatchNorm in train mode, keep a weight-averaged copy of the
model as a teacher, and switch their regulariser on (and start averaging) at ``warmup_epoch``; the
epoch plan and the after-step hook below carry that schedule, so the training loop stays generic.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from rpat import attacks
from rpat.objectives.registry import (EpochPlan, LossOut, Objective, StepContext, Tensor, interpolate, kl_batchmean,
                             register)
from rpat.settings import RpatSettings, Threat


class _TwiceForward(nn.Module):
    """Calls the network twice per attack step and returns the second output, as the published attack does
    with CutMix targets: the first forward only moves BatchNorm running statistics (no gradient needed)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            self.net(x)
        return self.net(x)


def rebat_attack(model, x, y, threat: Threat, hp: Mapping, generator=None) -> Tensor:
    """PGD on mean CE (``y`` integer labels or CutMix probability vectors) with ReBAT's start (uniform in the
    ball) and L2 constants, BatchNorm in ``hp['attack_bn']`` mode (train).

    The published attack's extra forwards, which change only BatchNorm running statistics
    (docs/faithfulness.md D17): with ``final_forward`` one more forward on the final x' (its restart
    selection); with ``cutmix_double_forward`` and probability targets, two forwards per step."""
    bn = hp.get("attack_bn", "train")
    twice = y.is_floating_point() and hp.get("cutmix_double_forward", True)
    x_adv = attacks.pgd(_TwiceForward(model) if twice else model, x, y, eps=threat.eps, step=threat.step,
                        steps=threat.steps, norm=threat.norm, loss="ce", init="ball", bn=bn, l2=attacks.REBAT_L2,
                        generator=generator)
    if hp.get("final_forward", True):
        with torch.no_grad(), attacks.bn_mode(model, bn):
            model(x_adv)
    return x_adv


TEACHER_BN_FIRST_EPOCH = ("eval", "train", "train_and_resume")


def rebat_epoch_plan(hp: Mapping, threat: Threat, epoch: int, resumed: bool = False) -> EpochPlan:
    """From ``warmup_epoch`` on, the regulariser is active and the average decays with ``decay`` (before it,
    decay 0 keeps the average an exact copy); from ``stronger_attack.start_epoch`` on, the optional stronger
    attack (eps, steps) replaces the threat model's training attack.

    The teacher's BatchNorm mode (docs/faithfulness.md D19): eval, except with ``teacher_bn_first_epoch``
    ``train`` in the first averaging epoch, and with ``train_and_resume`` also in the first epoch a resumed
    job trains (``resumed``), as the published code's freshly copied teacher."""
    stronger = hp.get("stronger_attack") or {}
    if stronger.get("enabled") and epoch >= stronger["start_epoch"]:
        threat = threat.replace(eps=stronger["eps"], steps=stronger["steps"])
    active = epoch >= hp["warmup_epoch"]
    mode = hp.get("teacher_bn_first_epoch", "eval")
    if mode not in TEACHER_BN_FIRST_EPOCH:
        raise ValueError(f"teacher_bn_first_epoch {mode!r} not in {TEACHER_BN_FIRST_EPOCH}")
    fresh = epoch == max(hp["warmup_epoch"], 1) or (resumed and mode == "train_and_resume")
    teacher_bn = "train" if active and fresh and mode != "eval" else "eval"
    return EpochPlan(threat, reg_active=active, average_decay=hp["decay"] if active else 0.0, average_bn=teacher_bn)


def rebat_after_step(model, x: Tensor, hp: Mapping, amp) -> None:
    """The published code's logging-only clean forward in train mode after each step: BatchNorm running
    statistics see the clean batch (``clean_bn_forward``)."""
    if hp["clean_bn_forward"]:
        with torch.no_grad(), amp:
            model(x)


def _guard_huge(loss: Tensor, reg: Tensor) -> Tensor:
    """A regulariser >= 1e10 makes the loss NaN, so the epoch-end check stops the run (the published code
    silently dropped it, docs/faithfulness.md); no host synchronisation here."""
    return torch.where(reg < 1e10, loss, torch.full_like(loss, float("nan")))


def _teacher_regularised(model, x_adv, y, ctx: StepContext, weight: float, names: tuple[str, str],
                         term: Callable[[Tensor], Tensor]) -> LossOut:
    """CE(z(x'), y) + weight * term(z(x')) when the regulariser is active (the term under no_grad for the
    teacher inside ``term``), else CE alone without calling the teacher."""
    z_adv = model(x_adv)
    ce = F.cross_entropy(z_adv, y)
    parts, loss = {"ce": ce}, ce
    if ctx.reg_active:
        reg = term(z_adv)
        loss = _guard_huge(ce + weight * reg, reg)
        parts.update({names[0]: reg, names[1]: weight * reg})
    return LossOut(loss, parts, {"adv": z_adv})


def rebat_loss(model, x, y, x_adv, hp: Mapping, ctx: StepContext = StepContext()) -> LossOut:
    """ReBAT: L = CE(z(x'), y) + beta KL_bm(softmax(w(x')) || softmax(z(x'))), w = ``ctx.teacher`` (the
    weight-averaged model, no gradient); the KL term only when ``ctx.reg_active``."""

    def term(z_adv):
        with torch.no_grad():
            w = ctx.teacher(x_adv)
        return kl_batchmean(w, z_adv)

    return _teacher_regularised(model, x_adv, y, ctx, float(hp["beta"]), ("rebat_kl", "rebat_kl_weighted"), term)


def rpat_plus_plus_loss(model, x, y, x_adv, hp: Mapping, ctx: StepContext, rpat: RpatSettings) -> LossOut:
    """RPAT++: ReBAT with its KL term replaced by the robust-perception KL term

        L = CE(z(x'), y) + lam KL_bm( softmax(w(x_mid) - r w(x)) || softmax((1-r) z(x')) ),
        x_mid = r x + (1-r) x',  r = rpat.clean_weight,  w = the weight-averaged teacher (no gradient).

    Robust perception asks z(x_mid) ~ r z(x) + (1-r) z(x'): the teacher supplies z(x_mid) - r z(x),
    the online model's (1-r) z(x') must match it. The published code writes it with the delta weight
    a = 1-r (x + a delta, student a z, target minus (1-a) z(x)); identical at r = 0.5."""
    r = float(rpat.clean_weight)

    def term(z_adv):
        with torch.no_grad():
            u = ctx.teacher(x)
            v = ctx.teacher(interpolate(x, x_adv, r))
        return kl_batchmean(v - r * u, (1.0 - r) * z_adv)

    return _teacher_regularised(model, x_adv, y, ctx, float(rpat.weight), ("rpat", "rpat_weighted"), term)


REBAT_HELP = {
    "beta": "β, the weight of the KL term to the weight-averaged teacher (Wang et al. 2023, ReBAT, --beta); RPAT++ "
            "ignores it and takes rpat.weight",
    "decay": "the teacher's EMA decay per step after its warm-up (ReBAT's --decay-rate)",
    "warmup_epoch": "the first epoch the teacher averages (before it: a copy of the model) and the KL term is on "
                    "(ReBAT's stage-1 end + 1 in the RPAT paper's SOTAs code)",
    "attack_bn": "BatchNorm mode of the training attack; train as the SOTAs code does (docs/faithfulness.md D8)",
    "clean_bn_forward": "an extra train-mode clean forward per step (it updates the BatchNorm running statistics "
                        "with clean data), as the SOTAs code does for logging (docs/faithfulness.md, ReBAT step 7)",
    "final_forward": "one more train-mode forward on the final adversarial example, as the SOTAs code does (D17)",
    "cutmix_double_forward": "with CutMix, two forwards per attack step, as the SOTAs code does (D17)",
    "teacher_bn_first_epoch": "the teacher's BatchNorm mode in its first averaging epoch: eval (rpat), train or "
                              "train_and_resume (the SOTAs code, D19)",
    "stronger_attack.enabled": "ReBAT's stronger attack late in training (--stronger-attack)",
    "stronger_attack.eps": "its ε (ReBAT: 10/255 for Linf)",
    "stronger_attack.steps": "its PGD steps (ReBAT: 12)",
    "stronger_attack.start_epoch": "the first epoch it is used (the SOTAs code: epoch 100; rpat: 101, --stage1 + 1)",
}

register(Objective("rebat", "ReBAT (Wang et al.): PGD-AT + weight averaging + KL to the averaged model; "
                   "+RPAT is RPAT++ (the KL term replaced by the robust-perception KL term)",
                   rebat_attack, rebat_loss, rpat_loss=rpat_plus_plus_loss, uses_teacher=True,
                   epoch_plan=rebat_epoch_plan, after_step=rebat_after_step, display="ReBAT", rpat_display="RPAT++",
                   mixed_targets=True, choices={"teacher_bn_first_epoch": list(TEACHER_BN_FIRST_EPOCH)},
                   defaults={"beta": 1.0, "decay": 0.999, "warmup_epoch": 106, "attack_bn": "train",
                             "clean_bn_forward": True, "final_forward": True, "cutmix_double_forward": True,
                             "teacher_bn_first_epoch": "eval",
                             "stronger_attack": {"enabled": False, "eps": 10 / 255, "steps": 12, "start_epoch": 101}},
                   help=REBAT_HELP))
