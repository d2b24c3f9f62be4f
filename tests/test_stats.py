"""Paired statistics (exact McNemar, seed x example bootstrap) against hand values, scipy and statsmodels."""

import itertools
from collections import Counter

import numpy as np
import pytest
from scipy import stats as sps
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar

from rpat import stats
from rpat.errors import UserError


def outcomes(both, b_only_a, c_only_b, neither):
    """Outcome vectors with the given counts of (a right, b right) = (1,1), (1,0), (0,1), (0,0)."""
    pairs = [(1, 1)] * both + [(1, 0)] * b_only_a + [(0, 1)] * c_only_b + [(0, 0)] * neither
    a, b = zip(*pairs)
    return np.array(a, dtype=bool), np.array(b, dtype=bool)


@pytest.mark.parametrize("b, c, p", [
    (1, 5, 2 * (1 + 6) / 2**6),      # P(B <= 1) + P(B >= 5), B ~ Bin(6, 1/2): (1 + 6)/64 each side
    (0, 6, 2 / 2**6),                # only the all-c and all-b outcomes
    (3, 3, 1.0),                     # balanced: 2 P(B <= 3) > 1, capped
    (2, 8, 2 * (1 + 10 + 45) / 2**10),
    (0, 0, 1.0),                     # no discordant example
])
def test_mcnemar_exact_by_hand(b, c, p):
    a_ok, b_ok = outcomes(4, b, c, 2)
    r = stats.mcnemar_exact(a_ok, b_ok)
    assert (r["b"], r["c"]) == (b, c)
    assert r["p"] == pytest.approx(p, rel=1e-12)
    assert stats.mcnemar_exact(b_ok, a_ok)["p"] == pytest.approx(p, rel=1e-12)  # symmetric in the two models


def test_mcnemar_exact_matches_statsmodels():
    rng = np.random.default_rng(0)
    for n, pa, pb in [(50, 0.5, 0.6), (200, 0.8, 0.7), (1000, 0.45, 0.5), (30, 0.9, 0.9)]:
        a = rng.random(n) < pa
        b = np.where(rng.random(n) < 0.7, a, rng.random(n) < pb)  # correlated, as two models on one test set
        table = [[np.sum(a & b), np.sum(a & ~b)], [np.sum(~a & b), np.sum(~a & ~b)]]
        expected = sm_mcnemar(table, exact=True).pvalue if table[0][1] + table[1][0] else 1.0
        assert stats.mcnemar_exact(a.astype(int), b.astype(int))["p"] == pytest.approx(expected, rel=1e-12)


def test_mcnemar_rejects_non_outcomes_and_unpaired():
    with pytest.raises(UserError, match="0/1 outcomes"):
        stats.mcnemar_exact([0.5, 1.0], [1.0, 0.0])
    with pytest.raises(UserError, match="same examples"):
        stats.mcnemar_exact([True, False], [True])
    with pytest.raises(UserError, match="each seed apart"):
        stats.mcnemar_exact(np.ones((2, 3), bool), np.ones((2, 3), bool))


def assert_matches_distribution(deltas, exact: dict):
    """Empirical frequencies of the resampled deltas within 4.5 binomial standard errors of the exact ones."""
    got = Counter(np.round(deltas, 9).tolist())
    assert set(got) <= set(np.round(list(exact), 9).tolist())
    for value, p in exact.items():
        freq = got[round(value, 9)] / len(deltas)
        assert abs(freq - p) <= 4.5 * np.sqrt(p * (1 - p) / len(deltas)) + 1e-12, (value, freq, p)


@pytest.fixture(params=["counts", "gather"])
def path(request, monkeypatch):
    """Both ways of drawing resampled means: multinomial pattern counts, and gathered example indices."""
    if request.param == "gather":
        monkeypatch.setattr(stats, "MULTINOMIAL_MAX_PATTERNS", 0)
    return request.param


def test_bootstrap_two_examples_enumerated(path):
    # n = 2, b - a = (1, 3): the 4 equally likely resamples give means 1, 2, 2, 3
    a, b = np.zeros(2), np.array([1.0, 3.0])
    deltas = stats.bootstrap_distribution(a, b, n_boot=20000, seed=3)
    assert_matches_distribution(deltas, {1.0: 0.25, 2.0: 0.5, 3.0: 0.25})
    r = stats.paired_bootstrap(a, b, n_boot=20000, seed=3)
    assert (r["delta"], r["lo"], r["hi"]) == (2.0, 1.0, 3.0)  # 2.5 % and 97.5 % quantiles fall on the end masses
    r = stats.paired_bootstrap(a, b, n_boot=20000, seed=3, level=0.2)
    assert (r["lo"], r["hi"]) == (2.0, 2.0)  # 40 % and 60 % fall inside the middle mass [0.25, 0.75]


def test_bootstrap_seeds_and_examples_crossed_enumerated(path):
    # s = 2 seeds x n = 2 examples: draw seeds (i1, i2) and examples (j1, j2) independently, 16 equally likely
    # resamples; each takes the mean of the 2x2 block D[[i1, i2]][:, [j1, j2]].
    d = np.array([[0.0, 1.0], [10.0, 100.0]])
    exact = Counter()
    for rows, cols in itertools.product(itertools.product(range(2), repeat=2), repeat=2):
        exact[round(float(d[np.ix_(rows, cols)].mean()), 9)] += 1 / 16
    deltas = stats.bootstrap_distribution(np.zeros_like(d), d, n_boot=32000, seed=5)
    assert_matches_distribution(deltas, dict(exact))
    assert stats.paired_bootstrap(np.zeros_like(d), d)["delta"] == pytest.approx(111 / 4)


def scipy_percentile_interval(a, b):
    res = sps.bootstrap((a, b), lambda x, y, axis: np.mean(y, axis=axis) - np.mean(x, axis=axis), paired=True,
                        vectorized=True, method="percentile", n_resamples=10000, rng=np.random.default_rng(1))
    return res.confidence_interval, res.standard_error


@pytest.mark.parametrize("kind", ["accuracy", "continuous"])
def test_bootstrap_agrees_with_scipy_percentile(kind, path):
    """Same estimator, independent random streams: the bounds differ by Monte Carlo error only.

    The 2.5 % quantile of B = 10,000 resampled deltas (close to normal with sd se) has standard error
    sqrt(0.025 * 0.975 / B) / phi(1.96) * se = 0.027 se; the difference of two independent estimates 0.038 se.
    A tolerance of 0.15 se is 4 of those. Accuracy deltas live on a grid of step 100/n points, and a quantile
    of either stream can land one grid step away: one step is added for them. The bootstrap standard errors
    agree to 0.05 se (the sd of an sd estimate from B draws is se / sqrt(2 B) = 0.007 se; 0.01 se for two).
    """
    rng = np.random.default_rng(11)
    n = 400
    if kind == "accuracy":
        a = (rng.random(n) < 0.6).astype(float) * 100
        b = np.where(rng.random(n) < 0.6, a, (rng.random(n) < 0.7) * 100.0)
    else:
        a = rng.gamma(2.0, 1.0, n)
        b = a * rng.uniform(0.6, 1.1, n)
    r = stats.paired_bootstrap(a, b, n_boot=10000, seed=0)
    ci, se = scipy_percentile_interval(a, b)
    tol = 0.15 * se + (100 / n if kind == "accuracy" else 0.0)
    assert r["delta"] == pytest.approx(b.mean() - a.mean(), abs=1e-12)
    assert r["lo"] == pytest.approx(ci.low, abs=tol)
    assert r["hi"] == pytest.approx(ci.high, abs=tol)
    assert r["se"] == pytest.approx(se, rel=0.05)
    assert r["lo"] < r["delta"] < r["hi"]


def test_bootstrap_is_deterministic_with_its_seed():
    rng = np.random.default_rng(2)
    a, b = rng.random((3, 50)), rng.random((3, 50))
    r1, r2 = stats.paired_bootstrap(a, b, seed=7, n_boot=2000), stats.paired_bootstrap(a, b, seed=7, n_boot=2000)
    assert r1 == r2
    assert stats.paired_bootstrap(a, b, seed=8, n_boot=2000)["lo"] != r1["lo"]
    assert r1["lo"] < r1["delta"] < r1["hi"]


def test_chunking_does_not_change_the_draws(monkeypatch, path):
    rng = np.random.default_rng(4)
    a, b = rng.random(300), rng.random(300)
    whole = stats.bootstrap_distribution(a, b, n_boot=500, seed=1)
    monkeypatch.setattr(stats, "CHUNK_ELEMENTS", 1)  # one resample per chunk
    assert np.array_equal(stats.bootstrap_distribution(a, b, n_boot=500, seed=1), whole)


@pytest.mark.parametrize("stat", [np.mean, np.median])
def test_identical_runs_give_zero_and_a_zero_interval(stat, path):
    rng = np.random.default_rng(3)
    for values in (rng.random(100) < 0.5, rng.random((3, 100))):
        r = stats.paired_bootstrap(values, values.copy(), n_boot=500, stat=stat)
        assert (r["delta"], r["lo"], r["hi"]) == (0.0, 0.0, 0.0)
        assert not stats.excludes_zero(r["lo"], r["hi"])


def test_median_statistic_by_enumeration():
    # a = 0, b = (1, 2, 9): delta = median(b) = 2; over the 27 resamples, the median of b* is 1 in 7, 2 in 13,
    # 9 in 7 (median 1: at least two draws of 1 -> 3*1*2 + 1 = 7; likewise 9; the rest 27 - 14 = 13)
    deltas = stats.bootstrap_distribution(np.zeros(3), np.array([1.0, 2.0, 9.0]), n_boot=27000, seed=2,
                                          stat=np.median)
    assert_matches_distribution(deltas, {1.0: 7 / 27, 2.0: 13 / 27, 9.0: 7 / 27})


def test_excludes_zero():
    assert stats.excludes_zero(0.1, 2.0) and stats.excludes_zero(-3.0, -0.5)
    assert not stats.excludes_zero(-0.1, 2.0) and not stats.excludes_zero(0.0, 1.0)
    assert not stats.excludes_zero(float("nan"), float("nan"))


def test_bad_bootstrap_inputs_are_named():
    with pytest.raises(UserError, match="same examples and seeds"):
        stats.paired_bootstrap(np.zeros(5), np.zeros(6))
    with pytest.raises(UserError, match="level"):
        stats.paired_bootstrap(np.zeros(5), np.zeros(5), level=95)
    with pytest.raises(UserError, match="n_boot"):
        stats.paired_bootstrap(np.zeros(5), np.zeros(5), n_boot=0)
    with pytest.raises(UserError, match=r"shape \[n\] or \[seeds, n\]"):
        stats.paired_bootstrap(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)))


def test_paired_comparison_rows():
    a_ok, b_ok = outcomes(4, 1, 5, 2)  # 12 examples: baseline 5/12 right, +RPAT 9/12
    nl_a, nl_b = np.linspace(1.0, 2.0, 12), np.linspace(1.0, 2.0, 12) - 0.5
    rows = stats.paired_comparison({"pgd20": a_ok, "nonlinearity": nl_a, "only_a": nl_a},
                                   {"pgd20": b_ok, "nonlinearity": nl_b}, n_boot=2000)
    assert [r["metric"] for r in rows] == ["pgd20", "nonlinearity"]
    acc, nl = rows
    assert acc["kind"] == "accuracy" and (acc["seeds"], acc["n"]) == (1, 12)
    assert acc["mean_baseline"] == pytest.approx(500 / 12) and acc["delta"] == pytest.approx(400 / 12)
    assert (acc["mcnemar_b"], acc["mcnemar_c"], acc["p"]) == (1, 5, pytest.approx(0.21875))
    assert acc["p_seeds"] == [acc["p"]]
    assert nl["kind"] == "value" and nl["p"] is None and nl["mcnemar_b"] is None
    assert (nl["delta"], nl["lo"], nl["hi"]) == (pytest.approx(-0.5), pytest.approx(-0.5), pytest.approx(-0.5))
    assert nl["excludes_zero"]

    two = stats.paired_comparison({"aa": np.stack([a_ok, a_ok])}, {"aa": np.stack([b_ok, a_ok])}, n_boot=500)[0]
    assert two["p"] is None and two["p_seeds"] == [pytest.approx(0.21875), 1.0] and two["seeds"] == 2
    assert (two["mcnemar_b"], two["mcnemar_c"]) == (1, 5)
    with pytest.raises(UserError, match="missing"):
        stats.paired_comparison({"aa": a_ok}, {}, metrics=["aa"])


def test_bootstrap_mean_is_the_single_cell_interval():
    """10 right, 10 wrong: a resampled mean is Bin(20, 1/2)/20, whose 2.5% and 97.5% quantiles are 6/20 and 14/20
    (P(B <= 5) = 0.021 < 0.025 < P(B <= 6) = 0.058, and symmetrically): far from the boundaries at 10,000 draws."""
    v = np.array([1] * 10 + [0] * 10)
    r = stats.bootstrap_mean(v)
    assert (r["delta"], r["lo"], r["hi"]) == (0.5, 0.3, 0.7)
    assert stats.bootstrap_mean(v, seed=3) == stats.paired_bootstrap(np.zeros(20), v, seed=3)
    two_seeds = np.stack([v, v[::-1]])
    assert stats.bootstrap_mean(two_seeds)["delta"] == 0.5
    assert stats.bootstrap_mean(np.full(5, 2.5))["lo"] == stats.bootstrap_mean(np.full(5, 2.5))["hi"] == 2.5
