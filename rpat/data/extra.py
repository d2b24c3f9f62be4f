"""Extra training data (``data.extra``): e.g. the diffusion-generated CIFAR-10 sets of Wang et al. 2023 ("Better
Diffusion Models Further Improve Adversarial Training"), mixed into every training batch.

The file is an ``.npz`` with ``image`` uint8 [N, H, W, C] (C may be left out for one channel) and ``label``
integer [N], the format of the published generated sets. Batches are built as in that line of work (its
``SemiSupervisedSampler``): each batch of B examples holds B - floor(f·B) images of the data set, in the
order of seeded permutations (a fresh one whenever one is used up), and floor(f·B) extra images drawn
uniformly with replacement, f = ``data.extra_fraction``; an epoch is ceil(n/B) batches, n the data set's
training images, so schedules in epochs keep their number of steps. Every draw comes from the run's
shuffle generator, so the order is seeded and a run resumes inside an epoch exactly. (The published sampler
also shuffles within the batch; the loss does not depend on the order within a batch, so rpat does not.)
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np
import torch

from rpat.data.augment import AUGMENTATIONS, CutMix
from rpat.data.batches import Batches, to_float
from rpat.errors import DataProblem


def load_extra(path: str | Path, image_size: int, channels: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images uint8 [N, H, W, C], labels int64 [N])`` from an extra-data ``.npz``, checked against the data set."""
    path = Path(path).expanduser()
    fix = "To fix: point data.extra at an .npz with 'image' uint8 [N, H, W, C] and 'label' [N], or set it to null."
    if not path.is_file():
        raise DataProblem(f"data.extra: {path} does not exist. {fix}")
    try:
        with np.load(path) as f:
            missing = [k for k in ("image", "label") if k not in f.files]
            if missing:
                raise DataProblem(f"data.extra: {path} has no {' or '.join(map(repr, missing))} array (it has "
                                  f"{', '.join(map(repr, f.files)) or 'none'}). {fix}")
            images, labels = f["image"], f["label"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataProblem(f"data.extra: {path} cannot be read as an .npz ({e}). {fix}") from e
    if images.ndim == 3:
        images = images[..., None]
    want = (image_size, image_size, channels)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != want:
        raise DataProblem(f"data.extra: {path}: 'image' is {images.dtype} {list(images.shape)}, but this data set "
                          f"needs uint8 [N, {', '.join(map(str, want))}]. {fix}")
    if not np.issubdtype(labels.dtype, np.integer) or labels.shape != (len(images),):
        raise DataProblem(f"data.extra: {path}: 'label' is {labels.dtype} {list(labels.shape)}, expected integers "
                          f"[{len(images)}]. {fix}")
    if len(labels) == 0 or labels.min() < 0 or labels.max() >= num_classes:
        raise DataProblem(f"data.extra: {path}: labels must lie in 0..{num_classes - 1} and there must be at least "
                          f"one image (found {len(labels)} in {labels.min(initial=0)}..{labels.max(initial=0)}). {fix}")
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


class MixedBatches(Batches):
    """Training batches mixing the data set's images with extra ones (see the module docstring); an epoch's order
    is one index tensor [batches x B] into the data set followed by the extra images (offset by n)."""

    def __init__(self, x, y, extra_x, extra_y, batch_size: int, fraction: float, **kwargs):
        super().__init__(x, y, batch_size, shuffle=True, **kwargs)
        self.extra_x = extra_x.to(self.x.device)  # NHWC: each batch's extra images are permuted on the fly
        self.extra_y = extra_y.to(self.x.device)
        self.n_extra = int(batch_size * fraction)
        self.n_own = batch_size - self.n_extra
        self.n_batches = math.ceil(len(y) / batch_size)

    def __len__(self) -> int:
        return self.n_batches

    @property
    def examples(self) -> int:
        return self.n_batches * self.batch_size

    def new_order(self) -> torch.Tensor:
        n, g = len(self.y), self.generator
        need = self.n_batches * self.n_own
        own = torch.cat([torch.randperm(n, generator=g) for _ in range(math.ceil(need / n))])[:need]
        extra = torch.randint(len(self.extra_y), (self.n_batches, self.n_extra), generator=g) + n
        return torch.cat([own.view(self.n_batches, self.n_own), extra], dim=1).flatten()

    def take(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        own, extra = idx[: self.n_own], idx[self.n_own:] - len(self.y)
        x = torch.cat([to_float(self.x[own]), to_float(self.extra_x[extra]).permute(0, 3, 1, 2)])
        return x, torch.cat([self.y[own], self.extra_y[extra]])


def training_batches(splits, d, *, views: int, device, generator: torch.Generator) -> Batches:
    """The training loader for the data settings ``d``: the data set's images, with ``d.extra`` mixed in if set,
    and CutMix (``d.cutmix``) after the augmentation if on."""
    mix = CutMix(splits.num_classes, d.cutmix.alpha, d.cutmix.beta) if d.cutmix.enabled else None
    kwargs = {"augment": AUGMENTATIONS[d.augment], "views": views, "device": device, "generator": generator, "mix": mix}
    if d.extra is None:
        return Batches(*splits.train, d.batch_size, shuffle=True, **kwargs)
    ex, ey = load_extra(d.extra, splits.image_size, splits.channels, splits.num_classes)
    return MixedBatches(*splits.train, ex, ey, d.batch_size, d.extra_fraction, **kwargs)
