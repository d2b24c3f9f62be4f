"""The points of a robustness curve (``eval.eps_grid``, docs/evaluation.md): what the grid lists, whether the
registered measurements can measure it, and each point's threat. Pure (no torch): the config checks a grid with
it; the curve job (rpat/jobs/curve.py) measures it.

``eval.eps_grid`` is a list of entries ``{norm, eps: [ε, ...], attacks: [key, ...]}``; every (norm, ε, attack) of
an entry is a *point*: the registered measurement ``attack`` (rpat/evaluation/measurements.py) run with the threat
(norm, ε) in place of the cell's.
"""

from __future__ import annotations

from dataclasses import dataclass

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
