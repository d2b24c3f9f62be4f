"""SVHN (Netzer et al. 2011): torchvision's files ``train_32x32.mat`` and ``test_32x32.mat`` under the data set's
directory, read offline with scipy; torchvision downloads them (checksummed) when ``data.download`` is on.

Each file holds ``X`` uint8 [32, 32, 3, N] (rows, columns, channels, images) and ``y`` [N, 1] with labels
1..10, where 10 is the digit 0 (torchvision's reading; the ``extra`` split is not used).
"""

from __future__ import annotations

import numpy as np
import torch

from rpat.data.registry import Loaded, dataset_root, register
from rpat.errors import DataProblem

SPLIT_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
# Population statistics of the training images.
SVHN_MEAN = (0.4377, 0.4438, 0.4728)
SVHN_STD = (0.1980, 0.2010, 0.1970)


def read_svhn_mat(path) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x uint8 [N, 3, 32, 32], y int64 [N])`` from one of torchvision's SVHN files (label 10 -> 0)."""
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    try:
        mat = loadmat(str(path))
        x, y = mat["X"], mat["y"]
    except (OSError, ValueError, KeyError, TypeError, MatReadError) as e:
        raise DataProblem(f"svhn: {path} cannot be read as torchvision's SVHN file ({e!r}). Delete it and set "
                          "data.download: true on a machine with internet, or copy the original file there.") from e
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or y.size != x.shape[3]:
        raise DataProblem(f"svhn: {path} holds X {list(x.shape)} and y {list(y.shape)}; expected X [32, 32, 3, N] "
                          "and y [N, 1]. Replace it with torchvision's file.")
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1)).astype(np.uint8, copy=False))
    return images, torch.from_numpy(y.reshape(-1).astype(np.int64) % 10)


@register("svhn", "SVHN house-number digits, 32x32 RGB, 10 classes, 73,257 train / 26,032 test (torchvision's "
          ".mat files)", 10, 32, display="SVHN")
def load_svhn(options: dict) -> Loaded:
    root = dataset_root(options, "svhn")
    missing = [split for split, name in SPLIT_FILES.items() if not (root / name).is_file()]
    if missing and options.get("download", False):
        import torchvision.datasets

        for split in missing:
            torchvision.datasets.SVHN(str(root), split=split, download=True)
    elif missing:
        raise DataProblem(
            f"svhn: {', '.join(str(root / SPLIT_FILES[s]) for s in missing)} not found. To fix: set data.download: "
            f"true on a machine with internet (torchvision downloads them into {root}); or copy torchvision's "
            f"{' and '.join(SPLIT_FILES.values())} there; or point data.paths.svhn at the directory holding them.")
    train, test = (read_svhn_mat(root / SPLIT_FILES[s]) for s in ("train", "test"))
    return Loaded(train=train, test=test, num_classes=10, mean=list(SVHN_MEAN), std=list(SVHN_STD),
                  classes=[str(i) for i in range(10)])
