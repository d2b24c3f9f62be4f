"""Baseline vs +RPAT on the same examples: per-example results of each cell, paired statistics, intervals.

A cell's per-example results live beside its eval.json: ``outcomes.npz`` (written by evaluation: the test-set
``index`` and one bool array per measurement) and ``perception.npz`` (written by `rpat perceive`: the per-example
path ``nonlinearity`` among others). A baseline and its +RPAT cell (same dataset, model, norm, method and seed)
are compared only when eval.json records the same ``examples.digest`` for both (the same test examples, in the
same order); several seeds are pooled only when they all saw the same examples (seeds x examples crossed, as
``rpat.stats`` resamples them). Every interval uses ``BOOT_SEED``: the report is reproducible.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from rpat import files
from rpat.cells import PLAIN, CellFiles
from rpat.catalog import catalog

N_BOOT = 10000
BOOT_SEED = 0
LEVEL = 0.95
PAIR = ["dataset", "model", "norm", "method", "recipe"]
COLUMNS = PAIR + ["metric", "kind", "delta", "lo", "hi", "excludes_zero", "p", "p_seeds", "mcnemar_b", "mcnemar_c",
                  "n", "seeds", "seed_list", "mean_baseline", "mean_treated"]


@dataclass
class CellValues:
    """One evaluated cell: its coordinates, the digest of its examples and its per-example values."""

    coords: dict
    digest: str | None
    values: dict = field(default_factory=dict)  # metric -> per-example array (bool outcomes, float values)

    @property
    def key(self) -> tuple:
        return tuple(self.coords[k] for k in PAIR)


def compared_metrics() -> list[str]:
    """The measurements (per-example outcomes) and the path nonlinearity."""
    return [m["key"] for m in catalog()["measurements"]] + ["nonlinearity"]


def _npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise files.ResultFileError(f"{path} cannot be read as .npz ({e}); delete it and rerun the job that writes "
                                    "it") from None


def _warn(msg: str) -> None:
    print(f"[rpat] report: {msg}", file=sys.stderr)


def digest(index: np.ndarray) -> str:
    """What eval.json records as examples.digest: sha256 of the int64 test-set indices."""
    return hashlib.sha256(np.asarray(index, dtype=np.int64).tobytes()).hexdigest()


def _indexed(path: Path, expected_digest: str | None, keys) -> dict:
    """The arrays ``keys`` of an .npz whose ``index`` is the examples eval.json records; {} and a warning if not."""
    arrays = _npz(path)
    if "index" not in arrays or expected_digest is None or digest(arrays["index"]) != expected_digest:
        _warn(f"{path}: its index does not match examples.digest in eval.json (or eval.json records none); its "
              "per-example values are left out: rerun the jobs that write them")
        return {}
    return {k: arrays[k] for k in keys if k in arrays}


def load_cell(eval_path: Path) -> CellValues:
    """A cell's per-example values from the files beside its eval.json (those that exist)."""
    ev = files.read_json(eval_path)
    coords = {k: ev[k] for k in ("dataset", "model", "norm", "method")} | {
        "recipe": ev.get("recipe", PLAIN), "rpat": bool(ev["rpat"]), "seed": int(ev["seed"])}
    cell = CellValues(coords, (ev.get("examples") or {}).get("digest"))
    outcomes_path = eval_path.parent / ev["outcomes"] if "outcomes" in ev else CellFiles.outcomes_beside(eval_path)
    if outcomes_path.is_file():
        cell.values.update(_indexed(outcomes_path, cell.digest, [m["key"] for m in catalog()["measurements"]]))
    perception_path = CellFiles.beside(eval_path).perception_values
    if perception_path.is_file():
        arrays = _indexed(perception_path, cell.digest, ["nonlinearity", "defended_pgd20"])
        _check_same_pgd20(perception_path, arrays.pop("defended_pgd20", None), cell.values.get("pgd20"))
        cell.values.update(arrays)
    return cell


def _check_same_pgd20(path: Path, perceived, evaluated) -> None:
    """The perception job attacks with evaluation's PGD-20 and the same per-block generators: the outcomes agree."""
    if perceived is not None and evaluated is not None and perceived.shape == evaluated.shape:
        differ = int(np.sum(perceived.astype(bool) != evaluated.astype(bool)))
        if differ:
            _warn(f"{path}: PGD-20 outcomes differ from evaluation's on {differ} of {len(evaluated)} examples; the "
                  "path was measured to other adversarial examples than evaluation attacked with (rerun both)")


def load_cells(eval_files) -> list[CellValues]:
    return [load_cell(Path(f)) for f in eval_files]


def _largest_digest_group(seeds: list[int], digest_of: dict[int, str | None], what: str) -> list[int]:
    """The seeds that share the most common examples digest (seeds without a digest are left out)."""
    groups: dict[str, list[int]] = {}
    for s in seeds:
        if digest_of[s] is not None:
            groups.setdefault(digest_of[s], []).append(s)
    if not groups:
        return []
    best = max(groups.values(), key=len)
    if len(best) < len(seeds):
        dropped = sorted(set(seeds) - set(best))
        _warn(f"{what}: seeds {dropped} were evaluated on other examples than seeds {best}; "
              "their per-example values are not pooled")
    return best


def stacked(cells: list[CellValues], metric: str, seeds: list[int]) -> np.ndarray | None:
    """[s, n]: ``metric``'s per-example values of ``cells`` at ``seeds`` (None if one lacks it or n differs)."""
    by_seed = {c.coords["seed"]: c.values.get(metric) for c in cells}
    arrays = [by_seed.get(s) for s in seeds]
    if not arrays or any(a is None for a in arrays) or len({a.shape for a in arrays}) != 1:
        return None
    return np.stack(arrays)


def paired_seeds(base: list[CellValues], treated: list[CellValues], what: str) -> list[int]:
    """Seeds where both cells exist and saw the same examples; pooled only if all saw the same ones."""
    b = {c.coords["seed"]: c.digest for c in base}
    t = {c.coords["seed"]: c.digest for c in treated}
    common = sorted(set(b) & set(t))
    unpaired = [s for s in common if b[s] is None or b[s] != t[s]]
    if unpaired:
        _warn(f"{what}: seeds {unpaired} of the baseline and +RPAT cells were not evaluated on the same recorded "
              "examples (examples.digest in eval.json); they are not compared")
    same = [s for s in common if s not in unpaired]
    return _largest_digest_group(same, {s: b[s] for s in same}, what)


def compare(cells: list[CellValues], *, n_boot: int = N_BOOT, seed: int = BOOT_SEED,
            level: float = LEVEL) -> pd.DataFrame:
    """One row per (baseline, +RPAT) pair and metric: ``rpat.stats.paired_comparison``'s row and the pair."""
    from rpat import stats

    groups: dict[tuple, dict[bool, list[CellValues]]] = {}
    for c in cells:
        groups.setdefault(c.key, {False: [], True: []})[c.coords["rpat"]].append(c)
    rows = []
    for key, by in sorted(groups.items()):
        what = "/".join(map(str, key))
        seeds = paired_seeds(by[False], by[True], what) if by[False] and by[True] else []
        for metric in compared_metrics() if seeds else []:
            a, b = stacked(by[False], metric, seeds), stacked(by[True], metric, seeds)
            if a is None or b is None or a.shape != b.shape:
                continue
            (row,) = stats.paired_comparison({metric: a}, {metric: b}, n_boot=n_boot, seed=seed, level=level)
            p_seeds = row.pop("p_seeds")
            rows.append(dict(zip(PAIR, key)) | row | {"seed_list": ";".join(map(str, seeds)),
                                                      "p_seeds": None if p_seeds is None else
                                                      ";".join(f"{p:.6g}" for p in p_seeds)})
    return pd.DataFrame(rows, columns=COLUMNS)


def cell_intervals(cells: list[CellValues], metrics=("clean", "aa"), *, n_boot: int = N_BOOT, seed: int = BOOT_SEED,
                   level: float = LEVEL) -> pd.DataFrame:
    """Per grid coordinate (over its seeds): the bootstrap interval of each metric's mean, in % for outcomes.

    Columns: dataset, model, norm, method, rpat, then ``<metric>_lo`` and ``<metric>_hi`` (NaN where the
    per-example values are missing)."""
    from rpat import stats

    groups: dict[tuple, list[CellValues]] = {}
    for c in cells:
        groups.setdefault(c.key + (c.coords["rpat"],), []).append(c)
    rows = []
    for key, grp in sorted(groups.items()):
        row = dict(zip(PAIR + ["rpat"], key))
        seeds = _largest_digest_group(sorted(c.coords["seed"] for c in grp), {c.coords["seed"]: c.digest for c in grp},
                                      "/".join(map(str, key)))
        for metric in metrics:
            v = stacked(grp, metric, seeds) if seeds else None
            ci = stats.bootstrap_mean(100.0 * v if stats.is_binary(v) else v, n_boot=n_boot, seed=seed,
                                      level=level) if v is not None else {"lo": np.nan, "hi": np.nan}
            row |= {f"{metric}_lo": ci["lo"], f"{metric}_hi": ci["hi"]}
        rows.append(row)
    return pd.DataFrame(rows, columns=PAIR + ["rpat"] + [f"{m}_{s}" for m in metrics for s in ("lo", "hi")])


def write_csv(comparisons: pd.DataFrame, path: Path) -> list[Path]:
    files.atomic_write(path, lambda tmp: comparisons.to_csv(tmp, index=False, float_format="%.6g"))
    return [path]
