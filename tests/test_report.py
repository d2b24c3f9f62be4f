"""Report: one CSV row per cell, the paper's layout with mean ± std over seeds, the paper's numbers beside."""

import json

import pandas as pd
import pytest

from rpat import config, report


def write_eval(root, cell: config.Cell, clean, aa):
    d = root / "runs" / cell.id
    d.mkdir(parents=True)
    (d / "eval.json").write_text(json.dumps({
        "cell": cell.id, **cell.tags(), "rpat": cell.rpat, "seed": cell.seed, "clean": clean, "pgd20": aa + 5,
        "cw": aa + 2, "aa": aa, "mean": (clean + aa) / 2, "nrr": 2 * clean * aa / (clean + aa), "n_examples": 10000,
        "eps": 8 / 255, "checkpoint": "best", "selection": {"split": "val"}}))


def md_rows(md: str) -> dict[str, list[str]]:
    """Markdown table rows by their first cell: {method: [the other cells, stripped]}."""
    rows = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and not set(line) <= set("|-: "):
            rows[cells[0]] = cells[1:]
    return rows


def test_paper_layout_with_seeds_and_reported_numbers(tmp_path):
    cfg = config.from_dict({
        "experiment": "rep", "results_dir": str(tmp_path),
        "grid": [{"name": "prn18", "dataset": ["cifar10"], "model": ["preact_resnet18"], "norm": ["linf"],
                  "method": ["rebat"], "rpat": [False, True], "seed": [0, 1]},
                 {"name": "demo", "dataset": ["digits"], "model": ["cnn"], "norm": ["linf"], "method": ["pgd_at"],
                  "rpat": [False], "seed": [0]}]})
    values = {(False, 0): (82.0, 50.0), (False, 1): (84.0, 52.0), (True, 0): (83.0, 51.0), (True, 1): (85.0, 53.0)}
    for cell in cfg.cells():
        clean, aa = values.get((cell.rpat, cell.seed), (90.0, 40.0)) if cell.dataset == "cifar10" else (90.0, 40.0)
        write_eval(tmp_path, cell, clean, aa)
    paths = report.write_report(cfg)
    assert {p.name for p in paths} >= {"summary.csv", "summary.md", "summary.tex", "prn18.md", "demo.csv",
                                       "tradeoff.png", "tradeoff.pdf"}

    df = pd.read_csv(tmp_path / "tables" / "summary.csv")
    assert len(df) == 5 and set(df.columns) >= {"dataset", "model", "norm", "method", "rpat", "seed", "clean",
                                                "pgd20", "cw", "aa", "mean", "nrr"}
    md = (tmp_path / "tables" / "prn18.md").read_text()
    rows = md_rows(md)
    # ReBAT: clean 83 ± 1.41 (sample std of 82, 84), AA 51 ± 1.41; the paper's ReBAT row: 82.09 / 50.72
    assert rows["ReBAT"][:3] == ["2", "83.00 ± 1.41", "51.00 ± 1.41"]
    assert rows["RPAT++"][:3] == ["2", "84.00 ± 1.41", "52.00 ± 1.41"]
    assert "82.09" in rows["ReBAT"] and "50.72" in rows["ReBAT"] and "82.63" in rows["RPAT++"]  # reported numbers
    assert rows["Δ"][:3] == ["", "+1.00", "+1.00"]
    assert "digits" not in md
    tex = (tmp_path / "tables" / "summary.tex").read_text()
    assert r"\begin{tabular}" in tex and r"$\pm$" in tex and r"$\Delta$" in tex


def test_missing_results_name_the_files(tmp_path):
    cfg = config.from_dict({"experiment": "rep", "results_dir": str(tmp_path),
                            "grid": [{"dataset": ["digits"], "model": ["cnn"], "norm": ["linf"],
                                      "method": ["pgd_at"], "rpat": [True], "seed": [0]}]})
    with pytest.raises(FileNotFoundError, match="pgd_at\\+rpat/seed0/eval.json"):
        report.write_report(cfg)


def test_paper_numbers_are_consistent():
    """Mean and NRR of every reported row follow from its Clean and AA (the data file is checked, not trusted)."""
    p = report.paper_numbers()
    assert len(p) == 41
    assert ((p.clean + p.aa) / 2 - p["mean"]).abs().max() < 6e-3
    assert (2 * p.clean * p.aa / (p.clean + p.aa) - p.nrr).abs().max() < 6e-3


def test_latex_escapes_special_characters_in_names(tmp_path):
    """Names with LaTeX specials (%, &, _, #) come out escaped: the table compiles."""
    from rpat.report import tables

    rows = [{"dataset": "set_50%", "model": "m&n", "norm": "linf", "method": "a#b_c", "seeds": 1,
             **{m: "1.00" for m in tables.metric_keys()}}]
    tex = tables.latex(rows, "t")
    assert r"a\#b\_c" in tex and r"set\_50\%" in tex and r"m\&n" in tex
    assert "50%" not in tex.replace(r"\%", "")
