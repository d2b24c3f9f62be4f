"""The dataset registry and splits (re-exported by :mod:`rpat.data`): :func:`register`, :func:`load_splits`,
:func:`prepare` and what they return; the data sources' modules import it to register themselves.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from rpat import registries
from rpat.data.subsets import draw_subset, seeded_permutation, stratified_subset
from rpat.errors import DataProblem, UnknownName


@dataclass
class Loaded:
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    num_classes: int
    mean: Sequence[float]
    std: Sequence[float]
    classes: list[str] = field(default_factory=list)

    @property
    def channels(self) -> int:
        return int(self.train[0].shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train[0].shape[-1])


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    load: Callable[[dict], Loaded]
    description: str
    num_classes: int | None  # None: read from the data (imagefolder)
    image_size: int | None
    # Files on disk (downloaded, laid out, decoded into a cache) that one job should prepare before
    # many jobs read them; False for data bundled with a package.
    on_disk: bool = True
    display: str = ""  # the paper's name (tables, plots)


DATASETS: dict[str, DatasetSpec] = {}


def register(name: str, description: str, num_classes: int | None, image_size: int | None, on_disk: bool = True,
             display: str = ""):
    """Register ``load(options) -> Loaded``; ``options`` is the run's ``data`` config section."""

    def deco(fn):
        registries.add(DATASETS, name, DatasetSpec(name, fn, description, num_classes, image_size, on_disk,
                                                   display or name), "dataset")
        return fn

    return deco


def dataset_info() -> list[dict]:
    """One dict per registered dataset (name, description, num_classes, image_size), for ``rpat info``.

    ``num_classes`` / ``image_size`` are ``None`` where they are read from the data (``imagefolder``).
    """
    return [
        {"name": s.name, "description": s.description, "num_classes": s.num_classes, "image_size": s.image_size}
        for s in DATASETS.values()
    ]


def dataset_root(options: dict, name: str) -> Path:
    """Where dataset ``name`` lives offline: ``data.paths[name]`` or ``<data.root>/<name>``."""
    paths = options.get("paths") or {}
    if name in paths:
        return Path(paths[name]).expanduser()
    return Path(options.get("root", "data")).expanduser() / name


def _spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise UnknownName(f"unknown dataset {name!r}; registered datasets: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


@dataclass
class Splits:
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    num_classes: int
    mean: Sequence[float]
    std: Sequence[float]
    channels: int
    image_size: int


def digest(x: torch.Tensor, y: torch.Tensor) -> str:
    """sha256 (hex) of a split's images then labels, their bytes as held in memory (read in place, not copied):
    the same digest means the same examples in the same order."""
    h = hashlib.sha256()
    for t in (x, y):
        h.update(t.detach().cpu().contiguous().numpy().reshape(-1).view("uint8"))
    return h.hexdigest()


def prepare(name: str, options: dict) -> dict:
    """Download (if ``data.download``), lay out and decode-cache dataset ``name`` once, so the jobs that
    follow only read it. Returns a summary (sizes, classes)."""
    loaded = _spec(name).load(options)
    return {"dataset": name, "train": len(loaded.train[1]), "test": len(loaded.test[1]),
            "num_classes": loaded.num_classes, "image_size": loaded.image_size}


def _split_indices(y: torch.Tensor, options: dict, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted ``(train, val)`` indices into the training set with labels ``y`` (see :func:`load_splits`)."""
    val_size = int(options.get("val_size", 1000))
    if not 0 <= val_size < len(y):
        raise DataProblem(
            f"data.val_size={val_size}, but the training set of {name!r} holds {len(y)} examples and at least one "
            f"must remain for training. To fix: set data.val_size below {len(y)} (0 for no validation split)."
        )
    seed = int(options.get("split_seed", 0))
    perm = seeded_permutation(len(y), seed)
    val_idx, train_idx = perm[:val_size].sort().values, perm[val_size:].sort().values
    subset = options.get("train_subset")
    if subset:
        what = f"the training set of {name!r} after holding out data.val_size={val_size}"
        pick = draw_subset(y[train_idx], int(subset), options.get("subset", "stratified"), seed,
                           key="data.train_subset", what=what)
        train_idx = train_idx[pick]
    return train_idx, val_idx


def load_splits(name: str, options: dict) -> Splits:
    """Load ``name``, hold out a validation split and optionally keep a subset of the rest for training.

    The validation split is ``data.val_size`` training images at the head of a permutation seeded by
    ``data.split_seed`` (a uniform draw, so already representative). ``data.train_subset: n`` then keeps
    ``n`` of the remaining images, drawn by ``data.subset``: ``stratified`` (default; each class in
    proportion, seeded by ``data.split_seed``, see :func:`rpat.data.subsets.stratified_subset`) or
    ``first`` (the first ``n`` in file order). The test split is the dataset's own, whole.
    """
    data = _spec(name).load(options)
    x, y = data.train
    train_idx, val_idx = _split_indices(y, options, name)
    test_x, test_y = data.test
    return Splits(
        train=(x[train_idx], y[train_idx]),
        val=(x[val_idx], y[val_idx]),
        test=(test_x, test_y),
        num_classes=data.num_classes,
        mean=data.mean,
        std=data.std,
        channels=data.channels,
        image_size=data.image_size,
    )
