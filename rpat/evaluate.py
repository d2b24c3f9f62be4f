"""Evaluation: a registry of measurements (clean, PGD-20, CW-inf, AutoAttack, ...) run on a cell's checkpoint.

A measurement is one :func:`register` entry: a key (its column in eval.json, the tables and MLflow's
``test_<key>``), a header for tables, and a function returning the per-example outcome (correct or not)
on the evaluated examples, plus any details to record. Derived metrics (Mean, NRR) are computed from
measurements. Report, tracking and the CLI read the registry (through ``rpat.catalog``), so adding a
measurement is one entry here plus its test.

All measurements use the same test examples, the norm and eps the cell was trained for, and the model
in eval mode. The checkpoint must belong to the cell: its model, its number of classes and the training
fingerprint recorded in train.json are checked before any work.
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from rpat import accuracy, autoattack, checkpoint, data, files, models, runtime
from rpat.cells import Cell
from rpat.errors import UserError
from rpat.settings import CellSettings, EvalSettings, Threat
from rpat.tracking import CellRun

if TYPE_CHECKING:  # rpat.config builds its defaults from the registries, which import this module
    from rpat.config import Config


class EvaluationError(UserError, RuntimeError):
    """The evaluation's inputs do not belong together (checkpoint, train.json, cell)."""


@dataclass
class Outcome:
    correct: torch.Tensor  # bool, one per evaluated example (on the CPU)
    details: dict = field(default_factory=dict)  # extra eval.json entries (JSON-able)
    metrics: dict = field(default_factory=dict)  # extra MLflow test metrics


@dataclass(frozen=True)
class EvalContext:
    model: torch.nn.Module
    threat: Threat
    settings: EvalSettings
    batches: data.Batches  # the evaluated examples, on the device


@dataclass(frozen=True)
class Measurement:
    key: str
    header: str
    description: str
    measure: Callable[[EvalContext], Outcome]
    enabled: Callable[[EvalSettings], bool] = lambda s: True
    paper: bool = False  # one of the paper's headline columns (Clean, AA)


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
    if m.key in MEASUREMENTS:
        raise ValueError(f"measurement {m.key!r} is registered twice")
    MEASUREMENTS[m.key] = m
    return m


def _per_batch(ctx: EvalContext, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Outcome:
    """Concatenate ``fn(x, y)`` (per-example correctness) over the batches; one host copy at the end."""
    ctx.model.eval()
    return Outcome(torch.cat([fn(x, y) for x, y in ctx.batches]).cpu())


def clean(ctx: EvalContext) -> Outcome:
    """argmax z(x) == y."""
    return _per_batch(ctx, lambda x, y: accuracy.correct(ctx.model, x, y))


def pgd20(ctx: EvalContext) -> Outcome:
    """PGD on mean CE, ``eval.pgd_steps`` steps (20) of the threat model's step size, uniform random start."""
    steps = ctx.settings.pgd_steps
    return _per_batch(ctx, lambda x, y: accuracy.correct(
        ctx.model, accuracy.pgd_examples(ctx.model, x, y, ctx.threat, steps), y))


def cw(ctx: EvalContext) -> Outcome:
    """CW-inf: PGD on the CW margin max_{j!=y} z_j - z_y, ``eval.cw_steps`` steps (30)."""
    steps = ctx.settings.cw_steps
    return _per_batch(ctx, lambda x, y: accuracy.correct(
        ctx.model, accuracy.pgd_examples(ctx.model, x, y, ctx.threat, steps, loss="cw"), y))


def autoattack_standard(ctx: EvalContext) -> Outcome:
    """AutoAttack (official code), ``eval.autoattack.version`` (standard: APGD-CE, APGD-T, FAB-T, Square), fixed
    seed, the cell's norm and eps; records the robust accuracy after each attack and its warnings."""
    s = ctx.settings.autoattack
    x, y = ctx.batches.x, ctx.batches.y
    aa = autoattack.run_autoattack(ctx.model, x, y, norm=ctx.threat.norm, eps=ctx.threat.eps, seed=s.seed,
                                   version=s.version, batch_size=ctx.settings.batch_size, device=x.device)
    for w in aa["warnings"]:
        print(f"[rpat] AutoAttack warning: {w}", file=sys.stderr)
    details = {"aa_per_attack": aa["per_attack"], "aa_warnings": aa["warnings"], "aa_version": s.version,
               "aa_seed": s.seed, "aa_attacks": aa["attacks"], "aa_package": autoattack.package_version()}
    return Outcome(aa["robust"], details, {f"test_aa_after_{k}": v for k, v in aa["per_attack"].items()})


register(Measurement("clean", "Clean", "clean accuracy", clean, paper=True))
register(Measurement("pgd20", "PGD-20", "accuracy under PGD-20 (CE)", pgd20))
register(Measurement("cw", "CW∞", "accuracy under CW-inf (PGD on the CW margin)", cw))
register(Measurement("aa", "AA", "AutoAttack robust accuracy", autoattack_standard,
                     enabled=lambda s: s.autoattack.enabled, paper=True))


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


def evaluated_examples(settings: CellSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The test examples every measurement (and the perception analysis) uses: ``eval.n_examples`` drawn by
    ``eval.subset`` (a seeded, class-stratified draw by default) with ``eval.subset_seed``; float images in [0, 1],
    labels, and their sorted indices in the test set."""
    e = settings.eval
    x, y = data.load_splits(settings.cell.dataset, settings.data.options()).test
    index = data.eval_subset(y, e.n_examples, e.subset, e.subset_seed)
    return data.to_float(x[index]), y[index], index


def examples_record(settings: CellSettings, index: torch.Tensor) -> dict:
    """What eval.json records of the evaluated examples (the digest pairs cells evaluated on the same ones)."""
    digest = hashlib.sha256(index.to(torch.int64).cpu().numpy().tobytes()).hexdigest()
    return {"subset": settings.eval.subset, "seed": settings.eval.subset_seed, "n": len(index), "digest": digest}


def load_model(path: str | Path, device) -> tuple[torch.nn.Module, dict]:
    ckpt = checkpoint.load(path, map_location=device)
    model = models.build_from_meta(ckpt)
    checkpoint.load_weights(model, ckpt["model"], path)
    return model.to(device).eval(), ckpt


def check_belongs(settings: CellSettings, record: dict, record_path: Path, ckpt: dict, ckpt_path: Path) -> None:
    """Refuse a train.json or checkpoint that is not this cell's, or was trained with other settings."""
    cell = settings.cell
    if record.get("cell") != cell.id:
        raise EvaluationError(f"{record_path} belongs to cell {record.get('cell')!r}, not {cell.id}; evaluate it "
                              "with its own cell, or retrain this cell")
    if record.get("fingerprint") != settings.train_fingerprint:
        raise EvaluationError(f"{record_path} was trained with other training settings than the config gives "
                              f"{cell.id}; rerun its training (snakemake does) or restore the config it was trained with")
    if ckpt.get("model_name") != cell.model or ckpt.get("fingerprint") != record["fingerprint"]:
        raise EvaluationError(f"checkpoint {ckpt_path} is not the one cell {cell.id} trained (model "
                              f"{ckpt.get('model_name')!r}, fingerprint {ckpt.get('fingerprint')!r}; expected model "
                              f"{cell.model!r}, fingerprint {record['fingerprint']!r}); rerun the cell's training")


def _read_record(path: Path) -> dict:
    if not path.is_file():
        raise EvaluationError(f"{path} does not exist: the cell has not been trained; run its training first "
                              "(snakemake does, or `rpat train` by hand)")
    return files.read_record(path, ("cell", "fingerprint", "checkpoints", "selection"))


def evaluate(settings: CellSettings, record_path: str | Path, out_path: str | Path, *, tracking: dict,
             checkpoint_path: str | Path | None = None, threads: int | None = None) -> dict:
    """Evaluate one cell's checkpoint (default: the one ``eval.checkpoint`` names in train.json); write ``out_path``.
    The cell's MLflow run, which training ended, is re-opened and ends FINISHED, KILLED or FAILED with this job."""
    record = _read_record(Path(record_path))
    with CellRun(tracking["uri"], settings.experiment, settings.cell.tags(), run_id=record.get("mlflow_run_id"),
                 enabled=tracking["enabled"]) as run:
        return _evaluate(settings, record_path, out_path, run, checkpoint_path=checkpoint_path, threads=threads)


def _evaluate(settings: CellSettings, record_path: str | Path, out_path: str | Path, run: CellRun, *,
              checkpoint_path: str | Path | None = None, threads: int | None = None) -> dict:
    record_path, out_path = Path(record_path), Path(out_path)
    cell, e = settings.cell, settings.eval
    record = _read_record(record_path)
    ckpt_path = Path(checkpoint_path) if checkpoint_path else record_path.parent / record["checkpoints"][e.checkpoint]
    device = runtime.select_device(settings.train.device)
    runtime.set_threads(threads or settings.train.threads)
    runtime.seed_everything(cell.seed)
    model, ckpt = load_model(ckpt_path, device)
    check_belongs(settings, record, record_path, ckpt, ckpt_path)
    x, y, index = evaluated_examples(settings)
    n = len(y)
    ctx = EvalContext(model, settings.threat, e, data.Batches(x, y, e.batch_size, device=device))

    t0 = time.time()
    result = {"cell": cell.id, **cell.tags(), "rpat": cell.rpat, "seed": cell.seed, "experiment": settings.experiment,
              "checkpoint": e.checkpoint, "checkpoint_epoch": ckpt["epoch"], "selection": record["selection"],
              "n_examples": n, "examples": examples_record(settings, index), "norm": cell.norm, "eps": settings.threat.eps, "pgd_steps": e.pgd_steps,
              "pgd_step_size": settings.threat.step, "cw_steps": e.cw_steps, "seconds": {}, "extra_metrics": {}}
    for m in MEASUREMENTS.values():
        if not m.enabled(e):
            result[m.key] = None
            continue
        t = time.time()
        out = m.measure(ctx)
        result[m.key] = 100.0 * float(out.correct.sum()) / n
        result.update(out.details)
        result["extra_metrics"].update(out.metrics)
        result["seconds"][m.key] = time.time() - t
    result.update(derive(result))
    result["mlflow_metrics"] = tracked_metrics(result)
    result.update({"wall_s": time.time() - t0, "device": str(device), "eval_fingerprint": settings.eval_fingerprint})
    files.write_json(out_path, result)
    run.log_metrics(result["mlflow_metrics"])
    run.log_artifact(out_path)
    return result


def evaluate_cell(cfg: Config, cell: Cell, run_dir: str | Path, *, threads: int | None = None) -> dict:
    """Evaluate ``cell`` of ``cfg`` from ``run_dir``'s train.json into ``run_dir``/eval.json."""
    run_dir = Path(run_dir)
    return evaluate(cfg.settings(cell), run_dir / "train.json", run_dir / "eval.json", tracking=cfg.tracking,
                    threads=threads)
