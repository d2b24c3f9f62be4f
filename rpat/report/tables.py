"""Results -> the paper's tables: one CSV row per cell; per dataset/model/norm the baseline, +RPAT and Δ rows
with mean ± std over seeds and the paper's reported numbers beside ours; Markdown and LaTeX by pandas.

Metric names, headers and the paper's display names come from the registries (``rpat.catalog``), so a new
measurement or method appears here without editing this module.
"""

from __future__ import annotations

import math
from importlib import resources
from io import StringIO
from pathlib import Path
from typing import Iterable

import pandas as pd

from rpat import files
from rpat.cells import Cell, CellError
from rpat.catalog import catalog
from rpat.cells import PLAIN

COORDS = ["dataset", "model", "norm", "method", "recipe", "rpat"]
GROUP = ["dataset", "model", "norm"]
PAPER_METRICS = ("clean", "aa", "mean", "nrr")


def metrics() -> list[dict]:
    """Measured and derived metrics in table order: the paper's columns first, then the others."""
    cat = catalog()
    every = cat["measurements"] + cat["derived"]
    return [m for m in every if m["paper"]] + [m for m in every if not m["paper"]]


def metric_keys() -> list[str]:
    return [m["key"] for m in metrics()]


def paper_numbers() -> pd.DataFrame:
    text = resources.files("rpat.report").joinpath("paper_numbers.csv").read_text()
    return pd.read_csv(StringIO(text))


RECORD_KEYS = ("cell", "dataset", "model", "norm", "method", "rpat", "seed", "n_examples", "eps", "checkpoint")


def _cell_of(path: Path) -> Cell | None:
    """The cell whose directory holds ``path`` (``.../<dataset>/<model>/<norm>/<method>/seedN/eval.json``)."""
    try:
        return Cell.parse("/".join(path.parent.parts[-5:]))
    except CellError:
        return None


def _checked(path: Path, cell: Cell | None) -> dict:
    """The eval.json in ``path``, refused (naming the file and the fix) if it is malformed or if its coordinates
    are not those of ``cell`` (by default the cell whose directory holds it)."""
    r = files.read_record(path, RECORD_KEYS)
    try:
        claimed = Cell.parse(str(r["cell"]))
    except CellError:
        raise files.ResultFileError(f"{path}: its cell {r['cell']!r} is not a cell id; delete it and rerun the "
                                    "evaluation") from None
    coords = {k: r[k] for k in claimed.coordinates()}
    expected = cell or _cell_of(path) or claimed
    if claimed.coordinates() != coords or claimed != expected:
        shown = ", ".join(f"{k}={v}" for k, v in coords.items())
        raise files.ResultFileError(f"{path} holds the results of another cell ({shown}; cell {r['cell']}), not "
                                    f"{expected.id}; it was copied or moved: delete it and rerun `rpat evaluate "
                                    f"--cell {expected.id}` (snakemake does)")
    return r


def collect(eval_files: Iterable[Path | tuple[Cell, Path]]) -> pd.DataFrame:
    """One row per eval.json: coordinates, every metric, and what was evaluated. Each item is a path, read as
    the results of the cell whose directory holds it, or a (cell, path) pair; a malformed file or one holding
    another cell's results is refused (:class:`rpat.files.ResultFileError`)."""
    cat = catalog()
    csv_order = [m["key"] for m in cat["measurements"] + cat["derived"]]
    rows = []
    for item in eval_files:
        cell, f = item if isinstance(item, tuple) else (None, item)
        r = _checked(Path(f), cell)
        rows.append({"dataset": r["dataset"], "model": r["model"], "norm": r["norm"], "method": r["method"],
                     "recipe": r.get("recipe", PLAIN), "rpat": bool(r["rpat"]), "seed": int(r["seed"]),
                     **{m: r.get(m) for m in csv_order},
                     "n_examples": r["n_examples"], "eps": r["eps"], "checkpoint": r["checkpoint"],
                     "selected_on": (r.get("selection") or {}).get("split"), "cell": r["cell"]})
    cols = COORDS + ["seed"] + csv_order + ["n_examples", "eps", "checkpoint", "selected_on", "cell"]
    return pd.DataFrame(rows, columns=cols).sort_values(COORDS + ["seed"]).reset_index(drop=True)


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and std (ddof=1; NaN for one seed) over seeds per grid coordinate."""
    keys = metric_keys()
    g = df.groupby(COORDS, sort=True)
    out = g[keys].mean().add_suffix("_mean").join(g[keys].std(ddof=1).add_suffix("_std"))
    out["n_seeds"] = g.size()
    return out.reset_index()


def _display(kind: str, name: str) -> str:
    return catalog()["display"][kind].get(name, name)


def method_label(method: str, rpat: bool) -> str:
    o = catalog()["objectives"].get(method)
    return (o["rpat_display"] if rpat else o["display"]) if o else (f"{method}+RPAT" if rpat else method)


def _paper_value(paper: pd.DataFrame, row, metric: str) -> float | None:
    if row.recipe != PLAIN:  # the paper trained without recipes
        return None
    hit = paper[(paper.dataset == _display("dataset", row.dataset)) & (paper.model == _display("model", row.model))
                & (paper.norm == _display("norm", row.norm)) & (paper.method == method_label(row.method, row.rpat))]
    return float(hit.iloc[0][metric]) if len(hit) and metric in hit.columns else None


def _fmt(mean: float, std: float | None, n: int) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    return f"{mean:.2f} ± {std:.2f}" if n > 1 and std is not None and not math.isnan(std) else f"{mean:.2f}"


def table_rows(agg: pd.DataFrame, paper: pd.DataFrame) -> list[dict]:
    """Rows in the paper's layout: per (dataset, model, norm, method, recipe): baseline, +RPAT, Δ (plain first)."""
    keys, rows = metric_keys(), []
    groups = sorted(agg.groupby(GROUP + ["method", "recipe"], sort=True), key=lambda g: (*g[0][:4], g[0][4] != PLAIN))
    for (dataset, model, norm, method, recipe), grp in groups:
        by = {bool(r.rpat): r for r in grp.itertuples()}
        base = {"dataset": dataset, "model": model, "norm": norm, "recipe": recipe}
        for on in (False, True):
            if on in by:
                r = by[on]
                row = {**base, "method": method_label(method, on), "seeds": int(r.n_seeds)}
                row.update({m: _fmt(getattr(r, f"{m}_mean"), getattr(r, f"{m}_std"), r.n_seeds) for m in keys})
                for m in PAPER_METRICS:
                    pv = _paper_value(paper, r, m)
                    row[f"paper_{m}"] = f"{pv:.2f}" if pv is not None else ""
                rows.append(row)
        if False in by and True in by:
            row = {**base, "method": "Δ", "seeds": ""}
            for m in keys:
                d = getattr(by[True], f"{m}_mean") - getattr(by[False], f"{m}_mean")
                row[m] = "–" if d is None or math.isnan(d) else f"{d:+.2f}"
            rows.append({**row, **{f"paper_{m}": "" for m in PAPER_METRICS}})
    return rows


def _frame(rows: list[dict]) -> pd.DataFrame:
    """A block's rows with display headers; the paper's columns only where it reports numbers."""
    headers = {m["key"]: m["header"] for m in metrics()}
    recipes = any(r.get("recipe", PLAIN) != PLAIN for r in rows)
    cols = ["method"] + (["recipe"] if recipes else []) + ["seeds"] + metric_keys()
    if any(r.get(f"paper_{m}") for r in rows for m in PAPER_METRICS):
        cols += [f"paper_{m}" for m in PAPER_METRICS]
    names = {c: f"paper {headers[c[6:]]}" if c.startswith("paper_") else headers.get(c, c.capitalize()) for c in cols}
    return pd.DataFrame(rows, columns=cols).rename(columns=names)


def _blocks(rows: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in GROUP), []).append(r)
    return groups


CAPTION = ("Accuracies in % on the evaluated test examples; Mean = (Clean + AA)/2, NRR = 2·Clean·AA/(Clean + AA); "
           "mean ± std over seeds where there are several; `paper` columns: numbers reported in the paper.")


def markdown(rows: list[dict], title: str) -> str:
    out = [f"# {title}", "", CAPTION, ""]
    for key, grp in _blocks(rows).items():
        out += [f"## {' / '.join(key)}", "", _frame(grp).to_markdown(index=False, tablefmt="pipe", disable_numparse=True), ""]
    return "\n".join(out)


_LATEX_SYMBOLS = {"±": r"$\pm$", "Δ": r"$\Delta$", "∞": r"$\infty$", "–": "--"}


def latex(rows: list[dict], title: str) -> str:
    """booktabs tables; every cell and header escaped for LaTeX (``%``, ``&``, ``_``, ...) by pandas."""
    out = [f"% {title}"]
    for key, grp in _blocks(rows).items():
        frame = _frame(grp)
        styler = frame.style.hide(axis="index").format(escape="latex").format_index(escape="latex", axis=1)
        tex = styler.to_latex(hrules=True, caption=_escape(" / ".join(key)), position="t",
                              column_format="l" + "r" * (frame.shape[1] - 1), environment="table")
        for sym, rep in _LATEX_SYMBOLS.items():
            tex = tex.replace(sym, rep)
        out += [tex.replace(r"\begin{table}[t]", "\\begin{table}[t]\n\\centering"), ""]
    return "\n".join(out)


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _escape(text: str) -> str:
    """LaTeX-escape a caption (pandas escapes the cells and headers)."""
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def write_tables(df: pd.DataFrame, tables: Path, stem: str, title: str, paper: pd.DataFrame) -> list[Path]:
    """``<stem>.csv`` (one row per cell), ``<stem>.md`` and ``<stem>.tex`` (the paper's layout)."""
    rows = table_rows(aggregate(df), paper) if len(df) else []
    csv_path, md_path, tex_path = (tables / f"{stem}.{ext}" for ext in ("csv", "md", "tex"))
    files.atomic_write(csv_path, lambda tmp: df.to_csv(tmp, index=False, float_format="%.4f"))
    files.write_text(md_path, markdown(rows, title))
    files.write_text(tex_path, latex(rows, title))
    return [csv_path, md_path, tex_path]
