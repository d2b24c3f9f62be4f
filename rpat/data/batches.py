"""The in-memory batch loader: slices of tensors held on the device, shuffled and augmented per epoch."""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from rpat.data.augment import Augment

# (x, y, generator) -> (x, targets): a step that mixes images and labels (CutMix), after ``augment``.
Mix = Callable[[torch.Tensor, torch.Tensor, torch.Generator | None], tuple[torch.Tensor, torch.Tensor]]


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 or float [0, 1] -> [0, 1] in torch's default dtype (float32; float64 with
    ``train.precision: float64``)."""
    dtype = torch.get_default_dtype()
    return x.to(dtype).div_(255.0) if x.dtype == torch.uint8 else x.to(dtype)


class Batches:
    """Iterate ``(x, y)`` batches from in-memory tensors, moved to ``device`` once.

    ``views=2`` yields ``(cat(aug(x), aug(x)), cat(y, y))``: two independent augmentations of the
    same images, as Consistency-AT trains on (docs/faithfulness.md "Consistency-AT"). ``mix`` (CutMix)
    turns each augmented batch ``(x, y)`` into ``(mixed x, probability targets)``; its draws come from
    ``generator`` too, so a resumed epoch sees the same batches.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        augment: Augment | None = None,
        views: int = 1,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
        mix: Mix | None = None,
    ):
        if mix is not None and views != 1:
            raise ValueError("label mixing (CutMix) takes one view per image")
        self.x = x.to(device)
        self.y = y.to(device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.views = views
        self.generator = generator
        self.mix = mix

    def __len__(self) -> int:
        return -(-len(self.y) // self.batch_size)

    @property
    def examples(self) -> int:
        """Examples in one epoch (before views)."""
        return len(self.y)

    def take(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        """The images (float) and labels at ``idx``."""
        return to_float(self.x[idx]), self.y[idx]

    def new_order(self) -> torch.Tensor | None:
        """This epoch's example order (None: sequential); drawn from ``generator``."""
        return torch.randperm(len(self.y), generator=self.generator) if self.shuffle else None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iterate(self.new_order())

    def iterate(self, order: torch.Tensor | None, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches ``start, start+1, ...`` of an epoch with example ``order`` (resume mid-epoch)."""
        n = len(order) if order is not None else len(self.y)
        order = order.to(self.x.device) if order is not None else None
        for b in range(start, len(self)):
            sl = slice(b * self.batch_size, min(n, (b + 1) * self.batch_size))
            idx = order[sl] if order is not None else sl
            xb, yb = self.take(idx)
            if self.views == 1:
                xb = self.augment(xb, self.generator) if self.augment else xb
                yield self.mix(xb, yb, self.generator) if self.mix else (xb, yb)
            else:
                views = [self.augment(xb, self.generator) if self.augment else xb for _ in range(self.views)]
                yield torch.cat(views), yb.repeat(self.views)
