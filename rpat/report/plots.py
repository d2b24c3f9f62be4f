"""Results -> figures: the trade-off plot (clean vs AutoAttack accuracy, baseline -> +RPAT, with intervals)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from rpat import files
from rpat.cells import PLAIN

# Points closer than this fraction of the axis range (on both axes) would overlap: they are spread apart.
OVERLAP = 0.01
SPREAD_POINTS = 6.0  # radius, in typographic points, of the circle overlapping points are spread on


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> list[Path]:
    """Write ``path`` (PNG) and its PDF twin atomically; returns both."""
    paths = [path, path.with_suffix(".pdf")]
    for p in paths:
        files.atomic_write(p, lambda tmp, p=p: fig.savefig(tmp, format=p.suffix[1:]))
    pyplot().close(fig)
    return paths


def spread(xy: list[tuple[float, float]], tol: tuple[float, float]) -> list[tuple[float, float]]:
    """Display offsets (points) that put each group of overlapping positions on a small circle, in order.

    Positions within ``tol`` of another on both axes form a group (transitively); a lone position stays put."""
    group = list(range(len(xy)))

    def root(i):
        while group[i] != i:
            i = group[i]
        return i

    for i in range(len(xy)):
        for j in range(i):
            if abs(xy[i][0] - xy[j][0]) <= tol[0] and abs(xy[i][1] - xy[j][1]) <= tol[1]:
                group[root(i)] = root(j)
    members: dict[int, list[int]] = {}
    for i in range(len(xy)):
        members.setdefault(root(i), []).append(i)
    out = [(0.0, 0.0)] * len(xy)
    for idx in members.values():
        if len(idx) > 1:
            for k, i in enumerate(idx):
                angle = math.pi / 2 + 2 * math.pi * k / len(idx)
                out[i] = (SPREAD_POINTS * math.cos(angle), SPREAD_POINTS * math.sin(angle))
    return out


def _interval(intervals: pd.DataFrame | None, row, metric: str) -> tuple[float, float]:
    """(minus, plus) error-bar lengths from the cell's bootstrap interval, (0, 0) without one."""
    if intervals is None or not len(intervals):
        return 0.0, 0.0
    keys = ["dataset", "model", "norm", "method", "recipe", "rpat"]
    hit = intervals[(intervals[keys] == pd.Series({k: getattr(row, k) for k in keys})).all(axis=1)]
    if not len(hit) or pd.isna(hit.iloc[0][f"{metric}_lo"]):
        return 0.0, 0.0
    mean = getattr(row, f"{metric}_mean")
    return max(0.0, mean - hit.iloc[0][f"{metric}_lo"]), max(0.0, hit.iloc[0][f"{metric}_hi"] - mean)


def _points(agg: pd.DataFrame, intervals: pd.DataFrame | None) -> list[dict]:
    plt = pyplot()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    points = []
    groups = agg.groupby(["dataset", "model", "norm", "method", "recipe"])
    for i, ((dataset, model, norm, method, recipe), grp) in enumerate(groups):
        has_baseline = not grp.rpat.all()
        name = method if recipe == PLAIN else f"{method}+{recipe}"
        for r in grp.itertuples():  # one legend entry per method: the baseline's, else the +RPAT run's
            label = None if r.rpat and has_baseline else f"{name} ({dataset}/{model}/{norm})" + (
                " +RPAT" if r.rpat else "")
            points.append({"x": r.clean_mean, "y": r.aa_mean, "xerr": _interval(intervals, r, "clean"),
                           "yerr": _interval(intervals, r, "aa"), "color": colors[i % len(colors)],
                           "rpat": bool(r.rpat), "group": i, "label": label})
    return [p for p in points if not (pd.isna(p["x"]) or pd.isna(p["y"]))]


def _limits(points: list[dict]) -> tuple[tuple[float, float], tuple[float, float]]:
    lo_x = min(p["x"] - p["xerr"][0] for p in points)
    hi_x = max(p["x"] + p["xerr"][1] for p in points)
    lo_y = min(p["y"] - p["yerr"][0] for p in points)
    hi_y = max(p["y"] + p["yerr"][1] for p in points)
    pad_x, pad_y = max(1.0, 0.08 * (hi_x - lo_x)), max(1.0, 0.08 * (hi_y - lo_y))
    return (lo_x - pad_x, hi_x + pad_x), (lo_y - pad_y, hi_y + pad_y)


def _draw(ax, p: dict) -> None:
    """One cell: its error bars and marker, drawn through its (possibly offset) transform."""
    ax.errorbar([p["x"]], [p["y"]], xerr=[[e] for e in p["xerr"]], yerr=[[e] for e in p["yerr"]], fmt="none",
                ecolor=p["color"], alpha=0.5, lw=1, capsize=2, transform=p["transform"])
    star = p["rpat"]
    ax.scatter([p["x"]], [p["y"]], color=p["color"], marker="*" if star else "o", s=120 if star else 40,
               edgecolors="black" if star else "none", linewidths=0.5, label=p["label"], transform=p["transform"],
               zorder=3)


def _arrows(ax, points: list[dict]) -> None:
    arrow = {"arrowstyle": "->", "lw": 1.2, "shrinkA": 4, "shrinkB": 6}
    for base in (p for p in points if not p["rpat"]):
        for treated in (q for q in points if q["rpat"] and q["group"] == base["group"]):
            ax.annotate("", xy=(treated["x"], treated["y"]), xycoords=treated["transform"],
                        xytext=(base["x"], base["y"]), textcoords=base["transform"],
                        arrowprops=arrow | {"color": base["color"]})


def tradeoff_figure(agg: pd.DataFrame, title: str, intervals: pd.DataFrame | None = None):
    """The trade-off figure: per cell (mean over seeds) a circle (baseline) or star (+RPAT) with its 95% bootstrap
    intervals of Clean and AA as error bars, an arrow from each baseline to its +RPAT run; cells at (nearly) the
    same place are spread a few points apart so that none hides another."""
    from matplotlib.transforms import offset_copy

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    points = _points(agg, intervals)
    if points:
        xlim, ylim = _limits(points)
        ax.set_xlim(*xlim)
        ax.set_ylim(*ylim)
        tol = (OVERLAP * (xlim[1] - xlim[0]), OVERLAP * (ylim[1] - ylim[0]))
        for p, (dx, dy) in zip(points, spread([(p["x"], p["y"]) for p in points], tol)):
            p["transform"] = offset_copy(ax.transData, fig=fig, x=dx, y=dy, units="points")
            _draw(ax, p)
        _arrows(ax, points)
    ax.set_xlabel("Clean accuracy (%)")
    ax.set_ylabel("AutoAttack accuracy (%)")
    ax.set_title(f"{title}: baseline (o) → +RPAT (*), 95% intervals", fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def tradeoff(agg: pd.DataFrame, path: Path, title: str, intervals: pd.DataFrame | None = None) -> list[Path]:
    """Write ``tradeoff_figure`` to ``path`` (PNG) and its PDF twin."""
    return save(tradeoff_figure(agg, title, intervals), path)
