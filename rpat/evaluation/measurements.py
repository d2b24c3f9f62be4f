"""The measurement registry: what an evaluation measures (clean, PGD-20, CW-inf, AutoAttack, ...) and the metrics
derived from the measured accuracies.

A measurement is one :func:`register` entry: a key (its column in eval.json, the tables and MLflow's
``test_<key>``), a header for tables, and a function returning the per-example outcome (correct or not) on one block
of the evaluated examples, plus any details to record. Derived metrics (Mean, NRR) are computed from measurements.
The evaluation job (rpat/jobs/evaluate.py), the robustness curve (rpat/jobs/curve.py), report, tracking and the CLI
read the registry (the last three through ``rpat.catalog``), so adding a measurement is one entry here plus its
test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from rpat import accuracy, autoattack, registries
from rpat.evaluation.engine import EvalContext, Outcome
from rpat.settings import EvalSettings

__all__ = ["DERIVED", "MEASUREMENTS", "Derived", "EvalContext", "Measurement", "Outcome", "derive", "register",
           "summary_metrics", "tracked_metrics"]


@dataclass(frozen=True)
class Measurement:
    key: str
    header: str
    description: str
    measure: Callable[[EvalContext], Outcome]  # one block -> per-example outcome
    enabled: Callable[[EvalSettings], bool] = lambda s: True
    paper: bool = False  # one of the paper's headline columns (Clean, AA)
    norms: tuple[str, ...] = ("linf", "l2")  # threat norms it measures under, at any radius (eval.eps_grid)
    # (counts summed over blocks, warnings, n examples) -> (eval.json entries, extra MLflow test metrics)
    summary: Callable[[dict, list, int], tuple[dict, dict]] | None = None


@dataclass(frozen=True)
class Derived:
    """A metric computed from measured accuracies (None when one of them was not measured)."""

    key: str
    header: str
    description: str
    inputs: tuple[str, ...]
    fn: Callable[..., float]
    paper: bool = True


MEASUREMENTS: dict[str, Measurement] = {}


def register(m: Measurement) -> Measurement:
    return registries.add(MEASUREMENTS, m.key, m, "measurement")


def _per_batch(ctx: EvalContext, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Outcome:
    """Concatenate ``fn(x, y)`` (per-example correctness) over the block's batches; one host copy at the end."""
    ctx.model.eval()
    return Outcome(torch.cat([fn(x, y) for x, y in ctx.batches]).cpu())


def clean(ctx: EvalContext) -> Outcome:
    """argmax z(x) == y."""
    return _per_batch(ctx, lambda x, y: accuracy.correct(ctx.model, x, y))


def _pgd(ctx: EvalContext, steps: int, loss: str) -> Outcome:
    """PGD from a uniform random start drawn once for the whole block from its generator, then sliced into the
    batches: each example's start, and so its outcome, is the same for any batch size."""
    t = ctx.threat
    starts = iter(accuracy.pgd_start(ctx.batches.x, t, ctx.generator()).split(ctx.batches.batch_size))
    return _per_batch(ctx, lambda x, y: accuracy.correct(
        ctx.model, accuracy.pgd_examples(ctx.model, x, y, t, steps, loss, start=next(starts)), y))


def pgd20(ctx: EvalContext) -> Outcome:
    """PGD on mean CE, ``eval.pgd_steps`` steps (20) of the threat model's step size, uniform random start."""
    return _pgd(ctx, ctx.settings.pgd_steps, "ce")


def cw(ctx: EvalContext) -> Outcome:
    """CW-inf: PGD on the CW margin max_{j!=y} z_j - z_y, ``eval.cw_steps`` steps (30)."""
    return _pgd(ctx, ctx.settings.cw_steps, "cw")


def autoattack_standard(ctx: EvalContext) -> Outcome:
    """AutoAttack (official code), ``eval.autoattack.version`` (standard: APGD-CE, APGD-T, FAB-T, Square), fixed
    seed, the cell's norm and eps. One stage per attack: each runs on the block's examples still robust and is
    saved (resume restarts at the next attack); counts the robust examples after each attack."""
    s, t = ctx.settings.autoattack, ctx.threat
    x, y = ctx.batches.x, ctx.batches.y
    robust = torch.ones(len(y), dtype=torch.bool, device=x.device)  # the first attack checks clean accuracy itself
    counts, warnings = {}, []
    attacks = autoattack.attacks_of(s.version, t.norm)
    for attack in attacks:
        stage = ctx.done.get(attack)
        if stage is None:
            idx = robust.nonzero().squeeze(1)
            after, warned = robust.clone(), []
            if len(idx):
                after[idx], warned = autoattack.attack_examples(
                    ctx.model, x[idx], y[idx], attack, norm=t.norm, eps=t.eps, seed=s.seed, version=s.version,
                    batch_size=ctx.batches.batch_size, device=x.device)
            stage = {"robust": after.cpu(), "warnings": warned}
            ctx.save_stage(attack, stage)
        robust = stage["robust"].to(x.device)
        counts[attack] = int(robust.sum())
        warnings += stage["warnings"]
    details = {"aa_version": s.version, "aa_seed": s.seed, "aa_attacks": attacks}
    return Outcome(robust.cpu(), details, counts, warnings)


def autoattack_summary(counts: dict, warnings: list, n: int) -> tuple[dict, dict]:
    """Robust accuracy (%) after each attack, from the robust counts summed over blocks; AutoAttack's warnings."""
    per_attack = {a: 100.0 * c / n for a, c in counts.items()} if n else {}
    warnings = list(dict.fromkeys(warnings + autoattack.square_check(per_attack)))
    return ({"aa_per_attack": per_attack, "aa_warnings": warnings},
            {f"test_aa_after_{a}": v for a, v in per_attack.items()})


register(Measurement("clean", "Clean", "clean accuracy", clean, paper=True, norms=()))
register(Measurement("pgd20", "PGD-20", "accuracy under PGD-20 (CE)", pgd20))
register(Measurement("cw", "CW∞", "accuracy under CW-inf (PGD on the CW margin)", cw))
register(Measurement("aa", "AA", "AutoAttack robust accuracy", autoattack_standard,
                     enabled=lambda s: s.autoattack.enabled, paper=True, summary=autoattack_summary,
                     norms=("linf", "l2", "l1")))


def summary_metrics(clean: float, aa: float | None) -> tuple[float | None, float | None]:
    """Mean = (Clean + AA)/2, NRR = 2 Clean AA / (Clean + AA) (0 when both are 0)."""
    if aa is None:
        return None, None
    mean = (clean + aa) / 2
    nrr = 2 * clean * aa / (clean + aa) if clean + aa > 0 else 0.0
    return mean, nrr


DERIVED = {
    "mean": Derived("mean", "Mean", "(Clean + AA) / 2", ("clean", "aa"), lambda c, a: summary_metrics(c, a)[0]),
    "nrr": Derived("nrr", "NRR", "2 Clean AA / (Clean + AA)", ("clean", "aa"), lambda c, a: summary_metrics(c, a)[1]),
}


def derive(result: dict) -> dict:
    """The derived metrics of a result holding the measured accuracies."""
    out = {}
    for d in DERIVED.values():
        values = [result.get(k) for k in d.inputs]
        out[d.key] = None if any(v is None for v in values) else d.fn(*values)
    return out


def tracked_metrics(result: dict) -> dict:
    """What MLflow records of an evaluation: ``test_<key>`` for every metric measured or derived, plus the
    measurements' extra metrics (``extra_metrics`` in eval.json)."""
    keys = list(MEASUREMENTS) + list(DERIVED)
    out = {f"test_{k}": result[k] for k in keys if result.get(k) is not None}
    out.update(result.get("extra_metrics", {}))
    return out
