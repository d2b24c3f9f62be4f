"""The report's figures and perception columns: files written and non-trivial, intervals drawn, no point hidden."""

import json

import numpy as np
import pandas as pd
import pytest
from synthetic import md_table, write_cell

from rpat import config, report
from rpat.report import plots

RAW = {"experiment": "figs", "grid": [
    {"name": "motivation", "dataset": ["digits"], "model": ["cnn"], "norm": ["linf"], "method": ["ce", "noise"],
     "rpat": [False], "seed": [0]},
    {"name": "pairs", "dataset": ["digits"], "model": ["cnn"], "norm": ["linf"], "method": ["pgd_at", "trades"],
     "rpat": [False, True], "seed": [0]}]}


def outcomes(rng, n=40):
    return {k: rng.random(n) < p for k, p in (("clean", 0.9), ("pgd20", 0.5), ("cw", 0.45), ("aa", 0.4))}


def test_report_writes_exactly_its_declared_outputs_with_perception(tmp_path):
    cfg = config.from_dict({**RAW, "results_dir": str(tmp_path)})
    rng = np.random.default_rng(0)
    for i, cell in enumerate(cfg.cells()):
        write_cell(tmp_path, cell, outcomes(rng), nonlinearity=rng.gamma(2.0, 0.05, 40),
                   perception={"noise": (0.1 * (i + 1), 0.08, 0.3, 85.0), "pgd20": (1.0, 0.5, 1.5 + i, 40.0)})
    written = report.write_report(cfg)
    assert sorted(written) == sorted(report.outputs(cfg))
    for name in ("tradeoff", "perception", "path"):
        assert (tmp_path / "plots" / f"{name}.png").stat().st_size > 20_000
        assert (tmp_path / "plots" / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"

    summary = pd.read_csv(tmp_path / "tables" / "summary.csv").set_index("cell")
    for cell in cfg.cells():
        js = json.loads((tmp_path / "runs" / cell.id / "perception.json").read_text())
        row = summary.loc[cell.id]
        assert row.nonlinearity == pytest.approx(js["path"]["nonlinearity"], abs=1e-4)
        for key in ("noise", "pgd20"):
            for g in ("all", "success", "failure"):
                assert row[f"mse_{key}_{g}"] == pytest.approx(js[key]["mse"][g], abs=1e-4)
    assert list(summary.columns).index("mse_pgd20_failure") < list(summary.columns).index("n_examples")
    table = md_table(tmp_path / "tables" / "summary.md")
    assert table["Standard"]["Path NL"] == f"{summary.loc['digits/cnn/linf/ce/seed0', 'nonlinearity']:.3g}"
    assert "Path NL: the path nonlinearity" in (tmp_path / "tables" / "summary.md").read_text()
    tex = (tmp_path / "tables" / "pairs.tex").read_text()
    assert "Path NL" in tex and "seed-averaged" in tex and r"\caption{" in tex
    comparison = pd.read_csv(tmp_path / "tables" / "comparison.csv")
    assert sorted(set(comparison.method)) == ["pgd_at", "trades"] and len(comparison) == 10
    # the HTML page of a table set (what Snakemake's report shows): the paper's layout, every cell, comparisons
    page = (tmp_path / "tables" / "summary.html").read_text()
    assert all(f"<td>{cell.id}</td>" in page for cell in cfg.cells())
    assert page.count("<h2>digits / cnn / linf</h2>") == 1 and "<td>PGD-AT+RPAT</td>" in page
    assert "comparison.csv" in page and "comparison.csv" not in (tmp_path / "tables" / "pairs.html").read_text()


def test_figures_without_perception_results_say_so(tmp_path):
    cfg = config.from_dict({**RAW, "results_dir": str(tmp_path)})
    rng = np.random.default_rng(1)
    for cell in cfg.cells():
        write_cell(tmp_path, cell, outcomes(rng))
    report.write_report(cfg)
    assert (tmp_path / "plots" / "perception.png").stat().st_size > 5_000
    assert "nonlinearity" not in pd.read_csv(tmp_path / "tables" / "comparison.csv").metric.tolist()
    assert "Path NL" not in (tmp_path / "tables" / "summary.md").read_text()


def agg_two_methods(clean=(80.0, 80.0), aa=(40.0, 40.0)):
    rows = [{"dataset": "d", "model": "m", "norm": "linf", "method": meth, "recipe": "plain", "rpat": False, "clean_mean": c,
             "aa_mean": a} for meth, c, a in zip(("pgd_at", "trades"), clean, aa)]
    return pd.DataFrame(rows)


def display_positions(ax) -> list[tuple[float, float]]:
    """Where each marker (a scatter's PathCollection) is drawn, in display pixels."""
    from matplotlib.collections import PathCollection

    return [tuple(np.round(c.get_offset_transform().transform(c.get_offsets())[0], 3)) for c in ax.collections
            if isinstance(c, PathCollection)]


def test_tradeoff_never_hides_a_point_under_another():
    """Two methods at exactly the same Clean/AA are drawn at different places; a lone point sits at its value."""
    fig = plots.tradeoff_figure(agg_two_methods(), "t")
    ax = fig.axes[0]
    fig.canvas.draw()
    same = display_positions(ax)
    assert len(same) == 2 and same[0] != same[1]
    distance = np.hypot(*np.subtract(same[0], same[1])) * 72 / fig.dpi  # points
    assert distance == pytest.approx(2 * plots.SPREAD_POINTS, rel=1e-3)

    fig = plots.tradeoff_figure(agg_two_methods(clean=(70.0, 90.0)), "t")
    ax = fig.axes[0]
    fig.canvas.draw()
    apart = display_positions(ax)
    assert np.allclose(apart[0], ax.transData.transform((70.0, 40.0)), atol=1e-3)
    plots.pyplot().close("all")


def test_tradeoff_draws_the_cells_intervals():
    intervals = pd.DataFrame([{"dataset": "d", "model": "m", "norm": "linf", "method": "pgd_at", "recipe": "plain", "rpat": False,
                               "clean_lo": 75.0, "clean_hi": 86.0, "aa_lo": 33.0, "aa_hi": 45.0}])
    fig = plots.tradeoff_figure(agg_two_methods(clean=(80.0, 60.0)), "t", intervals)
    segments = [s for c in fig.axes[0].collections if hasattr(c, "get_segments") for s in c.get_segments()]
    spans = {tuple(np.round(np.ravel(s), 6)) for s in segments}
    assert (75.0, 40.0, 86.0, 40.0) in spans and (80.0, 33.0, 80.0, 45.0) in spans
    assert (60.0, 40.0, 60.0, 40.0) in spans  # trades: no interval given, a bar of length 0
    plots.pyplot().close("all")


def test_spread_puts_each_overlapping_group_on_a_circle():
    offsets = plots.spread([(1.0, 1.0), (1.0, 1.0), (1.0, 1.0), (5.0, 5.0), (5.001, 5.0)], tol=(0.01, 0.01))
    assert len(set(offsets[:3])) == 3 and all(np.hypot(*o) == pytest.approx(plots.SPREAD_POINTS) for o in offsets)
    assert offsets[3] != offsets[4]
    assert plots.spread([(1.0, 1.0), (2.0, 2.0)], tol=(0.01, 0.01)) == [(0.0, 0.0), (0.0, 0.0)]


def test_training_curves_plot_the_history_of_train_json(tmp_path):
    """Every loss part (weighted copies left out, total first) and both validation accuracies, one point per
    epoch, and the selected epoch marked; a cell without train.json gets a figure saying so."""
    from rpat.report import training

    history = [{"epoch": e, "lr": 0.1, "loss_ce": 2.0 / e, "loss_rpat": 0.1 * e, "loss_rpat_weighted": 0.1 * e,
                "loss_total": 2.0 / e + 0.1 * e, "val_clean": 50.0 + 10 * e, "val_pgd": 20.0 + 5 * e,
                "epoch_s": 1.0} for e in (1, 2, 3)]
    record = {"cell": "digits/cnn/linf/pgd_at+rpat/seed0", "history": history,
              "selection": {"split": "val", "best_epoch": 2}}
    fig = training.curves_figure(record)
    loss_ax, acc_ax = fig.axes
    assert [line.get_label() for line in loss_ax.get_lines()] == ["total", "ce", "rpat"]
    assert list(loss_ax.get_lines()[0].get_ydata()) == pytest.approx([2.1, 1.2, 2 / 3 + 0.3])
    clean, pgd, best = acc_ax.get_lines()
    assert list(clean.get_xdata()) == [1, 2, 3] and list(clean.get_ydata()) == [60.0, 70.0, 80.0]
    assert list(pgd.get_ydata()) == [25.0, 30.0, 35.0] and list(best.get_xdata()) == [2, 2]
    assert fig._suptitle.get_text() == record["cell"]

    run = tmp_path / "runs" / record["cell"]
    run.mkdir(parents=True)
    (run / "eval.json").write_text(json.dumps({"cell": record["cell"]}))
    (written,) = training.write_all([run / "eval.json"], tmp_path)
    assert written == tmp_path / "plots" / "training" / "digits/cnn/linf/pgd_at+rpat/seed0.png"
    assert written.read_bytes()[:4] == b"\x89PNG"
    assert training.curves_figure({"cell": "c", "history": []}).texts[-1].get_text() == \
        "no training history (pretrained weights)"
    (run / "train.json").write_text(json.dumps(record))
    assert training.write_all([run / "eval.json"], tmp_path) == [written]
    assert written.stat().st_size > 20_000
