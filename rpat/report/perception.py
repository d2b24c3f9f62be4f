"""Perception results (perception.json beside each eval.json) -> summary.csv columns and the two figures.

- plots/perception.png: the paper's motivation figure. Per perturbation (uniform noise in the eps-ball, PGD-20)
  and training method: bars of MSE(z(x), z(x')) over all examples, the success cases (x' still classified
  correctly) and the failure cases; on a second axis, lines of the clean and perturbed accuracy.
- plots/path.png: the MSE between z(x + a(x' - x)) and the straight line (1 - a) z(x) + a z(x') against a,
  x' = PGD-20's example, each baseline beside its +RPAT run (means over seeds).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from rpat import files
from rpat.report.plots import pyplot, save
from rpat.cells import PLAIN, CellFiles
from rpat.report.tables import COORDS, method_label

PERTURBATIONS = {"noise": "uniform noise in the ε-ball", "pgd20": "PGD-20"}
GROUPS = ("all", "success", "failure")
COLUMNS = (["nonlinearity", "mid_clean", "mid_adv", "noise_acc"]
           + [f"mse_{p}_{g}" for p in PERTURBATIONS for g in GROUPS])


def _float(v) -> float:
    return np.nan if v is None else float(v)


def load(eval_files) -> list[dict]:
    """The perception.json records beside the given eval.json files (those that exist), with their per-alpha path."""
    out = []
    for f in eval_files:
        path = CellFiles.beside(f).perception
        if path.is_file():
            r = files.read_record(path, ("cell", "noise", "pgd20", "path"))
            out.append(r | {"rpat": bool(r["rpat"]), "seed": int(r["seed"])})
    return out


def columns_of(record: dict) -> dict:
    """One summary.csv row's perception columns from a perception.json record."""
    row = {"cell": record["cell"], "nonlinearity": _float(record["path"]["nonlinearity"]),
           "mid_clean": _float(record["path"]["mid_clean"]), "mid_adv": _float(record["path"]["mid_adv"]),
           "noise_acc": _float(record["noise"]["perturbed_acc"])}
    for p in PERTURBATIONS:
        row.update({f"mse_{p}_{g}": _float(record[p]["mse"][g]) for g in GROUPS})
    return row


def add_columns(df: pd.DataFrame, records: list[dict]) -> pd.DataFrame:
    """``df`` (one row per cell) with the perception columns after its metrics (NaN for cells without)."""
    cols = pd.DataFrame([columns_of(r) for r in records], columns=["cell", *COLUMNS])
    merged = df.merge(cols, on="cell", how="left")
    at = list(df.columns).index("n_examples") if "n_examples" in df.columns else len(df.columns)
    order = list(df.columns[:at]) + COLUMNS + list(df.columns[at:])
    return merged[order]


def _by_coords(records: list[dict]) -> pd.DataFrame:
    """Per grid coordinate (mean over seeds): accuracies, MSE split per perturbation, the per-alpha path."""
    rows = []
    for r in records:
        path = r["path"]
        row = {k: r.get(k, PLAIN) if k == "recipe" else r[k] for k in COORDS} | {
                                            "label": method_label(r["method"], r["rpat"]) + (
                                                "" if r.get("recipe", PLAIN) == PLAIN else f"+{r['recipe']}"),
                                            "per_alpha": np.asarray(path["per_alpha"], dtype=float),
                                            "alphas": tuple(path["alphas"]),
                                            "nonlinearity": _float(path["nonlinearity"])}
        for p in PERTURBATIONS:
            row |= {f"{p}_clean": _float(r[p]["clean_acc"]), f"{p}_acc": _float(r[p]["perturbed_acc"])}
            row |= {f"{p}_{g}": _float(r[p]["mse"][g]) for g in GROUPS}
            row |= {f"{p}_n_{g}": int(r[p]["mse"]["n" if g == "all" else f"n_{g}"]) for g in GROUPS}
        rows.append(row)
    df = pd.DataFrame(rows)
    counts = [c for c in df.columns if "_n_" in c]
    numeric = [c for c in df.columns if c not in COORDS + ["label", "per_alpha", "alphas"] + counts]
    g = df.groupby(COORDS + ["label"], sort=True)
    out = g[numeric].mean().join(g[counts].sum())  # MSEs: mean over seeds; examples per group: summed
    out["per_alpha"] = g["per_alpha"].apply(lambda s: np.mean(np.stack(list(s)), axis=0))
    out["alphas"] = g["alphas"].first()
    out["seeds"] = g.size()
    return out.reset_index()


def _empty(path: Path, what: str) -> list[Path]:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 2.4), dpi=120)
    ax.axis("off")
    ax.text(0.5, 0.5, f"no perception results: {what}", ha="center", va="center")
    return save(fig, path)


def _motivation_panel(ax, grp: pd.DataFrame, key: str) -> list:
    """Bars (all / success / failure MSE) per method for perturbation ``key``; accuracies on a twin axis."""
    x = np.arange(len(grp))
    width, colors = 0.26, {"all": "0.55", "success": "tab:green", "failure": "tab:red"}
    for k, g in enumerate(GROUPS):
        bars = ax.bar(x + (k - 1) * width, grp[f"{key}_{g}"].fillna(0).to_numpy(), width, color=colors[g],
                      label=f"MSE, {g}")
        if g != "all":  # how many examples each mean is over: a group of a few says little
            ax.bar_label(bars, [f"n={n}" for n in grp[f"{key}_n_{g}"]], fontsize=5, padding=1)
    values = grp[[f"{key}_{g}" for g in GROUPS]].to_numpy().ravel()
    positive = values[np.isfinite(values) & (values > 0)]
    if len(positive) and positive.max() / positive.min() > 100:
        ax.set_yscale("log")
    ax.set_xticks(x, grp["label"], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("MSE(z(x), z(x'))" + (" (log)" if ax.get_yscale() == "log" else ""))
    acc = ax.twinx()
    acc.plot(x, grp[f"{key}_clean"], "k-o", ms=4, label="clean accuracy")
    acc.plot(x, grp[f"{key}_acc"], "k--s", ms=4, label="perturbed accuracy")
    acc.set_ylim(0, 105)
    acc.set_ylabel("accuracy (%)")
    return ax.get_legend_handles_labels()[0] + acc.get_legend_handles_labels()[0]


def motivation_figure(records: list[dict], path: Path, title: str) -> list[Path]:
    """plots/perception.png (and .pdf): one row of panels per dataset/model/norm, one column per perturbation."""
    if not records:
        return _empty(path, "run `rpat perceive` (the workflow's perceive jobs) for the motivation figure")
    agg = _by_coords(records)
    combos = list(agg.groupby(["dataset", "model", "norm"], sort=True))
    plt = pyplot()
    fig, axes = plt.subplots(len(combos), len(PERTURBATIONS), squeeze=False, dpi=120,
                             figsize=(4.2 * len(PERTURBATIONS) + 0.6, 3.6 * len(combos) + 0.6))
    for row, ((dataset, model, norm), grp) in enumerate(combos):
        for col, (key, name) in enumerate(PERTURBATIONS.items()):
            handles = _motivation_panel(axes[row, col], grp, key)
            axes[row, col].set_title(f"{dataset}/{model}/{norm}: {name}", fontsize=9)
    fig.legend(handles, [h.get_label() for h in handles], loc="lower center", ncol=5, fontsize=7)
    fig.suptitle(f"{title}: logit MSE between clean and perturbed inputs, by outcome", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return save(fig, path)


def path_figure(records: list[dict], path: Path, title: str) -> list[Path]:
    """plots/path.png (and .pdf): per dataset/model/norm/method, MSE to the straight line against alpha, the
    baseline (solid) beside its +RPAT run (dashed); the legend gives each run's nonlinearity."""
    if not records:
        return _empty(path, "run `rpat perceive` (the workflow's perceive jobs) for the path figure")
    agg = _by_coords(records)
    panels = list(agg.groupby(["dataset", "model", "norm", "method", "recipe"], sort=True))
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    plt = pyplot()
    fig, axes = plt.subplots(rows, cols, squeeze=False, dpi=120, figsize=(3.6 * cols + 0.4, 3.0 * rows + 0.6))
    for ax, ((dataset, model, norm, method, recipe), grp) in zip(axes.ravel(), panels):
        for r in grp.sort_values("rpat").itertuples():
            ax.plot(r.alphas, r.per_alpha, "--*" if r.rpat else "-o", ms=4,
                    label=f"{r.label}: {r.nonlinearity:.3g}" + (f" ({r.seeds} seeds)" if r.seeds > 1 else ""))
        name = method_label(method, False) + ("" if recipe == PLAIN else f"+{recipe}")
        ax.set_title(f"{dataset}/{model}/{norm}: {name}", fontsize=9)
        ax.set_xlabel("α  (x + α(x' − x), x' = PGD-20)", fontsize=8)
        ax.set_ylabel("MSE to the straight line", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="nonlinearity", title_fontsize=7)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{title}: logits along the path to the adversarial example", fontsize=10)
    fig.tight_layout()
    return save(fig, path)
