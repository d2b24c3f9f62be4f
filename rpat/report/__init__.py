"""Results -> the paper's tables and figures.

Inputs are the cells' ``eval.json`` files (the source of truth) and, beside each, ``outcomes.npz`` (per-example
outcomes), ``perception.json`` and ``perception.npz`` where they exist. Outputs, under ``<results_dir>``
(:func:`outputs` lists them, so the workflow declares exactly what :func:`write_report` writes):
  tables/summary.csv     one row per cell: coordinates, every metric, the perception columns, what was evaluated
  tables/summary.md      the paper's layout per dataset/model/norm: baseline, +RPAT and the difference with its
                         95% paired interval and McNemar p, mean ± std over seeds, the paper's numbers beside ours
  tables/summary.tex     the same in LaTeX (booktabs)
  tables/summary.html    the same, every cell's row and the comparisons on one page (rpat.report.html)
  tables/<block>.*       the same per named grid block, when the config has several
  tables/comparison.csv  one row per (baseline, +RPAT) pair and metric: delta, interval, p (rpat.report.comparison)
  plots/tradeoff.png     clean vs AA with 95% intervals, an arrow from each baseline to its +RPAT run (and .pdf)
  plots/perception.png   the motivation figure: logit MSE under noise and PGD-20 by outcome (and .pdf)
  plots/path.png         MSE to the straight line along the path to PGD-20's example (and .pdf)
  plots/training/<cell>.png  each cell's loss and validation accuracies per epoch (rpat.report.training)
  plots/curves.png       accuracy against ε per norm and attack, baseline beside +RPAT (and .pdf), from the
                         curve.json beside each eval.json; only when some cell has an eval.eps_grid
"""

from __future__ import annotations

from pathlib import Path

from rpat.cells import block_cells
from rpat.report import comparison, curves, html, perception, plots, tables, training
from rpat.report.tables import aggregate, collect, paper_numbers  # noqa: F401 - the report's API

TABLE_FORMATS = ("csv", "md", "tex", "html")
PLOTS = ("tradeoff", "perception", "path")


def table_stems(cfg) -> list[str]:
    """One table set for the whole grid, and one per named block when there are several (the paper's tables)."""
    named = [b["name"] for b in cfg.blocks() if b.get("name")]
    return ["summary"] + (named if len(named) > 1 else [])


def outputs(cfg, out_dir: str | Path | None = None) -> list[Path]:
    """Every file :func:`write_report` writes for ``cfg``."""
    out = Path(out_dir or cfg.results_dir)
    files = [out / "tables" / f"{stem}.{ext}" for stem in table_stems(cfg) for ext in TABLE_FORMATS]
    files.append(out / "tables" / "comparison.csv")
    plotted = PLOTS + ((curves.NAME,) if curves.wanted(cfg) else ())
    files += [out / "plots" / f"{name}.{ext}" for name in plotted for ext in ("png", "pdf")]
    return files + [training.figure_path(out, c.id) for c in cfg.cells()]


def _table_sets(cfg, df):
    """(stem, rows of df, title) of each table set: the whole grid, then each named block."""
    yield "summary", df, cfg.experiment
    for stem in table_stems(cfg)[1:]:
        block = next(b for b in cfg.blocks() if b.get("name") == stem)
        ids = {c.id for c in block_cells(block)}
        yield stem, df[df.cell.isin(ids)], f"{cfg.experiment}: {stem}"


def write_report(cfg, eval_files: list[str] | None = None, out_dir: str | None = None) -> list[Path]:
    out = Path(out_dir or cfg.results_dir)
    if eval_files is None:
        eval_files = [cfg.files(c).primary_evaluation for c in cfg.cells()]
    files = [Path(f) for f in eval_files]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"missing evaluation results: {', '.join(missing[:5])}"
                                f"{' ...' if len(missing) > 5 else ''}; run the evaluate jobs first (snakemake)")
    records = perception.load(files)
    df = perception.add_columns(collect(files), records)
    cells = comparison.load_cells(files)
    comparisons = comparison.compare(cells)
    paper = paper_numbers()
    written = []
    for stem, part, title in _table_sets(cfg, df):
        written += tables.write_tables(part, out / "tables", stem, title, paper, comparisons)
        written += html.write_page(part, out / "tables" / f"{stem}.html", title, paper, comparisons,
                                   with_comparisons=stem == "summary")
    written += comparison.write_csv(comparisons, out / "tables" / "comparison.csv")
    written += plots.tradeoff(aggregate(df), out / "plots" / "tradeoff.png", cfg.experiment,
                              comparison.cell_intervals(cells))
    written += perception.motivation_figure(records, out / "plots" / "perception.png", cfg.experiment)
    written += perception.path_figure(records, out / "plots" / "path.png", cfg.experiment)
    if curves.wanted(cfg):
        written += curves.figure(curves.load(files), out / "plots" / f"{curves.NAME}.png", cfg.experiment)
    written += training.write_all(files, out)
    return written
