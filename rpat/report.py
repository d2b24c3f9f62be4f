"""Results -> the paper's tables and trade-off plots.

Inputs are the cells' ``eval.json`` files (the source of truth). Outputs, under ``<results_dir>``:
  tables/summary.csv   one row per cell: coordinates, clean, pgd20, cw, aa, mean, nrr, ...
  tables/summary.md    the paper's layout per dataset/model/norm: baseline, +RPAT and the difference,
                       mean +- std over seeds, the paper's reported numbers beside ours where they exist
  tables/summary.tex   the same in LaTeX (booktabs)
  tables/<block>.*     the same per named grid block, when the config has several
  plots/tradeoff.png   clean vs AA, an arrow from each baseline to its +RPAT run (and .pdf)
"""

from __future__ import annotations

import math
from importlib import resources
from io import StringIO
from pathlib import Path

import pandas as pd

from rpat import runtime
from rpat.config import Config, block_cells

METRICS = ["clean", "aa", "mean", "nrr", "pgd20", "cw"]
HEADERS = {"clean": "Clean", "aa": "AA", "mean": "Mean", "nrr": "NRR", "pgd20": "PGD-20", "cw": "CW"}
COORDS = ["dataset", "model", "norm", "method", "rpat"]
PAPER_NAMES = {
    "dataset": {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "tinyimagenet": "Tiny-ImageNet"},
    "model": {"preact_resnet18": "PreActResNet-18", "wrn34_10": "WRN-34-10", "resnet18": "ResNet-18"},
    "norm": {"linf": "Linf", "l2": "L2"},
    "method": {("rebat", False): "ReBAT", ("rebat", True): "RPAT++", ("pgd_at", False): "PGD-AT",
               ("pgd_at", True): "PGD-AT+RPAT", ("trades", False): "TRADES", ("trades", True): "TRADES+RPAT",
               ("mart", False): "MART", ("mart", True): "MART+RPAT", ("consistency", False): "Consistency-AT",
               ("consistency", True): "Consistency-AT+RPAT"},
}


def paper_numbers() -> pd.DataFrame:
    text = resources.files("rpat").joinpath("paper_numbers.csv").read_text()
    return pd.read_csv(StringIO(text))


def collect(eval_files: list[Path]) -> pd.DataFrame:
    rows = []
    for f in eval_files:
        r = runtime.read_json(f)
        rows.append({
            "dataset": r["dataset"], "model": r["model"], "norm": r["norm"], "method": r["method"],
            "rpat": bool(r["rpat"]), "seed": int(r["seed"]),
            **{m: r.get(m) for m in ["clean", "pgd20", "cw", "aa", "mean", "nrr"]},
            "n_examples": r["n_examples"], "eps": r["eps"], "checkpoint": r["checkpoint"],
            "selected_on": r.get("selection", {}).get("split"), "cell": r["cell"],
        })
    cols = COORDS + ["seed", "clean", "pgd20", "cw", "aa", "mean", "nrr", "n_examples", "eps", "checkpoint",
                     "selected_on", "cell"]
    return pd.DataFrame(rows, columns=cols).sort_values(COORDS + ["seed"]).reset_index(drop=True)


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and std (ddof=1; NaN for one seed) over seeds per grid coordinate."""
    g = df.groupby(COORDS, sort=True)
    out = g[METRICS].mean().add_suffix("_mean").join(g[METRICS].std(ddof=1).add_suffix("_std"))
    out["n_seeds"] = g.size()
    return out.reset_index()


def _paper_value(paper: pd.DataFrame, row, metric: str) -> float | None:
    names = (PAPER_NAMES["dataset"].get(row.dataset), PAPER_NAMES["model"].get(row.model),
             PAPER_NAMES["norm"].get(row.norm), PAPER_NAMES["method"].get((row.method, row.rpat)))
    if None in names:
        return None
    hit = paper[(paper.dataset == names[0]) & (paper.model == names[1]) & (paper.norm == names[2])
                & (paper.method == names[3])]
    return float(hit.iloc[0][metric]) if len(hit) and metric in hit.columns else None


def _fmt(mean: float, std: float | None, n: int) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    return f"{mean:.2f} ± {std:.2f}" if n > 1 and std is not None and not math.isnan(std) else f"{mean:.2f}"


def table_rows(agg: pd.DataFrame, paper: pd.DataFrame) -> list[dict]:
    """Rows in the paper's layout: per (dataset, model, norm, method): baseline, +RPAT, Δ."""
    rows = []
    for (dataset, model, norm, method), grp in agg.groupby(["dataset", "model", "norm", "method"], sort=True):
        by = {bool(r.rpat): r for r in grp.itertuples()}
        for on in (False, True):
            if on not in by:
                continue
            r = by[on]
            label = ("RPAT++" if method == "rebat" else f"{method}+RPAT") if on else method
            row = {"dataset": dataset, "model": model, "norm": norm, "method": label, "seeds": int(r.n_seeds)}
            for m in METRICS:
                row[m] = _fmt(getattr(r, f"{m}_mean"), getattr(r, f"{m}_std"), r.n_seeds)
            for m in ("clean", "aa", "mean", "nrr"):
                pv = _paper_value(paper, r, m)
                row[f"paper_{m}"] = f"{pv:.2f}" if pv is not None else ""
            rows.append(row)
        if False in by and True in by:
            row = {"dataset": dataset, "model": model, "norm": norm, "method": "Δ", "seeds": ""}
            for m in METRICS:
                d = getattr(by[True], f"{m}_mean") - getattr(by[False], f"{m}_mean")
                row[m] = "–" if d is None or math.isnan(d) else f"{d:+.2f}"
            row.update({f"paper_{m}": "" for m in ("clean", "aa", "mean", "nrr")})
            rows.append(row)
    return rows


def _columns(rows: list[dict]) -> list[str]:
    cols = ["method", "seeds"] + METRICS
    if any(r.get(f"paper_{m}") for r in rows for m in ("clean", "aa", "mean", "nrr")):
        cols += [f"paper_{m}" for m in ("clean", "aa", "mean", "nrr")]
    return cols


def _title(key) -> str:
    return " / ".join(key)


def _header(col: str) -> str:
    return f"paper {HEADERS[col[6:]]}" if col.startswith("paper_") else HEADERS.get(col, col.capitalize())


def markdown(rows: list[dict], title: str) -> str:
    out = [f"# {title}", "",
           "Accuracies in % on the evaluated test examples; Mean = (Clean + AA)/2, NRR = 2·Clean·AA/(Clean + AA); "
           "mean ± std over seeds where there are several; `paper` columns: numbers reported in the paper.", ""]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["model"], r["norm"]), []).append(r)
    for key, grp in groups.items():
        cols = _columns(grp)
        out += [f"## {_title(key)}", "", "| " + " | ".join(_header(c) for c in cols) + " |",
                "|" + "|".join("---" for _ in cols) + "|"]
        out += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in grp]
        out.append("")
    return "\n".join(out)


def latex(rows: list[dict], title: str) -> str:
    def esc(s: str) -> str:
        return str(s).replace("_", r"\_").replace("±", r"$\pm$").replace("Δ", r"$\Delta$")

    out = [f"% {title}"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["model"], r["norm"]), []).append(r)
    for key, grp in groups.items():
        cols = _columns(grp)
        out += [r"\begin{table}[t]", r"\centering", f"\\caption{{{esc(_title(key))}}}",
                r"\begin{tabular}{l" + "r" * (len(cols) - 1) + "}", r"\toprule",
                " & ".join(esc(_header(c)) for c in cols) + r" \\", r"\midrule"]
        out += [" & ".join(esc(r[c]) for c in cols) + r" \\" for r in grp]
        out += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(out)


def tradeoff_plot(agg: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, ((dataset, model, norm, method), grp) in enumerate(agg.groupby(["dataset", "model", "norm", "method"])):
        c = colors[i % len(colors)]
        by = {bool(r.rpat): r for r in grp.itertuples()}
        label = f"{method} ({dataset}/{model}/{norm})"
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
    path.parent.mkdir(parents=True, exist_ok=True)
    for p in (path, path.with_suffix(".pdf")):
        runtime.atomic_write(p, lambda tmp, p=p: fig.savefig(tmp, format=p.suffix[1:]))
    plt.close(fig)


def _write_text(path: Path, text: str) -> None:
    def write(tmp):
        Path(tmp).write_text(text)

    runtime.atomic_write(path, write)


def write_tables(df: pd.DataFrame, out: Path, stem: str, title: str, paper: pd.DataFrame) -> list[Path]:
    tables = out / "tables"
    tables.mkdir(parents=True, exist_ok=True)
    rows = table_rows(aggregate(df), paper) if len(df) else []
    csv_path, md_path, tex_path = (tables / f"{stem}.{ext}" for ext in ("csv", "md", "tex"))
    runtime.atomic_write(csv_path, lambda tmp: df.to_csv(tmp, index=False, float_format="%.4f"))
    _write_text(md_path, markdown(rows, title))
    _write_text(tex_path, latex(rows, title))
    return [csv_path, md_path, tex_path]


def write_report(cfg: Config, eval_files: list[str] | None = None, out_dir: str | None = None) -> list[Path]:
    out = Path(out_dir or cfg.results_dir)
    runs = Path(cfg.results_dir) / "runs"
    if eval_files is None:
        eval_files = [runs / c.id / "eval.json" for c in cfg.cells()]
    files = [Path(f) for f in eval_files]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"missing evaluation results: {', '.join(missing[:5])}"
                                f"{' ...' if len(missing) > 5 else ''}; run the evaluate jobs first (snakemake)")
    df = collect(files)
    paper = paper_numbers()
    written = write_tables(df, out, "summary", cfg.experiment, paper)
    named = [b for b in cfg.blocks() if b.get("name")]
    if len(named) > 1:
        for block in named:
            ids = {c.id for c in block_cells(block)}
            written += write_tables(df[df.cell.isin(ids)], out, block["name"], f"{cfg.experiment}: {block['name']}",
                                    paper)
    plot = out / "plots" / "tradeoff.png"
    tradeoff_plot(aggregate(df), plot, cfg.experiment)
    return written + [plot, plot.with_suffix(".pdf")]

