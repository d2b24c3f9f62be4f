"""Robustness curves -> figure: accuracy against ε per norm and attack, each baseline beside its +RPAT cell.

Reads the ``curve.json`` beside each eval.json (cells with an ``eval.eps_grid``, rpat/jobs/curve.py). One panel per
(dataset/model/training norm, curve norm, attack); one colour per method and recipe, the baseline dashed with
circles and +RPAT solid with stars; the mean over seeds, with a band of ± one std where there are several. ε = 0
is the cell's clean accuracy on the same examples.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from rpat import files
from rpat.cells import PLAIN, CellFiles
from rpat.report.plots import pyplot, save
from rpat.report.tables import method_label

NAME = "curves"
PANEL = ["dataset", "model", "norm", "curve_norm", "attack"]
LINE = ["method", "recipe"]
ATTACKS = {"pgd20": "PGD-20", "cw": "CW", "aa": "AutoAttack"}
NORMS = {"linf": "L∞", "l2": "L2", "l1": "L1"}


def wanted(cfg) -> bool:
    """Whether some cell of ``cfg`` has a robustness curve (then the report draws plots/curves.*)."""
    return any(cfg.settings(c).eval.eps_grid for c in cfg.cells())


def load(eval_files) -> list[dict]:
    """The curve.json records beside the given eval.json files (those that exist)."""
    out = []
    for f in eval_files:
        path = CellFiles.beside(f).curve
        if path.is_file():
            out.append(files.read_record(path, ("cell", "dataset", "model", "norm", "method", "rpat", "seed",
                                                "clean", "points")))
    return out


def frame(records: list[dict]) -> pd.DataFrame:
    """One row per cell and point, plus an ε = 0 row (clean accuracy) per curve norm and attack."""
    rows = []
    for r in records:
        base = {k: r[k] for k in ("dataset", "model", "norm", "method", "seed")} | {
            "recipe": r.get("recipe", PLAIN), "rpat": bool(r["rpat"])}
        lines = dict.fromkeys((p["norm"], p["attack"]) for p in r["points"])
        rows += [base | {"curve_norm": n, "attack": a, "eps": 0.0, "accuracy": r["clean"]} for n, a in lines]
        rows += [base | {"curve_norm": p["norm"], "attack": p["attack"], "eps": float(p["eps"]),
                         "accuracy": p["accuracy"]} for p in r["points"]]
    cols = PANEL[:3] + ["method", "recipe", "rpat", "seed", "curve_norm", "attack", "eps", "accuracy"]
    return pd.DataFrame(rows, columns=cols)


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and std (ddof=1; NaN for one seed) of the accuracy over seeds, per panel, line, RPAT and ε."""
    g = df.groupby(PANEL + LINE + ["rpat", "eps"], sort=True)["accuracy"]
    return g.agg(mean="mean", std="std", seeds="size").reset_index()


def _label(method: str, recipe: str, rpat: bool) -> str:
    return method_label(method, rpat) + ("" if recipe == PLAIN else f"+{recipe}")


def _panel(ax, grp: pd.DataFrame, colors: dict) -> None:
    for (method, recipe, rpat), line in grp.groupby(LINE + ["rpat"], sort=True):
        line = line.sort_values("eps")
        color = colors[(method, recipe)]
        ax.plot(line.eps, line["mean"], color=color, ls="-" if rpat else "--", marker="*" if rpat else "o",
                ms=7 if rpat else 4, lw=1.4, label=_label(method, recipe, rpat))
        spread = line["std"].fillna(0.0)
        if (line.seeds > 1).any():
            ax.fill_between(line.eps, line["mean"] - spread, line["mean"] + spread, color=color, alpha=0.15, lw=0)


def figure(records: list[dict], path: Path, title: str) -> list[Path]:
    """Write the curves figure to ``path`` (PNG) and its PDF twin."""
    plt = pyplot()
    agg = aggregate(frame(records))
    panels = list(agg.groupby(PANEL, sort=True)) if len(agg) else []
    ncols = min(3, max(1, len(panels)))
    nrows = max(1, -(-len(panels) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.6 * nrows), dpi=120, squeeze=False)
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    lines = sorted(set(zip(agg.method, agg.recipe))) if len(agg) else []
    colors = {k: palette[i % len(palette)] for i, k in enumerate(lines)}
    for ax, ((dataset, model, norm, curve_norm, attack), grp) in zip(axes.flat, panels):
        _panel(ax, grp, colors)
        ax.set_title(f"{dataset}/{model} ({NORMS.get(norm, norm)}-trained): {ATTACKS.get(attack, attack)}, "
                     f"{NORMS.get(curve_norm, curve_norm)}", fontsize=8)
        ax.set_xlabel(f"ε ({NORMS.get(curve_norm, curve_norm)})")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="best")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if not panels:
        axes.flat[0].text(0.5, 0.5, "no robustness curves (curve.json) beside the evaluations", ha="center")
    fig.suptitle(f"{title}: accuracy against ε; baseline dashed (o), +RPAT solid (*)"
                 + ("; band: ± std over seeds" if len(agg) and (agg.seeds > 1).any() else ""), fontsize=9)
    fig.tight_layout()
    return save(fig, path)
