"""The robustness curve job: accuracy against the radius ε, per norm and attack (``eval.eps_grid``,
docs/evaluation.md; its points: rpat/evaluation/eps_grid.py).

``eval.eps_grid`` is a list of entries ``{norm, eps: [ε, ...], attacks: [key, ...]}``; every (norm, ε, attack) of an
entry is a *point*. A point is the registered measurement ``attack`` (rpat/evaluation/measurements.py) run with the
threat (norm, ε) in place of the cell's: the same block-wise, resumable engine, the same evaluated examples, and the
same random numbers (a point draws from its measurement's block generator, so PGD-20's start at ε is its start at
the cell's ε scaled, and the point at the cell's own (norm, ε) repeats eval.json's measurement exactly). PGD's step
is the norm's ``threat`` step scaled with ε (2/255 at 8/255: ε/4). L1 is measured by AutoAttack only (its L1
version: APGD-CE and APGD-T with L1 projections, FAB-T and Square; Croce & Hein, ICML 2021).

The curve is its own job on the primary checkpoint (rule ``curve``): ``curve.json`` (the points' accuracies and
clean accuracy) and ``curve.npz`` (``index``; ``clean`` and ``correct`` [points, n] bool, points in curve.json's
order), so a changed grid redoes the curve and not eval.json. An empty grid (the default) plans no curve job.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from rpat import files
from rpat.cells import Cell, CellFiles
from rpat.config import Config
from rpat.evaluation.eps_grid import Point, point_threat, points
from rpat.evaluation.measurements import MEASUREMENTS
from rpat.jobs import evaluate as ev
from rpat.settings import CellSettings


def measurements_of(settings: CellSettings, pts: list[Point]) -> list:
    """Clean, then one measurement per point: the registered one with the point's threat; its random numbers come
    from the registered measurement's block generator (same key)."""

    def at(p: Point):
        m, threat = MEASUREMENTS[p.attack], point_threat(settings, p.norm, p.eps)
        return dataclasses.replace(m, key=p.key, measure=lambda ctx: m.measure(
            dataclasses.replace(ctx, threat=threat, key=m.key)))

    return [MEASUREMENTS["clean"]] + [at(p) for p in pts]


def _point_record(p: Point, m, st: dict, n: int) -> dict:
    record = {"norm": p.norm, "eps": p.eps, "attack": p.attack, "accuracy": 100.0 * st["correct"] / n if n else None,
              "n": n, "seconds": st["seconds"], **st["details"]}
    if m.summary:
        record.update(m.summary(st["counts"], st["warnings"], n)[0])
    return record


def evaluate_curve(settings: CellSettings, record_path: str | Path, out_path: str | Path, *,
                   outcomes_path: str | Path | None = None, checkpoint_path: str | Path | None = None,
                   threads: int | None = None) -> dict:
    """Measure every point of ``eval.eps_grid`` on the primary checkpoint; write ``out_path`` (curve.json) and
    ``outcomes_path`` (default: curve.npz beside it). Progress is saved after each block and AutoAttack stage
    (:meth:`CellFiles.curve_state`); a rerun after a kill resumes it."""
    record_path, out_path = Path(record_path), Path(out_path)
    outcomes_path = Path(outcomes_path) if outcomes_path else CellFiles.outcomes_beside(out_path)
    pts = points(settings.eval)
    if not pts:
        raise ev.EvaluationError(f"cell {settings.cell.id} has no eval.eps_grid: there is no curve to measure")
    which = settings.eval.checkpoints[0]
    record = ev.read_train_record(record_path)
    ckpt_path, model, ckpt, device, (x, y, index) = ev.load_for(settings, record, record_path, which,
                                                                checkpoint_path, threads)
    header = ev.result_header(settings, record, which, ckpt, index)
    key = {"curve_fingerprint": settings.curve_fingerprint, "checkpoint": which,
           "checkpoint_digest": files.sha256(ckpt_path), "examples_digest": header["examples"]["digest"],
           "device_type": device.type}
    ms = measurements_of(settings, pts)
    state = CellFiles.beside(record_path).curve_state(which)
    stats, arrays, progress = ev.measure_blocks(settings, model, (x, y, index), key, state, (1, 1), device,
                                                ms)
    n = len(index)
    measured = stats["measured"]
    result = {k: header[k] for k in ("cell", "dataset", "model", "norm", "method", "recipe", "rpat", "seed",
                                     "experiment", "checkpoint", "checkpoint_epoch", "n_examples", "examples",
                                     "eps", "aa_package") if k in header}
    result.update(clean=100.0 * measured["clean"]["correct"] / n if n else None,
                  points=[_point_record(p, m, measured[m.key], n) for p, m in zip(pts, ms[1:])],
                  curve_fingerprint=settings.curve_fingerprint, device=str(device), wall_s=stats["wall_s"],
                  batch_size=stats["batch_size"], sessions=stats["sessions"],
                  outcomes=os.path.relpath(outcomes_path, out_path.parent))
    correct = np.stack([arrays[m.key] for m in ms[1:]]).astype(bool)
    files.write_npz(outcomes_path, {"index": np.asarray(arrays["index"], dtype=np.int64),
                                    "clean": np.asarray(arrays["clean"], dtype=bool), "correct": correct})
    files.write_json(out_path, result)
    progress.remove()
    return result


def read_curve(path: str | Path) -> dict:
    """A curve.json (checked to hold points)."""
    return files.read_record(path, ("cell", "clean", "points"))


def curve_cell(cfg: Config, cell: Cell, run_dir: str | Path, *, threads: int | None = None) -> dict:
    """:func:`evaluate_curve` of ``cell`` from the training record in ``run_dir`` into its curve file there."""
    cell_files = CellFiles(run_dir)
    return evaluate_curve(cfg.settings(cell), cell_files.train_record, cell_files.curve, threads=threads)
