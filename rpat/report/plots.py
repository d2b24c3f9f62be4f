"""Results -> figures: the trade-off plot (clean vs AutoAttack accuracy, baseline -> +RPAT)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from rpat import files
from rpat.cells import PLAIN


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


def tradeoff(agg: pd.DataFrame, path: Path, title: str) -> list[Path]:
    """Clean vs AA accuracy: a circle per baseline, a star per +RPAT run, an arrow between them."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, ((dataset, model, norm, method, recipe), grp) in enumerate(
            agg.groupby(["dataset", "model", "norm", "method", "recipe"])):
        c = colors[i % len(colors)]
        by = {bool(r.rpat): r for r in grp.itertuples()}
        label = f"{method}{'' if recipe == PLAIN else '+' + recipe} ({dataset}/{model}/{norm})"
        if False in by:
            ax.scatter(by[False].clean_mean, by[False].aa_mean, color=c, marker="o", label=label)
        if True in by:
            ax.scatter(by[True].clean_mean, by[True].aa_mean, color=c, marker="*", s=120,
                       label=None if False in by else label + " +RPAT")
        if False in by and True in by:
            ax.annotate("", xy=(by[True].clean_mean, by[True].aa_mean), xytext=(by[False].clean_mean, by[False].aa_mean),
                        arrowprops={"arrowstyle": "->", "color": c, "lw": 1.5})
    ax.set_xlabel("Clean accuracy (%)")
    ax.set_ylabel("AutoAttack accuracy (%)")
    ax.set_title(f"{title}: baseline (o) → +RPAT (*)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return save(fig, path)
