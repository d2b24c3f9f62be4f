"""The report's paired statistics on fixed synthetic result files: Δ, interval and McNemar p against rpat.stats
computed directly and against hand values; seeds; cells evaluated on other examples; Mean/NRR over seeds."""

import numpy as np
import pandas as pd
import pytest
from synthetic import md_table, write_cell

from rpat import config, report, stats
from rpat.report import tables

METRICS = ("clean", "pgd20", "cw", "aa")


def grid(tmp_path, methods=("pgd_at",), seeds=(0,)):
    return config.from_dict({"experiment": "cmp", "results_dir": str(tmp_path),
                             "grid": [{"dataset": ["digits"], "model": ["cnn"], "norm": ["linf"],
                                       "method": list(methods), "rpat": [False, True], "seed": list(seeds)}]})


def random_outcomes(rng, n, p):
    return {k: rng.random(n) < p + 0.1 * i for i, k in enumerate(METRICS)}


def comparison_csv(root) -> pd.DataFrame:
    return pd.read_csv(root / "tables" / "comparison.csv")


def test_rows_match_stats_computed_directly(tmp_path):
    rng = np.random.default_rng(1)
    cfg = grid(tmp_path)
    base, treated = random_outcomes(rng, 60, 0.4), random_outcomes(rng, 60, 0.5)
    nl_base, nl_treated = rng.gamma(2.0, 0.1, 60), rng.gamma(2.0, 0.05, 60)
    for cell in cfg.cells():
        write_cell(tmp_path, cell, treated if cell.rpat else base, nonlinearity=nl_treated if cell.rpat else nl_base)
    report.write_report(cfg)

    got = comparison_csv(tmp_path).set_index("metric")
    assert list(got.index) == [*METRICS, "nonlinearity"]
    headers = {m["key"]: m["header"] for m in tables.metrics(True)}
    delta = md_table(tmp_path / "tables" / "summary.md")["Δ"]
    for metric in got.index:
        a, b = (nl_base, nl_treated) if metric == "nonlinearity" else (base[metric], treated[metric])
        (want,) = stats.paired_comparison({metric: a}, {metric: b}, n_boot=10000, seed=0)
        row = got.loc[metric]
        assert (row.n, row.seeds, row.kind) == (60, 1, want["kind"])
        for k in ("delta", "lo", "hi", "mean_baseline", "mean_treated"):
            assert row[k] == pytest.approx(want[k], rel=1e-5, abs=1e-9)
        assert bool(row.excludes_zero) == want["excludes_zero"]
        if metric == "nonlinearity":
            assert pd.isna(row.p)
        else:
            assert row.p == pytest.approx(stats.mcnemar_exact(a, b)["p"], rel=1e-5)
            assert (row.mcnemar_b, row.mcnemar_c) == (want["mcnemar_b"], want["mcnemar_c"])
        kind = "accuracy" if metric != "nonlinearity" else "value"
        text = (f"{tables.number(want['delta'], kind, True)} [{tables.number(want['lo'], kind, True)}, "
                f"{tables.number(want['hi'], kind, True)}]")
        assert delta[headers[metric]] == text + ("*" if want["excludes_zero"] else "")
    # the nonlinearity halves (gamma scale 0.1 -> 0.05): the interval excludes 0
    assert got.loc["nonlinearity", "hi"] < 0 and delta["Path NL"].endswith("*")


def test_mcnemar_by_hand_and_marks(tmp_path):
    """10 examples. Clean: the baseline alone right on 1, +RPAT alone right on 5 -> b = 1, c = 5, p = P(B <= 1) +
    P(B >= 5) for B ~ Bin(6, 1/2) = 2 (1 + 6) / 64; delta = (5 - 1)/10 = +40 points. PGD-20: +RPAT right on 8 more,
    never worse -> every resample's delta >= 0 and > 0 unless no discordant example is drawn (0.2^10): marked.
    CW and AA: identical outcomes -> delta 0 [0, 0], p = 1, not marked."""
    cfg = grid(tmp_path)
    same = np.array([1, 1, 0, 0, 0, 0, 0, 0, 0, 0], bool)
    base = {"clean": np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], bool), "pgd20": np.zeros(10, bool), "cw": same,
            "aa": same}
    treated = {"clean": np.array([1, 1, 1, 0, 1, 1, 1, 1, 1, 0], bool), "pgd20": np.arange(10) < 8, "cw": same,
               "aa": same}
    for cell in cfg.cells():
        write_cell(tmp_path, cell, treated if cell.rpat else base)
    report.write_report(cfg)

    got = comparison_csv(tmp_path).set_index("metric")
    assert (got.loc["clean", "mcnemar_b"], got.loc["clean", "mcnemar_c"]) == (1, 5)
    assert got.loc["clean", "p"] == pytest.approx(2 * 7 / 64, rel=1e-6)
    assert got.loc["clean", "delta"] == pytest.approx(40.0)
    assert got.loc["pgd20", "p"] == pytest.approx(2 / 2**8, rel=1e-6)
    assert got.loc["aa", "p"] == 1.0 and (got.loc["aa", "lo"], got.loc["aa", "hi"]) == (0.0, 0.0)
    assert "nonlinearity" not in got.index  # no perception files

    rows = md_table(tmp_path / "tables" / "summary.md")
    delta = rows["Δ"]
    assert delta["PGD-20"] == "+80.00 [+50.00, +100.00]*"
    assert delta["AA"] == "+0.00 [+0.00, +0.00]" and delta["Mean"] == "+20.00"  # no interval: (Δ Clean + Δ AA) / 2
    p_row = rows["p (McNemar)"]
    assert p_row["Clean"] == "0.219" and p_row["AA"] == "1" and p_row["Mean"] == ""
    assert "* marks an interval that excludes 0" in (tmp_path / "tables" / "summary.md").read_text()


def test_seeds_are_pooled_crossed_and_mean_nrr_come_from_the_seed_averages(tmp_path):
    """Two seeds on the same examples: the interval resamples seeds and examples (stats on [2, n]); each seed has
    its McNemar p. Clean 80 / 90 and AA 40 / 60 -> Mean 67.5, NRR 2 * 85 * 50 / 135 = 62.96 (the average of the
    per-seed NRRs would be 62.67), ± the std of the per-seed NRRs 53.33 and 72.00: 13.20."""
    cfg = grid(tmp_path, seeds=(0, 1))
    rng = np.random.default_rng(2)
    first = lambda k: np.arange(10) < k  # noqa: E731
    given = {}
    for cell in cfg.cells():
        if not cell.rpat:
            outs = {"clean": first(8 + cell.seed), "pgd20": first(5), "cw": first(5), "aa": first(4 + 2 * cell.seed)}
        else:
            outs = {k: rng.random(10) < 0.6 for k in METRICS}
        given[cell] = outs
        write_cell(tmp_path, cell, outs)
    report.write_report(cfg)

    got = comparison_csv(tmp_path).set_index("metric")
    cells = sorted(given)
    for metric in METRICS:
        a = np.stack([given[c][metric] for c in cells if not c.rpat])
        b = np.stack([given[c][metric] for c in cells if c.rpat])
        (want,) = stats.paired_comparison({metric: a}, {metric: b}, n_boot=10000, seed=0)
        assert (got.loc[metric, "lo"], got.loc[metric, "hi"]) == pytest.approx((want["lo"], want["hi"]), rel=1e-5)
        assert got.loc[metric, "seeds"] == 2 and got.loc[metric, "seed_list"] == "0;1"
        assert got.loc[metric, "p_seeds"] == ";".join(f"{p:.6g}" for p in want["p_seeds"])
    rows = md_table(tmp_path / "tables" / "summary.md")
    pgd_at = rows["PGD-AT"]
    assert pgd_at["Clean"] == "85.00 ± 7.07" and pgd_at["AA"] == "50.00 ± 14.14"
    assert pgd_at["Mean"] == "67.50 ± 10.61" and pgd_at["NRR"] == "62.96 ± 13.20"
    assert "Mean and NRR are computed from the seed-averaged Clean and AA" in (
        tmp_path / "tables" / "summary.md").read_text()
    assert len(rows["p (McNemar)"]["Clean"].split(" / ")) == 2


def test_cells_on_other_examples_are_not_compared(tmp_path, capsys):
    cfg = grid(tmp_path, methods=("pgd_at", "trades"))
    rng = np.random.default_rng(3)
    for cell in cfg.cells():
        index = np.arange(1, 41) if (cell.method == "trades" and cell.rpat) else None  # other examples
        write_cell(tmp_path, cell, random_outcomes(rng, 20, 0.4), index=None if index is None else index[::2],
                   nonlinearity=rng.random(20))
    report.write_report(cfg)

    got = comparison_csv(tmp_path)
    assert set(got.method) == {"pgd_at"} and len(got) == 5
    assert "not evaluated on the same recorded examples" in capsys.readouterr().err
    trades = (tmp_path / "tables" / "summary.md").read_text().split("TRADES+RPAT")[1]
    delta_trades = next(ln for ln in trades.splitlines() if ln.startswith("| Δ"))
    assert "[" not in delta_trades  # the plain difference of the means, no interval


def test_npz_of_other_examples_is_left_out(tmp_path, capsys):
    """A perception.npz whose index does not match the eval.json's digest is not used (its rows are other examples)."""
    cfg = grid(tmp_path)
    rng = np.random.default_rng(4)
    for cell in cfg.cells():
        d = write_cell(tmp_path, cell, random_outcomes(rng, 20, 0.5), nonlinearity=rng.random(20))
        if cell.rpat:
            with np.load(d / "perception.npz") as z:
                arrays = {k: z[k] for k in z.files}
            np.savez(d / "perception.npz", **(arrays | {"index": arrays["index"][::-1].copy()}))
    report.write_report(cfg)
    assert "nonlinearity" not in set(comparison_csv(tmp_path).metric)
    err = capsys.readouterr().err
    assert "perception.npz: its index does not match examples.digest" in err and "PGD-20 outcomes differ" not in err


def test_perception_on_other_adversarial_examples_than_evaluation_is_reported(tmp_path, capsys):
    cfg = grid(tmp_path)
    rng = np.random.default_rng(5)
    for cell in cfg.cells():
        d = write_cell(tmp_path, cell, random_outcomes(rng, 20, 0.5), nonlinearity=rng.random(20))
    with np.load(d / "perception.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["defended_pgd20"][:3] = ~arrays["defended_pgd20"][:3]
    np.savez(d / "perception.npz", **arrays)
    report.write_report(cfg)
    assert "PGD-20 outcomes differ from evaluation's on 3 of 20 examples" in capsys.readouterr().err
