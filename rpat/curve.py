"""Robustness curves: accuracy against the radius ε, per norm and attack (``eval.eps_grid``, docs/evaluation.md).

``eval.eps_grid`` is a list of entries ``{norm, eps: [ε, ...], attacks: [key, ...]}``; every (norm, ε, attack) of
an entry is a *point*. A point is the registered measurement ``attack`` (:mod:`rpat.evaluate`) run with the threat
(norm, ε) in place of the cell's: the same block-wise, resumable engine, the same evaluated examples, and the
same random numbers (a point draws from its measurement's block generator, so PGD-20's start at ε is its start at
the cell's ε scaled, and the point at the cell's own (norm, ε) repeats eval.json's measurement exactly). PGD's
step is the norm's ``threat`` step scaled with ε (2/255 at 8/255: ε/4). L1 is measured by AutoAttack only (its L1
version: APGD-CE and APGD-T with L1 projections, FAB-T and Square; Croce & Hein, ICML 2021).

The curve is its own job on the primary checkpoint (rule ``curve``): ``curve.json`` (the points' accuracies and
clean accuracy) and ``curve.npz`` (``index``; ``clean`` and ``correct`` [points, n] bool, points in curve.json's
order), so a changed grid redoes the curve and not eval.json. An empty grid (the default) plans no curve job.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from rpat import files
from rpat.settings import CellSettings, EvalSettings, Threat


@dataclass(frozen=True)
class Point:
    norm: str
    eps: float
    attack: str  # a registered measurement's key

    @property
    def key(self) -> str:
        """Its name in saved progress (unique per point)."""
        return f"{self.attack}@{self.norm}:{self.eps!r}"


def points(e: EvalSettings) -> list[Point]:
    """The grid's points, entry by entry, ε ascending within an entry."""
    return [Point(g["norm"], float(eps), attack) for g in e.eps_grid for attack in g["attacks"]
            for eps in sorted(g["eps"])]


def problems(eps_grid: list, measurements: list[dict]) -> list[str]:
    """What is wrong with ``eval.eps_grid`` (given the catalog's measurements), one message per problem; the schema
    has checked its shape and that every ε > 0."""
    norms_of = {m["key"]: m.get("norms", []) for m in measurements}
    found, seen = [], set()
    for i, g in enumerate(eps_grid):
        for attack in g["attacks"]:
            norms = norms_of.get(attack, [])
            if not norms:
                takes = ", ".join(k for k, n in norms_of.items() if n)
                found.append(f"eval.eps_grid[{i}].attacks: {attack!r} takes no radius; use some of: {takes}")
            elif g["norm"] not in norms:
                able = ", ".join(k for k, n in norms_of.items() if g["norm"] in n)
                found.append(f"eval.eps_grid[{i}]: {attack!r} does not measure under {g['norm']} (only "
                             f"{', '.join(norms)}); {g['norm']} is measured by: {able}"
                             + (" (AutoAttack's L1 attacks)" if g["norm"] == "l1" else ""))
        for p in points(EvalSettings(eps_grid=[g])):
            if p in seen:
                found.append(f"eval.eps_grid[{i}]: the point ({p.norm}, ε={p.eps:g}, {p.attack}) is listed twice")
            seen.add(p)
    return found


def point_threat(settings: CellSettings, norm: str, eps: float) -> Threat:
    """The threat of a point: the config's ``threat.<norm>`` step and steps, the step scaled with ε (none for L1,
    which only AutoAttack measures: it picks its own steps)."""
    base = settings.resolved["threat"].get(norm) or {"eps": eps, "step": eps, "steps": 1}
    return Threat(norm, eps, eps * base["step"] / base["eps"], base["steps"])


def measurements_of(settings: CellSettings, pts: list[Point]) -> list:
    """Clean, then one measurement per point: the registered one with the point's threat; its random numbers come
    from the registered measurement's block generator (same key)."""
    from rpat.evaluate import MEASUREMENTS

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
    (``eval-state/curve-<checkpoint>.pt``); a rerun after a kill resumes it."""
    import numpy as np

    from rpat import evaluate as ev

    record_path, out_path = Path(record_path), Path(out_path)
    outcomes_path = Path(outcomes_path) if outcomes_path else out_path.with_suffix(".npz")
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
    state = record_path.parent / "eval-state" / f"curve-{which}.pt"
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


def curve_cell(cfg, cell, run_dir: str | Path, *, threads: int | None = None) -> dict:
    """:func:`evaluate_curve` of ``cell`` from ``run_dir``'s train.json into ``run_dir``/curve.json."""
    run_dir = Path(run_dir)
    return evaluate_curve(cfg.settings(cell), run_dir / "train.json", run_dir / "curve.json", threads=threads)
