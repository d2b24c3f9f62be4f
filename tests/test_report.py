"""Report: one CSV row per cell, the paper's layout with mean ± std over seeds, the paper's numbers beside."""

import json

import pandas as pd
import pytest

from rpat import config, report


def write_eval(root, cell: config.Cell, clean, aa, checkpoint="best", name="eval.json"):
    d = root / "runs" / cell.id
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_text(json.dumps({
        "cell": cell.id, **cell.tags(), "rpat": cell.rpat, "seed": cell.seed, "clean": clean, "pgd20": aa + 5,
        "cw": aa + 2, "aa": aa, "mean": (clean + aa) / 2, "nrr": 2 * clean * aa / (clean + aa), "n_examples": 10000,
        "eps": 8 / 255, "checkpoint": checkpoint, "selection": {"split": "val"}}))


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
    assert "digits" not in md and "(last)" not in md and "clean_last" not in df.columns
    tex = (tmp_path / "tables" / "summary.tex").read_text()
    assert r"\begin{tabular}" in tex and r"$\pm$" in tex and r"$\Delta$" in tex


def test_best_and_last_checkpoints_side_by_side(tmp_path):
    """eval.checkpoints [best, last]: the last checkpoint's paper metrics (eval-last.json) beside the best's, mean ±
    std over seeds, Mean and NRR of the seed-averaged Clean and AA, a Δ for them too; a cell without eval-last.json
    shows none."""
    cfg = config.from_dict({
        "experiment": "rep", "results_dir": str(tmp_path), "eval": {"checkpoints": ["best", "last"]},
        "grid": [{"dataset": ["cifar10"], "model": ["preact_resnet18"], "norm": ["linf"], "method": ["pgd_at"],
                  "rpat": [False, True], "seed": [0, 1]},
                 {"dataset": ["digits"], "model": ["cnn"], "norm": ["linf"], "method": ["ce"], "rpat": [False],
                  "seed": [0]}]})
    best = {(False, 0): (82.0, 48.0), (False, 1): (84.0, 50.0), (True, 0): (83.0, 50.0), (True, 1): (85.0, 52.0)}
    last = {(False, 0): (85.0, 40.0), (False, 1): (87.0, 42.0), (True, 0): (84.0, 46.0), (True, 1): (86.0, 48.0)}
    for cell in cfg.cells():
        write_eval(tmp_path, cell, *best.get((cell.rpat, cell.seed), (90.0, 10.0)))
        if cell.dataset == "cifar10":
            write_eval(tmp_path, cell, *last[(cell.rpat, cell.seed)], checkpoint="last", name="eval-last.json")
    report.write_report(cfg)
    df = pd.read_csv(tmp_path / "tables" / "summary.csv")
    row = df[(df.method == "pgd_at") & df.rpat & (df.seed == 1)].iloc[0]
    assert (row.clean, row.aa, row.clean_last, row.aa_last, row.mean_last) == (85.0, 52.0, 86.0, 48.0, 67.0)
    assert df[df.dataset == "digits"].clean_last.isna().all()
    md = (tmp_path / "tables" / "summary.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| Method"))
    assert [h.strip() for h in header.strip("|").split("|")][:11] == [
        "Method", "Seeds", "Clean", "AA", "Mean", "NRR", "PGD-20", "CW∞", "Clean (last)", "AA (last)", "Mean (last)"]
    rows = md_rows(md.split("## digits")[0])
    # PGD-AT last: clean 86 ± 1.41, AA 41 ± 1.41, Mean (86 + 41)/2 = 63.5, NRR 2·86·41/127 = 55.53 of the means;
    # their ± is the spread of the per-seed values: Mean 62.5, 64.5; NRR 2·85·40/125 = 54.4, 2·87·42/129 = 56.65
    assert rows["PGD-AT"][7:11] == ["86.00 ± 1.41", "41.00 ± 1.41", "63.50 ± 1.41", "55.53 ± 1.59"]
    assert rows["PGD-AT+RPAT"][7:9] == ["85.00 ± 1.41", "47.00 ± 1.41"]
    assert rows["Δ"][7:9] == ["-1.00", "+6.00"]
    assert "(last)" in md and "paper reports both" in md
    assert md_rows(md.split("## digits")[1])["Standard"][7:9] == ["–", "–"]


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
