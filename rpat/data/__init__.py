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

from rpat.data.subsets import (SUBSETS, draw_subset, eval_subset, first_n, seeded_permutation,  # noqa: F401
                               stratified_subset)
from rpat.data.registry import (  # noqa: F401 - the package's API
    DATASETS, DatasetSpec, Loaded, Splits, dataset_info, dataset_root, digest, load_splits, prepare, register,
)

# Importing the modules registers their datasets (in this order, the order `rpat info` lists them) and
# re-exports the names other modules use as ``rpat.data.<name>``.
from rpat.data.digits import DIGITS_SPLIT_SEED, DIGITS_TEST_SIZE, load_digits
from rpat.data.cifar import (
    CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, load_cifar10, load_cifar100,
)
from rpat.data.svhn import SVHN_MEAN, SVHN_STD, load_svhn
from rpat.data.tinyimagenet import (
    TINYIMAGENET_MD5, TINYIMAGENET_MEAN, TINYIMAGENET_STD, TINYIMAGENET_URL, load_tinyimagenet, prepare_tinyimagenet,
)
from rpat.data.imagefolder import load_imagefolder
from rpat.data.folders import CACHE_DIRNAME, IMG_EXTENSIONS, decode_imagefolder
from rpat.data.augment import (AUGMENTATIONS, Augment, CutMix, autoaugment_cutout, cutout,
                               random_crop_flip)
from rpat.data.batches import Batches, to_float
from rpat.data.extra import MixedBatches, load_extra, training_batches

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
