"""Which of the report's files are pages of Snakemake's HTML report (``snakemake --report``), and how each is
filed there: its caption (a file of workflow/report/), category, subcategory and labels.

Each table set's HTML page and CSV are pages, and so are the comparison CSV, the figures (PNG) and every cell's
training curves; the Markdown and LaTeX tables and the figures' PDF twins are outputs only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rpat.report import PLOTS, table_stems
from rpat.report import curves, training

TABLES, FIGURES = "Tables", "Figures"
PAGE_TABLE_FORMATS = ("csv", "html")
FIGURE_GROUPS = {"tradeoff": "trade-off", curves.NAME: "robustness curves", "perception": "perception",
                 "path": "perception"}


@dataclass(frozen=True)
class Page:
    caption: str  # the caption's name in workflow/report/, without .rst
    category: str
    subcategory: str
    labels: dict = field(default_factory=dict)


def report_pages(cfg, out_dir: str | Path | None = None) -> dict[Path, Page]:
    """The pages among :func:`rpat.report.outputs`, by path."""
    out = Path(out_dir or cfg.results_dir)
    pages = {out / "tables" / f"{stem}.{ext}": Page("summary", TABLES, stem, {"format": ext})
             for stem in table_stems(cfg) for ext in PAGE_TABLE_FORMATS}
    pages[out / "tables" / "comparison.csv"] = Page("comparison", TABLES, "comparison", {"format": "csv"})
    plotted = PLOTS + ((curves.NAME,) if curves.wanted(cfg) else ())
    pages.update({out / "plots" / f"{name}.png": Page(name, FIGURES, FIGURE_GROUPS[name], {"figure": name})
                  for name in plotted})
    for c in cfg.cells():
        pages[training.figure_path(out, c.id)] = Page(
            "training", f"Training curves: {c.dataset} / {c.model}", c.norm,
            {"method": c.method_label, "seed": str(c.seed)})
    return pages
