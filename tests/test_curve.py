"""Robustness curves (eval.eps_grid, rpat/jobs/curve.py): the grid's validation, its fingerprint, the points measured
on a tiny trained cell (real PGD and AutoAttack, L1 included), resume after a signal, and the report's figure."""

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from evalcell import EVAL_CELL, NO_AA, cell_copy, outcomes_of, train_cell

from rpat import config, report
from rpat.jobs import curve, evaluate
from rpat.errors import ConfigError
from rpat.evaluation import eps_grid, measurements
from rpat.evaluation.measurements import Measurement
from rpat.preemption import Preempted
from rpat.report import curves

CELL_EPS = 0.3  # the evaluation cell's threat (Linf)
# PGD-20 from almost 0 to beyond the cell's radius; AutoAttack at two radii; AutoAttack's L1 attacks at one
GRID = [{"norm": "linf", "eps": [1e-4, 0.1, 0.2, CELL_EPS, 0.4], "attacks": ["pgd20"]},
        {"norm": "linf", "eps": [CELL_EPS, 0.4], "attacks": ["aa"]},
        {"norm": "l1", "eps": [8], "attacks": ["aa"]}]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    return train_cell(tmp_path_factory.mktemp("trained"))


def _with_grid(grid) -> dict:
    return config.deep_merge(EVAL_CELL, {"eval": {"eps_grid": grid}})


@pytest.mark.parametrize("grid, message", [
    ([{"norm": "l1", "eps": [12], "attacks": ["pgd20", "aa"]}],
     "eval.eps_grid[0]: 'pgd20' does not measure under l1 (only linf, l2); l1 is measured by: aa (AutoAttack's L1"),
    ([{"norm": "linf", "eps": [0, "8/255"], "attacks": ["aa"]}], "eval.eps_grid[0].eps[0]: 0 must be greater than 0"),
    ([{"norm": "linf", "eps": [0.1], "attacks": ["clean"]}],
     "eval.eps_grid[0].attacks[0]: 'clean' is not allowed; allowed values: pgd20, cw, aa"),
    ([{"norm": "l0", "eps": [1], "attacks": ["aa"]}], "eval.eps_grid[0].norm: 'l0' is not allowed"),
    ([{"norm": "linf", "eps": [0.1], "attacks": ["aa"]}, {"norm": "linf", "eps": ["1/10"], "attacks": ["aa"]}],
     "eval.eps_grid[1]: the point (linf, ε=0.1, aa) is listed twice"),
    ([{"norm": "linf", "eps": [0.1]}], "eval.eps_grid[0]"),
])
def test_a_bad_eps_grid_is_refused_naming_the_entry(grid, message):
    with pytest.raises(ConfigError) as err:
        config.from_dict(_with_grid(grid))
    assert message in str(err.value)


def test_the_grid_has_its_own_fingerprint_and_leaves_the_evaluations_alone():
    plain = config.from_dict(EVAL_CELL)
    cell = plain.cells()[0]
    with_grid = config.from_dict(_with_grid(GRID))
    other = config.from_dict(_with_grid(GRID[:1]))
    a, b, c = (cfg.settings(cell) for cfg in (plain, with_grid, other))
    assert a.eval_fingerprint == b.eval_fingerprint == c.eval_fingerprint  # eval.json is not redone
    assert len({a.curve_fingerprint, b.curve_fingerprint, c.curve_fingerprint}) == 3
    pts = eps_grid.points(b.eval)
    assert [(p.norm, p.eps, p.attack) for p in pts][:2] == [("linf", 1e-4, "pgd20"), ("linf", 0.1, "pgd20")]
    assert len(pts) == 8 and pts[-1] == eps_grid.Point("l1", 8.0, "aa")
    # PGD's step follows eps: the cell's 0.075 at 0.3; L1 (AutoAttack only) borrows nothing
    assert eps_grid.point_threat(b, "linf", 0.15).step == pytest.approx(0.0375)
    assert eps_grid.point_threat(b, "l1", 8.0).eps == 8.0
    with pytest.raises(evaluate.EvaluationError, match="has no eval.eps_grid: there is no curve to measure"):
        curve.evaluate_curve(a, Path("nowhere/train.json"), Path("nowhere/curve.json"))  # before reading anything
    # the report draws the curves only when a cell has a grid
    names = lambda cfg: {p.name for p in report.outputs(cfg)}  # noqa: E731
    assert "curves.png" in names(with_grid) and "curves.pdf" in names(with_grid)
    assert not {"curves.png", "curves.pdf"} & names(plain)


def test_curve_points_on_a_trained_cell(trained, tmp_path):
    cfg, run_dir = cell_copy(trained, tmp_path / "results", **NO_AA, eps_grid=GRID)
    cell = cfg.cells()[0]
    ev = evaluate.evaluate_cell(cfg, cell, run_dir)
    res = curve.curve_cell(cfg, cell, run_dir)
    n = res["n_examples"]
    acc = {(p["norm"], p["eps"], p["attack"]): p["accuracy"] for p in res["points"]}
    z = np.load(run_dir / "curve.npz")
    main = outcomes_of(run_dir)
    assert res["clean"] == ev["clean"] and z["clean"].tolist() == main["clean"]
    assert z["index"].tolist() == main["index"] and z["correct"].shape == (8, n)
    # ε -> 0 is clean accuracy, example by example; at the cell's radius PGD-20 repeats eval.json's exactly
    assert z["correct"][0].tolist() == main["clean"]
    assert z["correct"][3].tolist() == main["pgd20"] and acc[("linf", CELL_EPS, "pgd20")] == ev["pgd20"]
    pgd = [acc[("linf", e, "pgd20")] for e in GRID[0]["eps"]]
    one = 100.0 / n  # PGD from a random start may gain an example at a larger radius, no more
    assert all(b <= a + one for a, b in zip(pgd, pgd[1:])) and pgd[-1] < pgd[0]
    aa = [acc[("linf", e, "aa")] for e in GRID[1]["eps"]]
    assert aa[1] <= aa[0] <= acc[("linf", CELL_EPS, "pgd20")]  # AutoAttack is the stronger attack
    l1 = next(p for p in res["points"] if p["norm"] == "l1")
    assert l1["aa_attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]  # AutoAttack's standard L1 ensemble
    assert l1["accuracy"] <= res["clean"] and set(l1["aa_per_attack"]) == set(l1["aa_attacks"])
    assert not (run_dir / "eval-state").exists()
    written = curves.figure(curves.load([run_dir / "eval.json"]), tmp_path / "curves.png", "t")
    assert [p.name for p in written] == ["curves.png", "curves.pdf"] and all(p.stat().st_size > 0 for p in written)
    df = curves.frame(curves.load([run_dir / "eval.json"]))
    assert len(df) == 8 + 3  # the points and an ε = 0 (clean) row per curve norm and attack


def test_a_signalled_curve_resumes_to_the_same_outcomes(trained, tmp_path, monkeypatch):
    grid = GRID[:1]
    cfg, run_dir = cell_copy(trained, tmp_path / "straight", **NO_AA, eps_grid=grid)
    curve.curve_cell(cfg, cfg.cells()[0], run_dir)
    expected = np.load(run_dir / "curve.npz")["correct"].tolist()

    calls = []

    def pgd20_then_sigterm(ctx):
        calls.append((ctx.threat.eps, ctx.block))
        if len(calls) == 6:  # the second point's second block
            os.kill(os.getpid(), signal.SIGTERM)
        return measurements.pgd20(ctx)

    cfg, run_dir = cell_copy(trained, tmp_path / "stopped", **NO_AA, eps_grid=grid)
    monkeypatch.setitem(measurements.MEASUREMENTS, "pgd20", Measurement("pgd20", "PGD-20", "", pgd20_then_sigterm))
    with pytest.raises(Preempted, match=r"signal SIGTERM after pgd20@linf:0.1 on block 1"):
        curve.curve_cell(cfg, cfg.cells()[0], run_dir)
    state = torch.load(run_dir / "eval-state" / "curve-best.pt", weights_only=True)
    assert sorted(state["blocks"]["pgd20@linf:0.1"]) == [0, 1] and not (run_dir / "curve.json").exists()
    res = curve.curve_cell(cfg, cfg.cells()[0], run_dir)
    assert len(calls) == 20 and res["sessions"] == 2  # 5 points x 4 blocks, none measured twice
    assert np.load(run_dir / "curve.npz")["correct"].tolist() == expected
