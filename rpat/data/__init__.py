"""Dataset registry, seeded splits and in-memory batch loaders.

Every dataset loads into memory as ``(x, y)`` tensors: ``x`` is NCHW, either ``uint8`` (0..255) or
``float32`` in [0, 1]; ``y`` is ``int64``. CIFAR-sized sets fit easily (150 MB as uint8), so batches
are sliced from tensors, augmented on the device, and no per-image Python runs in the hot loop
(except in ``autoaugment_cutout``, which runs torchvision's AutoAugment image by image on the CPU).

A dataset is one :func:`register` entry: a loader ``load(options) -> Loaded`` plus its metadata, in a
module of this package named after it. The validation split is carved out of the training set here,
for every dataset the same way.

Registered datasets: ``digits`` (offline demo), ``cifar10``, ``cifar100``, ``svhn``, ``tinyimagenet`` and
``imagefolder`` (any ``train/<class>/`` + ``test/<class>/`` tree). Image folders are decoded once with
PIL and cached as a ``.pt`` file under ``<dataset root>/.rpat-cache/`` (see
:func:`rpat.data.folders.decode_imagefolder`).

Modules: ``digits``, ``cifar``, ``svhn``, ``tinyimagenet``, ``imagefolder`` (one per data source), ``folders``
(image-folder decoding and its cache), ``subsets`` (seeded permutations and representative subsets,
also of the test set for evaluation: :func:`eval_subset`), ``augment`` (batch augmentations),
``batches`` (the loader), ``extra`` (extra training data mixed into every batch: ``data.extra``).

Keys of the run's ``data`` config section read here:

- ``root`` (default ``"data"``): directory holding one sub-directory per dataset (``<root>/<name>``).
- ``paths`` (default ``{}``): per-dataset overrides, ``paths.<name>`` = that dataset's directory.
- ``download`` (default ``false``): allow fetching CIFAR-10/100 (torchvision) or Tiny-ImageNet from the
  internet when they are absent. Never on by default: offline machines get a clear error instead.
- ``cache`` (default ``true``): cache decoded image folders under ``<dataset root>/.rpat-cache/``.
- ``decode_workers`` (default ``min(8, cpu count)``): processes used to decode image folders (1 = no pool).
- ``val_size`` (default 1000), ``split_seed`` (default 0), ``train_subset`` (default none), ``subset``
  (default ``stratified``): see :func:`load_splits`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from rpat.data.subsets import SUBSETS, draw_subset, eval_subset, first_n, seeded_permutation, stratified_subset
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
        if name in DATASETS:
            raise ValueError(f"dataset {name!r} is registered twice")
        DATASETS[name] = DatasetSpec(name, fn, description, num_classes, image_size, on_disk, display or name)
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


# Importing the modules registers their datasets (in this order, the order `rpat info` lists them) and
# re-exports the names other modules use as ``rpat.data.<name>``.
from rpat.data.digits import DIGITS_SPLIT_SEED, DIGITS_TEST_SIZE, load_digits  # noqa: E402
from rpat.data.cifar import (  # noqa: E402
    CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, load_cifar10, load_cifar100,
)
from rpat.data.svhn import SVHN_MEAN, SVHN_STD, load_svhn  # noqa: E402
from rpat.data.tinyimagenet import (  # noqa: E402
    TINYIMAGENET_MD5, TINYIMAGENET_MEAN, TINYIMAGENET_STD, TINYIMAGENET_URL, load_tinyimagenet, prepare_tinyimagenet,
)
from rpat.data.imagefolder import load_imagefolder  # noqa: E402
from rpat.data.folders import CACHE_DIRNAME, IMG_EXTENSIONS, decode_imagefolder  # noqa: E402
from rpat.data.augment import (AUGMENTATIONS, Augment, CutMix, autoaugment_cutout, cutout,  # noqa: E402
                               random_crop_flip)
from rpat.data.batches import Batches, to_float  # noqa: E402
from rpat.data.extra import MixedBatches, load_extra, training_batches  # noqa: E402

__all__ = [
    "AUGMENTATIONS", "Augment", "Batches", "CACHE_DIRNAME", "CIFAR100_MEAN", "CIFAR100_STD", "CIFAR10_MEAN",
    "CIFAR10_STD", "CutMix", "DATASETS", "DIGITS_SPLIT_SEED", "DIGITS_TEST_SIZE", "DatasetSpec", "IMG_EXTENSIONS",
    "Loaded", "MixedBatches", "SUBSETS", "SVHN_MEAN", "SVHN_STD", "Splits", "TINYIMAGENET_MD5", "TINYIMAGENET_MEAN",
    "TINYIMAGENET_STD", "TINYIMAGENET_URL", "autoaugment_cutout", "cutout", "dataset_info", "dataset_root",
    "decode_imagefolder", "digest", "draw_subset", "eval_subset", "first_n", "load_cifar10", "load_cifar100",
    "load_digits", "load_extra", "load_imagefolder", "load_splits", "load_svhn", "load_tinyimagenet", "prepare",
    "prepare_tinyimagenet", "random_crop_flip", "register", "seeded_permutation", "stratified_subset", "to_float",
    "training_batches",
]
