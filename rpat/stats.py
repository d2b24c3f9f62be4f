"""Statistics that tell an effect from noise when a baseline and its +RPAT cell are evaluated on the same examples.

Both compare paired per-example values: a = baseline, b = +RPAT, one entry per test example (and per seed).

- Exact McNemar test (0/1 outcomes, e.g. "correct under PGD-20"): only the examples on which the two models
  disagree carry information. Of these, b are right only under the baseline and c only under +RPAT; with no
  difference between the models each is equally likely to fall either way, so b ~ Binomial(b + c, 1/2), and the
  two-sided exact p-value is P(B <= min(b, c)) + P(B >= max(b, c)) (capped at 1; 1 when b + c = 0).
- Paired bootstrap (any per-example value: 0/1 outcomes in %, or continuous such as the path nonlinearity):
  delta = stat(b) - stat(a) and its percentile interval over resamples that draw the *same* examples (and seeds)
  for a and b. An interval that excludes 0 marks a difference the test set (and seeds) cannot explain by chance.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
from scipy.stats import binomtest

from rpat.errors import UserError

# Resampled values held at once (float64: 32 MiB per array); bounds memory for any n_boot and test-set size.
CHUNK_ELEMENTS = 1 << 22
# Up to this many distinct per-example columns of b - a (3^s for s seeds of 0/1 outcomes: s <= 5), resampled
# means are drawn as multinomial counts (10,000 resamples of 243 patterns: about 0.4 s).
MULTINOMIAL_MAX_PATTERNS = 256


class MismatchedOutcomes(UserError, ValueError):
    """Paired per-example values that are not paired (shapes differ) or not of the expected kind."""


def _matrix(values, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.size == 0:
        raise MismatchedOutcomes(f"{name}: expected one value per example, shape [n] or [seeds, n], "
                                 f"got shape {np.shape(values)}")
    return arr


def _paired(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = _matrix(a, "baseline values"), _matrix(b, "compared values")
    if a.shape != b.shape:
        raise MismatchedOutcomes(f"paired values of shapes {a.shape} and {b.shape} (seeds, examples); evaluate "
                                 "both cells on the same examples and seeds")
    return a, b


def is_binary(values) -> bool:
    """True for 0/1 outcomes: a bool array, or an integer array whose values are all 0 or 1."""
    arr = np.asarray(values)
    return arr.dtype == bool or (np.issubdtype(arr.dtype, np.integer) and bool(np.isin(arr, (0, 1)).all()))


def mcnemar_exact(a_correct, b_correct) -> dict:
    """Exact two-sided McNemar test of two classifiers on the same examples (1-D 0/1 or bool outcomes).

    Returns {"b": #(a right, b wrong), "c": #(a wrong, b right), "p"}; p = scipy's exact two-sided binomial test
    of b successes in b + c trials with probability 1/2, and 1 when the models never disagree.
    """
    a, b = _paired(a_correct, b_correct)
    if a.shape[0] != 1 or not (is_binary(a) and is_binary(b)):
        raise MismatchedOutcomes("mcnemar_exact: expects one run's 0/1 outcomes per model, shape [n]; for several "
                                 "seeds test each seed apart")
    a, b = a[0].astype(bool), b[0].astype(bool)
    n_b, n_c = int(np.sum(a & ~b)), int(np.sum(~a & b))
    p = 1.0 if n_b + n_c == 0 else float(binomtest(n_b, n_b + n_c, 0.5).pvalue)
    return {"b": n_b, "c": n_c, "p": p}


def _gather(m: np.ndarray, rows: np.ndarray | None, cols: np.ndarray) -> np.ndarray:
    """[k, s*n]: for each resample, the drawn examples under every drawn seed."""
    if rows is None:
        return m[0][cols]
    return m[rows[:, :, None], cols[:, None, :]].reshape(len(cols), -1)


def _indices(rng: np.random.Generator, k: int, s: int, n: int) -> tuple[np.ndarray | None, np.ndarray]:
    """Seed indices [k, s] (None for one seed) and example indices [k, n] of k resamples, with replacement."""
    rows = rng.integers(0, s, size=(k, s)) if s > 1 else None
    return rows, rng.integers(0, n, size=(k, n), dtype=np.int32)


def _draw(a: np.ndarray, b: np.ndarray, stat: Callable, rng: np.random.Generator):
    """(draw, size): draw(k) gives k resampled deltas from ``rng``; size = values it holds per resample."""
    s, n = a.shape
    if stat is not np.mean:
        def draw(k):
            rows, cols = _indices(rng, k, s, n)
            return stat(_gather(b, rows, cols), axis=-1) - stat(_gather(a, rows, cols), axis=-1)
        return draw, 2 * s * n
    diff = b - a
    patterns, counts = np.unique(diff, axis=1, return_counts=True)  # [s, u]: distinct columns, their counts
    if patterns.shape[1] > MULTINOMIAL_MAX_PATTERNS:
        return (lambda k: _gather(diff, *_indices(rng, k, s, n)).mean(axis=-1)), s * n

    def draw(k):
        per_seed = rng.multinomial(n, counts / n, size=k) @ patterns.T  # [k, s]: sums over the drawn examples
        if s == 1:
            return per_seed[:, 0] / n
        seed_counts = rng.multinomial(s, np.full(s, 1.0 / s), size=k)
        return (seed_counts * per_seed).sum(axis=1) / (s * n)
    return draw, patterns.size + s


def bootstrap_distribution(a, b, *, n_boot: int = 10000, seed: int = 0,
                           stat: Callable = np.mean) -> np.ndarray:
    """The n_boot resampled deltas stat(b*) - stat(a*) of ``paired_bootstrap`` (float64 array).

    a, b: [n] or [s, n] (seeds x examples, the same examples under every seed). One resample draws n example
    indices with replacement and, when s > 1, s seed indices with replacement, independently; a* and b* are both
    the [s, n] block of a and b at the drawn seeds (rows) and examples (columns), so every drawn example enters
    under every drawn seed. Seeds and examples are crossed factors (each seed's model meets the same test
    examples), and resampling both carries the seed-to-seed and the example-to-example variation (the
    "pigeonhole" bootstrap for crossed designs; slightly conservative). For s = 1 it is the ordinary paired
    bootstrap over examples. ``stat`` reduces along ``axis=-1`` (np.mean, np.median, ...).

    For np.mean the deltas are means of b - a (equal up to rounding). A resample's mean depends only on how
    many times each seed is drawn and how many draws land on each distinct column of b - a (0/1 outcomes give
    at most 3^s), so when there are at most MULTINOMIAL_MAX_PATTERNS distinct columns these counts are drawn
    directly, Multinomial(n, column frequencies) and Multinomial(s, 1/s): the same distribution, without
    drawing n indices per resample. Otherwise indices are drawn and values gathered, CHUNK_ELEMENTS at a time.
    """
    a, b = (m.astype(np.float64) for m in _paired(a, b))
    if n_boot < 1:
        raise MismatchedOutcomes(f"n_boot must be at least 1, got {n_boot}")
    draw, size = _draw(a, b, stat, np.random.default_rng(seed))
    chunk = max(1, CHUNK_ELEMENTS // size)
    return np.concatenate([draw(min(chunk, n_boot - start)) for start in range(0, n_boot, chunk)])


def paired_bootstrap(a, b, *, n_boot: int = 10000, seed: int = 0, level: float = 0.95,
                     stat: Callable = np.mean) -> dict:
    """Delta = stat(b) - stat(a) over all entries, with its paired percentile bootstrap interval.

    a, b: per-example values, [n] or [s, n] (see ``bootstrap_distribution`` for the resampling scheme). The
    interval is the (1 - level)/2 and (1 + level)/2 quantiles (linear interpolation, as scipy.stats.bootstrap's
    percentile method) of the n_boot resampled deltas drawn with numpy's default_rng(seed): the same inputs and
    seed give the same interval. Returns {"delta", "lo", "hi", "se" (std of the resampled deltas), "level",
    "n_boot", "seed"}.
    """
    if not 0.0 < level < 1.0:
        raise MismatchedOutcomes(f"confidence level must be in (0, 1), got {level}")
    a_m, b_m = (m.astype(np.float64) for m in _paired(a, b))
    if stat is np.mean:
        delta = float(np.mean(b_m - a_m))
    else:
        delta = float(stat(b_m.reshape(-1), axis=-1) - stat(a_m.reshape(-1), axis=-1))
    dist = bootstrap_distribution(a_m, b_m, n_boot=n_boot, seed=seed, stat=stat)
    lo, hi = np.quantile(dist, [(1.0 - level) / 2, (1.0 + level) / 2])
    return {"delta": delta, "lo": float(lo), "hi": float(hi), "se": float(dist.std(ddof=1)) if n_boot > 1 else 0.0,
            "level": level, "n_boot": n_boot, "seed": seed}


def bootstrap_mean(values, *, n_boot: int = 10000, seed: int = 0, level: float = 0.95) -> dict:
    """The mean of one cell's per-example values, [n] or [s, n], with its percentile bootstrap interval.

    The same resampling as ``paired_bootstrap`` (examples, and seeds when s > 1) with the baseline fixed at 0:
    the interval of a single model's accuracy or nonlinearity, e.g. for error bars. Returns its dict.
    """
    values = _matrix(values, "values").astype(np.float64)
    return paired_bootstrap(np.zeros_like(values), values, n_boot=n_boot, seed=seed, level=level)


def excludes_zero(lo: float, hi: float) -> bool:
    """True when the interval [lo, hi] lies strictly on one side of 0 (False for NaN bounds)."""
    return bool(lo > 0 or hi < 0)


def paired_comparison(baseline: Mapping[str, object], treated: Mapping[str, object], *,
                      metrics: Sequence[str] | None = None, n_boot: int = 10000, seed: int = 0,
                      level: float = 0.95) -> list[dict]:
    """One row per metric comparing a baseline cell with its +RPAT cell on the same examples (and seeds).

    baseline, treated: metric name -> per-example values, [n] or [s, n]. 0/1 outcomes (``is_binary``) are
    accuracies: they are scaled to % (delta in percentage points) and get the exact McNemar test per seed.
    Other values (e.g. per-example path nonlinearity) get the bootstrap only; every bootstrap uses ``seed``.
    Row: {"metric", "kind" ("accuracy" | "value"), "seeds", "n", "mean_baseline", "mean_treated", "delta", "lo",
    "hi", "excludes_zero", "mcnemar_b", "mcnemar_c" (discordant counts, summed over seeds), "p", "p_seeds"}.
    The McNemar fields are None for values. "p_seeds" lists each seed's p; "p" is that p for one seed and None
    for several (pooling seeds would count each shared test example several times, as if independent).
    """
    names = list(metrics) if metrics is not None else [k for k in baseline if k in treated]
    missing = [k for k in names if k not in baseline or k not in treated]
    if missing:
        raise MismatchedOutcomes(f"metrics {missing} are missing from one of the two cells; evaluate both alike")
    return [_comparison_row(name, *_paired(baseline[name], treated[name]), n_boot=n_boot, seed=seed, level=level)
            for name in names]


def _comparison_row(name: str, a: np.ndarray, b: np.ndarray, **boot) -> dict:
    binary = is_binary(a) and is_binary(b)
    scale = 100.0 if binary else 1.0
    a_v, b_v = scale * a.astype(np.float64), scale * b.astype(np.float64)
    ci = paired_bootstrap(a_v, b_v, **boot)
    row = {"metric": name, "kind": "accuracy" if binary else "value", "seeds": a.shape[0], "n": a.shape[1],
           "mean_baseline": float(a_v.mean()), "mean_treated": float(b_v.mean()), "delta": ci["delta"],
           "lo": ci["lo"], "hi": ci["hi"], "excludes_zero": excludes_zero(ci["lo"], ci["hi"]),
           "mcnemar_b": None, "mcnemar_c": None, "p": None, "p_seeds": None}
    if binary:
        tests = [mcnemar_exact(a_s, b_s) for a_s, b_s in zip(a, b)]
        row |= {"mcnemar_b": sum(t["b"] for t in tests), "mcnemar_c": sum(t["c"] for t in tests),
                "p_seeds": [t["p"] for t in tests], "p": tests[0]["p"] if len(tests) == 1 else None}
    return row
