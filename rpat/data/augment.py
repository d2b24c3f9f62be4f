"""Batch augmentations: functions of (x float [0,1] on the device, generator) -> x, registered by name.

Random draws are made on the CPU from the given generator, so a run's augmentations are the same on every device.
"""

from __future__ import annotations

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
