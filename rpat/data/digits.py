"""digits: scikit-learn's bundled 8x8 handwritten digits (1,797 images), the offline demo data."""

from __future__ import annotations

import torch

from rpat.data.registry import Loaded, register
from rpat.data.subsets import seeded_permutation

DIGITS_TEST_SIZE = 400
DIGITS_SPLIT_SEED = 0  # the test split is part of the dataset's definition, not of a run


@register("digits", "scikit-learn's bundled 8x8 grey digits, 10 classes; 400 held-out test images", 10, 8,
          on_disk=False, display="Digits")
def load_digits(options: dict) -> Loaded:
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    perm = seeded_permutation(len(y), DIGITS_SPLIT_SEED)
    test_idx, train_idx = perm[:DIGITS_TEST_SIZE], perm[DIGITS_TEST_SIZE:]
    return Loaded(
        train=(x[train_idx], y[train_idx]),
        test=(x[test_idx], y[test_idx]),
        num_classes=10,
        mean=[0.5],
        std=[0.5],
        classes=[str(i) for i in range(10)],
    )
