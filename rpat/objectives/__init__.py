"""Training objectives and the RPAT term.

An objective is two pure pieces:
  * ``attack(model, x, y, threat, hp, generator) -> x_adv``: how it generates its training inputs;
  * ``loss(model, x, y, x_adv, hp, ctx) -> LossOut``: the loss on given inputs, its named parts, and
    the logits it computed (so RPAT can reuse them, docs/faithfulness.md "Forward passes and reused logits");
plus optional per-epoch and per-step hooks (``epoch_plan``, ``after_step``) through which a method
such as ReBAT changes its attack, switches its regulariser on, or touches BatchNorm statistics, so
the training loop never names a method. ``compute_loss`` composes a baseline with the RPAT toggle.
To evaluate any objective on precomputed adversarial inputs (no attack involved)::

    from rpat.objectives import OBJECTIVES, compute_loss
    loss, parts = compute_loss(OBJECTIVES["trades"], model, x, y, x_adv, hp={"beta": 6.0},
                               rpat={"weight": 1.0, "clean_weight": 0.5})

``model`` is any callable mapping a batch to logits; every forward is a separate call (BatchNorm
batch statistics depend on the batch). ``hp`` holds the method's own hyperparameters (defaults in
``Objective.defaults``); ``rpat=None`` turns RPAT off; methods with a weight-averaged teacher
(ReBAT, RPAT++) take it as ``teacher=``.

Notation: z(.) logits, CE mean cross-entropy, KL_bm(p||q) = (1/B) sum_i sum_c p_ic log(p_ic/q_ic),
MSE mean over batch x classes.

Registered objectives live in :mod:`rpat.objectives.baselines`, :mod:`rpat.objectives.rebat` and
:mod:`rpat.objectives.pretrained` (RobustBench zoo models, evaluated and never trained).
"""

from __future__ import annotations

from rpat.objectives.registry import (  # noqa: F401 - the package's API
    OBJECTIVES, EpochPlan, LossOut, Objective, StepContext, Tensor, compute_loss, constant_plan, interpolate,
    kl_batchmean, objective_info, register, rpat_term,
)

# Importing the modules registers their objectives.
from rpat.objectives import baselines, pretrained, rebat  # noqa: F401
from rpat.objectives.rebat import _guard_huge, rebat_attack, rebat_loss, rpat_plus_plus_loss  # noqa: F401
