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
from rpat.cells import Cell, CellError, CellFiles
from rpat.catalog import catalog
from rpat.cells import PLAIN

COORDS = ["dataset", "model", "norm", "method", "recipe", "rpat"]
GROUP = ["dataset", "model", "norm"]
PAPER_METRICS = ("clean", "aa", "mean", "nrr")


# The perception metric the tables show (summary.csv has every perception column: rpat.report.perception).
NONLINEARITY = {"key": "nonlinearity", "header": "Path NL", "paper": False, "kind": "value",
                "description": "path nonlinearity: logit MSE to the straight line x -> x' (PGD-20), mean over alpha"}


# The paper reports its headline metrics for the best and the last checkpoint; a cell evaluated on both
# (eval.checkpoints: [best, last]) shows the other checkpoint's beside the primary's, as <key>_<checkpoint>.
OTHER_CHECKPOINTS = {"best": "last", "last": "best"}


def metrics(with_perception: bool = False) -> list[dict]:
    """Measured and derived metrics in table order: the paper's columns first, then the others (accuracies in %),
    then the paper's columns of the other checkpoint (present only where it was evaluated), then the path
    nonlinearity when asked for."""
    cat = catalog()
    every = [m | {"kind": "accuracy"} for m in cat["measurements"] + cat["derived"]]
    ordered = [m for m in every if m["paper"]] + [m for m in every if not m["paper"]]
    other = [m | {"key": f"{m['key']}_{c}", "header": f"{m['header']} ({c})", "paper": False, "checkpoint": c}
             for c in ("last", "best") for m in ordered if m["key"] in PAPER_METRICS]
    return ordered + other + ([NONLINEARITY] if with_perception else [])


def metric_keys(with_perception: bool = False) -> list[str]:
    return [m["key"] for m in metrics(with_perception)]


def has_perception(df: pd.DataFrame) -> bool:
    return NONLINEARITY["key"] in df and bool(df[NONLINEARITY["key"]].notna().any())


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


def _other_checkpoint(path: Path, r: dict, cell: Cell | None) -> dict:
    """The paper's metrics of the cell's other checkpoint, from its evaluation beside the primary one (if any)."""
    other = OTHER_CHECKPOINTS.get(r["checkpoint"])
    beside = CellFiles.beside(path).evaluation(other, primary=r["checkpoint"]) if other else None
    if beside is None or not beside.is_file():
        return {}
    o = _checked(beside, cell)
    return {f"{k}_{other}": o.get(k) for k in PAPER_METRICS}


def collect(eval_files: Iterable[Path | tuple[Cell, Path]]) -> pd.DataFrame:
    """One row per eval.json: coordinates, every metric, and what was evaluated; the paper's metrics of the other
    checkpoint (``clean_last``, ...) where an eval-<c>.json lies beside it. Each item is a path, read as the results
    of the cell whose directory holds it, or a (cell, path) pair; a malformed file or one holding another cell's
    results is refused (:class:`rpat.files.ResultFileError`)."""
    cat = catalog()
    csv_order = [m["key"] for m in cat["measurements"] + cat["derived"]]
    rows = []
    for item in eval_files:
        cell, f = item if isinstance(item, tuple) else (None, item)
        r = _checked(Path(f), cell)
        rows.append({"dataset": r["dataset"], "model": r["model"], "norm": r["norm"], "method": r["method"],
                     "recipe": r.get("recipe", PLAIN), "rpat": bool(r["rpat"]), "seed": int(r["seed"]),
                     **{m: r.get(m) for m in csv_order}, **_other_checkpoint(Path(f), r, cell),
                     "n_examples": r["n_examples"], "eps": r["eps"], "checkpoint": r["checkpoint"],
                     "selected_on": (r.get("selection") or {}).get("split"), "cell": r["cell"]})
    others = [m["key"] for m in metrics() if "checkpoint" in m and any(m["key"] in row for row in rows)]
    cols = COORDS + ["seed"] + csv_order + others + ["n_examples", "eps", "checkpoint", "selected_on", "cell"]
    return pd.DataFrame(rows, columns=cols).sort_values(COORDS + ["seed"]).reset_index(drop=True)


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and std (ddof=1; NaN for one seed) over seeds per grid coordinate.

    Derived metrics (Mean, NRR) are those of the seed-averaged measurements (NRR of the mean Clean and mean AA),
    not the average of the per-seed values; their std is the spread of the per-seed values.
    """
    keys = [k for k in metric_keys(has_perception(df)) if k in df]
    g = df.groupby(COORDS, sort=True)
    out = g[keys].mean().add_suffix("_mean").join(g[keys].std(ddof=1).add_suffix("_std"))
    out["n_seeds"] = g.size()
    return _seed_averaged_derived(out).reset_index()


def _seed_averaged_derived(agg: pd.DataFrame) -> pd.DataFrame:
    if not (agg.n_seeds > 1).any():  # one seed: the seed's own values are those of the averages
        return agg
    from rpat.evaluation.measurements import DERIVED  # imports torch (seconds): only when several seeds need it

    for d in DERIVED.values():
        for suffix in ("", "_last", "_best"):  # the primary checkpoint's, and the other's beside it
            cols = [f"{k}{suffix}_mean" for k in d.inputs]
            if all(c in agg for c in cols):
                agg[f"{d.key}{suffix}_mean"] = [math.nan if any(pd.isna(v) for v in values) else d.fn(*values)
                                                for values in agg[cols].itertuples(index=False)]
    return agg


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


def number(value, kind: str = "accuracy", sign: bool = False) -> str:
    """Accuracies (%) with 2 decimals, other values (the nonlinearity) with 3 significant digits; "–" for none."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    spec = ("+" if sign else "") + (".2f" if kind == "accuracy" else ".3g")
    return format(value, spec)


def _fmt(mean: float, std: float | None, n: int, kind: str = "accuracy") -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    if n > 1 and std is not None and not math.isnan(std):
        return f"{number(mean, kind)} ± {number(std, kind)}"
    return number(mean, kind)


def delta_text(c, kind: str) -> str:
    """"+1.25 [-0.62, +3.12]" from a comparison row; "*" appended when the interval excludes 0."""
    text = f"{number(c.delta, kind, True)} [{number(c.lo, kind, True)}, {number(c.hi, kind, True)}]"
    return text + ("*" if c.excludes_zero else "")


def _comparisons_of(comparisons: pd.DataFrame | None, key: tuple) -> dict:
    if comparisons is None or not len(comparisons):
        return {}
    cols = GROUP + ["method", "recipe"]
    hit = comparisons[(comparisons[cols] == pd.Series(dict(zip(cols, key)))).all(axis=1)]
    return {r.metric: r for r in hit.itertuples()}


def _difference_rows(base: dict, by: dict, ms: list[dict], comps: dict) -> list[dict]:
    """The Δ row (with intervals where the comparison has them) and, for accuracies tested, the McNemar p row."""
    blank = {f"paper_{m}": "" for m in PAPER_METRICS}
    paired_seeds = max((int(c.seeds) for c in comps.values()), default="")  # the seeds the intervals pool
    delta = {**base, "method": "Δ", "seeds": paired_seeds, **blank}
    for m in ms:
        k = m["key"]
        if k in comps:
            delta[k] = delta_text(comps[k], m["kind"])
        else:
            d = getattr(by[True], f"{k}_mean") - getattr(by[False], f"{k}_mean")
            delta[k] = number(d, m["kind"], sign=True)
    tested = {k: c for k, c in comps.items() if c.kind == "accuracy"}
    if not tested:
        return [delta]
    p_row = {**base, "method": P_LABEL, "seeds": "", **blank}
    p_row.update({m["key"]: _p_text(tested[m["key"]]) if m["key"] in tested else "" for m in ms})
    return [delta, p_row]


def _p_text(c) -> str:
    """The p-value of one seed; for several, each seed's p ("0.031 / 0.12"): pooling them would count every
    test example once per seed, as if independent."""
    if isinstance(c.p_seeds, str) and c.p_seeds:
        return " / ".join(f"{float(p):.3g}" for p in c.p_seeds.split(";"))
    return "–"


P_LABEL = "p (McNemar)"


def table_rows(agg: pd.DataFrame, paper: pd.DataFrame, comparisons: pd.DataFrame | None = None) -> list[dict]:
    """Rows in the paper's layout: per (dataset, model, norm, method, recipe): baseline, +RPAT, Δ (and McNemar's
    p); plain recipes first."""
    ms = [m for m in metrics(True) if f"{m['key']}_mean" in agg]
    rows = []
    groups = sorted(agg.groupby(GROUP + ["method", "recipe"], sort=True), key=lambda g: (*g[0][:4], g[0][4] != PLAIN))
    for (dataset, model, norm, method, recipe), grp in groups:
        by = {bool(r.rpat): r for r in grp.itertuples()}
        base = {"dataset": dataset, "model": model, "norm": norm, "recipe": recipe}
        for on in (False, True):
            if on in by:
                r = by[on]
                row = {**base, "method": method_label(method, on), "seeds": int(r.n_seeds)}
                row.update({m["key"]: _fmt(getattr(r, f"{m['key']}_mean"), getattr(r, f"{m['key']}_std"),
                                           r.n_seeds, m["kind"]) for m in ms})
                for m in PAPER_METRICS:
                    pv = _paper_value(paper, r, m)
                    row[f"paper_{m}"] = f"{pv:.2f}" if pv is not None else ""
                rows.append(row)
        if False in by and True in by:
            rows += _difference_rows(base, by, ms, _comparisons_of(comparisons, (dataset, model, norm, method, recipe)))
    return rows


def _frame(rows: list[dict]) -> pd.DataFrame:
    """A block's rows with display headers; the paper's columns only where it reports numbers."""
    headers = {m["key"]: m["header"] for m in metrics(True)}
    recipes = any(r.get("recipe", PLAIN) != PLAIN for r in rows)
    cols = ["method"] + (["recipe"] if recipes else []) + ["seeds"] + [k for k in metric_keys(True) if any(k in r for r in rows)]
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
           "mean ± std over seeds where there are several; over several seeds, Mean and NRR are computed from the "
           "seed-averaged Clean and AA, and their ± is the std of the per-seed values; "
           "`paper` columns: numbers reported in the paper.")
CAPTION_PERCEPTION = ("Path NL: the path nonlinearity, the logit MSE between z(x + a(x' - x)) and the straight line "
                      "(1 - a) z(x) + a z(x'), x' = PGD-20's example, averaged over a in [0, 1] and the examples "
                      "(lower: straighter; docs/perception.md).")
CAPTION_INTERVALS = ("Δ = +RPAT - baseline [95% paired bootstrap interval over the test examples, and over seeds when "
                     "there are several]; * marks an interval that excludes 0: a difference the test set (and seeds) "
                     "do not explain by chance. p (McNemar): exact McNemar p-value on the examples the two models "
                     "classify differently, one per seed (docs/statistics.md).")


CAPTION_CHECKPOINTS = ("Columns marked (last) or (best): the same metrics for the other checkpoint evaluated "
                       "(eval.checkpoints), the final epoch's or the one selected on validation, as the paper "
                       "reports both; the unmarked columns and Δ intervals are the first of eval.checkpoints'.")


def caption(rows: list[dict]) -> str:
    """The table's caption: what the numbers are, with the lines on checkpoints, nonlinearity and intervals that
    apply."""
    lines = [CAPTION]
    others = [m["key"] for m in metrics() if "checkpoint" in m]
    if any(k in r for r in rows for k in others):
        lines.append(CAPTION_CHECKPOINTS)
    if any(NONLINEARITY["key"] in r for r in rows):
        lines.append(CAPTION_PERCEPTION)
    if any("[" in str(v) for r in rows if r["method"] == "Δ" for v in r.values()):
        lines.append(CAPTION_INTERVALS)
    return " ".join(lines)


def markdown(rows: list[dict], title: str) -> str:
    out = [f"# {title}", "", caption(rows), ""]
    for key, grp in _blocks(rows).items():
        table = _frame(grp).to_markdown(index=False, tablefmt="pipe", disable_numparse=True)
        out += [f"## {' / '.join(key)}", "", table, ""]
    return "\n".join(out)


_LATEX_SYMBOLS = {"±": r"$\pm$", "Δ": r"$\Delta$", "∞": r"$\infty$", "–": "--", "·": r"$\cdot$"}


def latex(rows: list[dict], title: str) -> str:
    """booktabs tables; every cell and header escaped for LaTeX (``%``, ``&``, ``_``, ...) by pandas."""
    out = [f"% {title}"]
    for key, grp in _blocks(rows).items():
        frame = _frame(grp)
        styler = frame.style.hide(axis="index").format(escape="latex").format_index(escape="latex", axis=1)
        tex = styler.to_latex(hrules=True, caption=_escape(f"{' / '.join(key)}. {caption(grp)}"), position="t",
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


def write_tables(df: pd.DataFrame, tables: Path, stem: str, title: str, paper: pd.DataFrame,
                 comparisons: pd.DataFrame | None = None) -> list[Path]:
    """``<stem>.csv`` (one row per cell), ``<stem>.md`` and ``<stem>.tex`` (the paper's layout, with the paired
    comparisons' intervals in the Δ rows)."""
    rows = table_rows(aggregate(df), paper, comparisons) if len(df) else []
    csv_path, md_path, tex_path = (tables / f"{stem}.{ext}" for ext in ("csv", "md", "tex"))
    files.atomic_write(csv_path, lambda tmp: df.to_csv(tmp, index=False, float_format="%.4f"))
    files.write_text(md_path, markdown(rows, title))
    files.write_text(tex_path, latex(rows, title))
    return [csv_path, md_path, tex_path]
