"""Batch augmentations: functions of (x float [0,1] on the device, generator) -> x, registered by name; and
CutMix, which mixes labels too: (x, y, generator) -> (x, soft targets).

Random draws are made on the CPU from the given generator, so a run's augmentations are the same on every device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

Augment = Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def random_crop_flip(x: torch.Tensor, generator: torch.Generator | None = None, padding: int | None = None) -> torch.Tensor:
    """RandomCrop(size, padding=4, zero fill) + RandomHorizontalFlip(0.5), per image, batched.

    Padding 4 for every size, as the reference does for CIFAR and Tiny-ImageNet alike (docs/faithfulness.md "Data and augmentation");
    inputs smaller than 16 pixels get size/8 so a crop cannot lose most of the image.
    """
    n, _, h, w = x.shape
    pad = padding if padding is not None else (4 if h >= 16 else max(1, h // 8))
    dev = x.device
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    # Drawn on the CPU generator (same augmentations on every device), copied without a host sync.
    ox = _to_device(torch.randint(0, 2 * pad + 1, (n,), generator=generator, device="cpu"), dev)
    oy = _to_device(torch.randint(0, 2 * pad + 1, (n,), generator=generator, device="cpu"), dev)
    flip = _to_device(torch.rand(n, generator=generator, device="cpu") < 0.5, dev)
    rows = (oy[:, None] + torch.arange(h, device=dev)[None, :])  # n,h
    cols = (ox[:, None] + torch.arange(w, device=dev)[None, :])  # n,w
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    idx_n = torch.arange(n, device=dev)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]]  # n,h,w,c
    return out.permute(0, 3, 1, 2).contiguous()


def cutout(x: torch.Tensor, generator: torch.Generator | None = None, length: int | None = None) -> torch.Tensor:
    """Cutout (DeVries & Taylor): zero a ``length`` square (default size/2) centred at a uniformly random
    pixel of each image, clipped at the borders (so it can be as small as a quarter of the square)."""
    n, _, h, w = x.shape
    half = (length if length is not None else h // 2) // 2
    dev = x.device
    cy = torch.randint(0, h, (n,), generator=generator, device="cpu").to(dev)
    cx = torch.randint(0, w, (n,), generator=generator, device="cpu").to(dev)
    rows, cols = torch.arange(h, device=dev), torch.arange(w, device=dev)
    in_rows = (rows >= (cy - half).clamp(0, h)[:, None]) & (rows < (cy + half).clamp(0, h)[:, None])  # n,h
    in_cols = (cols >= (cx - half).clamp(0, w)[:, None]) & (cols < (cx + half).clamp(0, w)[:, None])  # n,w
    return x.masked_fill((in_rows[:, :, None] & in_cols[:, None, :])[:, None], 0.0)


_AUTOAUGMENT = None


def _cifar10_autoaugment():
    global _AUTOAUGMENT
    if _AUTOAUGMENT is None:
        from torchvision.transforms import v2

        # fill 128 for shear/translate/rotate, as the reference's DeepVoltaire implementation
        _AUTOAUGMENT = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10, fill=128)
    return _AUTOAUGMENT


def autoaugment_cutout(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The reference's ``autoaug`` train transform: crop+flip, AutoAugment (CIFAR-10 policy), Cutout.

    1. :func:`random_crop_flip` (padding 4 as the reference, for 32x32 and 64x64 images).
    2. torchvision's ``transforms.v2.AutoAugment`` with the CIFAR-10 policy (also used for Tiny-ImageNet, as
       in the reference), applied per image on uint8 copies so each image draws its own sub-policy,
       probabilities and signs; shear/translate/rotate fill with 128. This is close to, but not
       bit-identical with, the reference's DeepVoltaire implementation (docs/faithfulness.md "Data and augmentation"): the same 25
       sub-policies and magnitude grids, but torchvision's rotate takes a random sign (the reference's
       does not), it interpolates with nearest neighbour (the reference's shear is bicubic) and translates
       by whole pixels, so pixel values and the exact distribution differ slightly.
       It runs on the CPU (image by image, ~0.3 ms per 32x32 image) whatever ``x.device`` is, so
       results are the same on every device. torchvision draws from torch's global CPU generator; when
       ``generator`` is given, that generator seeds it inside ``torch.random.fork_rng``, so the output
       is a deterministic function of ``generator`` and the global RNG state is left untouched.
    3. :func:`cutout` with side size/2 (16 for CIFAR, 32 for Tiny-ImageNet).
    """
    x = random_crop_flip(x, generator)
    dev = x.device
    images = x.mul(255.0).round_().clamp_(0, 255).to("cpu", torch.uint8)
    aa = _cifar10_autoaugment()
    if generator is not None:
        seed = int(torch.randint(0, 2**62, (), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            images = torch.stack([aa(img) for img in images])
    else:
        images = torch.stack([aa(img) for img in images])
    x = images.to(dev).float().div_(255.0)
    return cutout(x, generator)


AUGMENTATIONS: dict[str, Augment | None] = {
    "none": None,
    "crop_flip": random_crop_flip,
    "autoaugment_cutout": autoaugment_cutout,
}


# ---------------------------------------------------------------------------------------------
# CutMix: mixes images and labels, so it is not one of AUGMENTATIONS (x -> x) but the batches' ``mix`` step.


def cutmix_box(h: int, w: int, lam: float, cy: int, cx: int) -> tuple[int, int, int, int]:
    """The pasted box (rows r0:r1, cols c0:c1) for ratio ``lam`` centred at pixel (cy, cx), as the ReBAT code
    draws it: per axis, half = int(size sqrt(1 - lam)) // 2 and the box is [c - half, c + half) clipped to
    the image; so the pasted area is at most (1 - lam) h w, less where the box is clipped."""
    hr, hc = int(h * math.sqrt(1.0 - lam)) // 2, int(w * math.sqrt(1.0 - lam)) // 2
    return max(cy - hr, 0), min(cy + hr, h), max(cx - hc, 0), min(cx + hc, w)


def _beta_draw(alpha: float, beta: float, generator: torch.Generator | None) -> float:
    """One Beta(alpha, beta) draw, a deterministic function of ``generator`` (which seeds torch's sampler
    inside ``fork_rng``, leaving the global RNG untouched)."""
    dist = torch.distributions.Beta(torch.tensor(alpha, dtype=torch.float64), torch.tensor(beta, dtype=torch.float64))
    if generator is None:
        return float(dist.sample())
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return float(dist.sample())


@dataclass(frozen=True)
class CutMix:
    """CutMix (Yun et al.) as the ReBAT code applies it to every training batch:

    lam ~ Beta(alpha, beta); a random permutation pi of the batch; image i gets the box
    :func:`cutmix_box` (centre uniform over the pixels) cut from image pi(i); lam' = 1 - box area / (h w),
    the share of its own pixels; target_i = lam' onehot(y_i) + (1 - lam') onehot(y_pi(i)).

    With these probability targets, CE(z, target) = lam' CE(z, y) + (1 - lam') CE(z, y_pi): the published
    mixed criterion. Draws (lam, pi, centre) come from ``generator`` on the CPU.
    """

    num_classes: int
    alpha: float = 1.0
    beta: float = 1.0

    def __call__(self, x: torch.Tensor, y: torch.Tensor,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        n, _, h, w = x.shape
        lam = _beta_draw(self.alpha, self.beta, generator)
        perm = torch.randperm(n, generator=generator, device="cpu")
        cy = int(torch.randint(0, h, (), generator=generator))
        cx = int(torch.randint(0, w, (), generator=generator))
        r0, r1, c0, c1 = cutmix_box(h, w, lam, cy, cx)
        perm = _to_device(perm, x.device)
        out = x.clone()
        out[:, :, r0:r1, c0:c1] = x[perm, :, r0:r1, c0:c1]
        own = 1.0 - (r1 - r0) * (c1 - c0) / (h * w)
        onehot = torch.nn.functional.one_hot(y, self.num_classes).to(x.dtype)
        return out, own * onehot + (1.0 - own) * onehot[perm]
