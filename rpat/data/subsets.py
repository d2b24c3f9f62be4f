"""Subsets of a split: a seeded, class-stratified draw, or the first ``n`` examples in file order.

Image folders are class-sorted, so "the first ``n``" of one is a single class: every subset of a split
(``data.train_subset``, the evaluation's ``eval.n_examples``) is a stratified draw unless the config
asks for ``first``, which only represents the data where its file order is already random (the
torchvision CIFAR files; RobustBench's convention). Both depend only on the labels, ``n`` and the seed,
so every cell of a grid gets the same examples and paired comparisons stay paired.
"""

from __future__ import annotations

from typing import Callable

import torch

from rpat.errors import DataProblem, UnknownName


def seeded_permutation(n: int, seed: int) -> torch.Tensor:
    """``torch.randperm(n)`` from a fresh CPU generator seeded with ``seed``: the same on every machine."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)


def _check_size(y: torch.Tensor, n: int) -> None:
    if y.dim() != 1:
        raise ValueError(f"labels must be one-dimensional, not of shape {tuple(y.shape)}")
    if not 1 <= n <= len(y):
        raise ValueError(f"cannot take {n} of {len(y)} examples")


def class_quotas(y: torch.Tensor, n: int) -> torch.Tensor:
    """Examples per class in a stratified subset of ``n``: largest-remainder rounding of ``n * share``.

    Class ``c`` with ``m_c`` of the ``N`` labels gets ``floor(n m_c / N)``; the ``n - sum`` left over go
    one each to the classes with the largest remainders ``n m_c mod N`` (ties: the lower class index).
    So the quotas sum to ``n``, each is within 1 of ``n m_c / N``, and none exceeds ``m_c``. Integer
    arithmetic throughout: no float rounding.
    """
    _check_size(y, n)
    counts = torch.bincount(y)
    scaled = n * counts
    quotas = scaled // len(y)
    left = n - int(quotas.sum())
    remainders = (scaled % len(y)).tolist()
    for c in sorted(range(len(counts)), key=lambda c: (-remainders[c], c))[:left]:
        quotas[c] += 1
    return quotas


def stratified_subset(y: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Sorted indices of a seeded, class-stratified draw of ``n`` examples with labels ``y``.

    Class ``c`` contributes :func:`class_quotas` ``(y, n)[c]`` examples: the first of its members in
    the order of one seeded permutation of all ``len(y)`` examples (:func:`seeded_permutation`).
    A deterministic function of ``(y, n, seed)``.
    """
    quotas = class_quotas(y, n)
    perm = seeded_permutation(len(y), seed)
    by_class = perm[torch.argsort(y[perm], stable=True)]  # grouped by class, permutation order within
    counts = torch.bincount(y, minlength=len(quotas))
    starts = torch.cumsum(counts, 0) - counts
    labels = y[by_class]
    rank = torch.arange(len(y)) - starts[labels]  # position of each example within its class
    return by_class[rank < quotas[labels]].sort().values


def first_n(y: torch.Tensor, n: int, seed: int | None = None) -> torch.Tensor:
    """Indices ``0 .. n-1``: the first ``n`` examples in file order (``seed`` is ignored). Representative
    only where that order is already random."""
    _check_size(y, n)
    return torch.arange(n)


SUBSETS: dict[str, Callable[[torch.Tensor, int, int], torch.Tensor]] = {
    "stratified": stratified_subset,
    "first": first_n,
}


def draw_subset(y: torch.Tensor, n: int, how: str, seed: int, *, key: str, what: str) -> torch.Tensor:
    """``SUBSETS[how](y, n, seed)``; a bad ``n`` or ``how`` is a user error naming the config ``key``.

    ``what`` names the set the subset is drawn from, for the message ("the test set of cifar10").
    """
    if how not in SUBSETS:
        raise UnknownName(f"unknown subset rule {how!r} for {key}; choose one of: {', '.join(SUBSETS)}")
    if not 1 <= n <= len(y):
        raise DataProblem(
            f"{key}={n}, but {what} holds {len(y)} examples. To fix: set {key} to at most {len(y)} "
            f"(or null for all of them)."
        )
    return SUBSETS[how](y, n, seed)


def eval_subset(y_test: torch.Tensor, n: int | None, how: str = "stratified", seed: int = 0,
                *, what: str = "the test set") -> torch.Tensor:
    """Sorted indices of the test examples an evaluation uses (config ``eval.n_examples``, ``eval.subset``,
    ``eval.subset_seed``).

    ``n`` None: every example (``arange(len(y_test))``). Otherwise ``how`` is ``"stratified"``
    (:func:`stratified_subset`: each class in proportion, seeded by ``seed``) or ``"first"`` (the first
    ``n`` in file order). The indices depend only on the labels, ``n``, ``how`` and ``seed``, so every
    cell of a grid evaluated on one data set gets the same examples. ``n`` larger than the test set is a
    DataProblem naming ``eval.n_examples``; an unknown ``how`` an UnknownName.
    """
    if n is None:
        return torch.arange(len(y_test))
    return draw_subset(y_test, int(n), how, int(seed), key="eval.n_examples", what=what)
