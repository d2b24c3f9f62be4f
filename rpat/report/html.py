"""The tables as one self-contained HTML page per table set (``tables/<stem>.html``).

Snakemake's HTML report shows images and HTML inline but offers CSV, Markdown and LaTeX only as downloads; this
page is what the report displays for a table set: the paper's layout (the rows of ``<stem>.md``), every cell's
row (``<stem>.csv``) and, for the whole grid, the paired comparisons (``comparison.csv``).
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import pandas as pd

from rpat import files
from rpat.report import tables

STYLE = ("body{font-family:sans-serif;font-size:13px;margin:1em}table{border-collapse:collapse;margin-bottom:1.5em}"
         "th,td{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#eee}"
         "td:first-child,th:first-child{text-align:left}p{max-width:70em}")


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _table(df: pd.DataFrame) -> str:
    return df.map(_cell).to_html(index=False, border=0)


def page(df: pd.DataFrame, rows: list[dict], title: str, comparisons: pd.DataFrame | None = None) -> str:
    """The HTML of one table set: ``df`` (one row per cell), ``rows`` (the paper's layout, from
    :func:`rpat.report.tables.table_rows`) and optionally the paired comparisons."""
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
           f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    if rows:
        out.append(f"<p>{html.escape(tables.caption(rows))}</p>")
        for key, grp in tables._blocks(rows).items():
            out += [f"<h2>{html.escape(' / '.join(key))}</h2>", _table(tables._frame(grp))]
    out += ["<h2>Every cell</h2>", _table(df)]
    if comparisons is not None and len(comparisons):
        out += ["<h2>Baseline vs +RPAT, per metric (comparison.csv)</h2>", _table(comparisons)]
    return "\n".join(out + ["</body></html>"])


def write_page(df: pd.DataFrame, path: Path, title: str, paper: pd.DataFrame,
               comparisons: pd.DataFrame | None = None, *, with_comparisons: bool = False) -> list[Path]:
    rows = tables.table_rows(tables.aggregate(df), paper, comparisons) if len(df) else []
    files.write_text(path, page(df, rows, title, comparisons if with_comparisons else None))
    return [path]
