"""CIFAR-10 / CIFAR-100: torchvision's pickled batches or an image folder (e.g. the JPEG archive)."""

from __future__ import annotations

import torch

from rpat.data.registry import Loaded, dataset_root, register
from rpat.data.folders import decode_imagefolder, folder_options, has_imagefolder
from rpat.errors import DataProblem

# Population statistics of the training images (docs/faithfulness.md "Input normalisation"). The reference's SOTAs
# code uses the CIFAR-10 numbers for CIFAR-100 too; rpat uses each dataset's own (docs/faithfulness.md D7).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def _load_torchvision(root, name: str, tv_class: str, base_folder: str, download: bool):
    """``(x, y), (tx, ty), classes`` from torchvision's files under ``root/base_folder`` (downloaded if asked)."""
    import torchvision.datasets

    cls = getattr(torchvision.datasets, tv_class)
    try:
        sets = [cls(str(root), train=train, download=download) for train in (True, False)]
    except RuntimeError as e:
        raise DataProblem(
            f"{name}: {root / base_folder} is incomplete or corrupted ({e}). Delete it and set data.download: true "
            f"on a machine with internet, or copy a complete {base_folder}/ there."
        ) from e
    (x, y), (tx, ty) = [
        (torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(s.targets, dtype=torch.int64))
        for s in sets
    ]
    return (x, y), (tx, ty), list(sets[0].classes)


def _load_cifar(options: dict, name: str, tv_class: str, base_folder: str, num_classes: int, mean, std) -> Loaded:
    root = dataset_root(options, name)
    if root.name == base_folder:  # data.paths pointed at torchvision's folder itself
        root = root.parent
    download = bool(options.get("download", False))
    tv_dir = root / base_folder
    if tv_dir.is_dir() or (download and not has_imagefolder(root)):
        (x, y), (tx, ty), classes = _load_torchvision(root, name, tv_class, base_folder, download)
    elif has_imagefolder(root):
        kw = folder_options(options, root)
        x, y, classes = decode_imagefolder(root / "train", image_size=32, **kw)
        if len(classes) != num_classes:
            raise DataProblem(f"{name}: {root / 'train'} has {len(classes)} class folders, expected {num_classes}")
        tx, ty, _ = decode_imagefolder(root / "test", classes=classes, image_size=32, **kw)
    else:
        raise DataProblem(
            f"{name}: no data in {root} (looked for torchvision's {tv_dir}/ and for an image folder "
            f"{root}/train/<class>/ + {root}/test/<class>/). To fix: set data.download: true on a machine with "
            f"internet (torchvision downloads it into {root}); or put torchvision's {base_folder}/ or an image-folder "
            f"tree (train/<class>/*.png|jpg, test/<class>/...) in {root}; or point data.paths.{name} at the "
            f"directory that holds one of them."
        )
    return Loaded(train=(x, y), test=(tx, ty), num_classes=num_classes, mean=list(mean), std=list(std), classes=classes)


@register("cifar10", "CIFAR-10, 32x32 RGB, 10 classes, 50,000 train / 10,000 test (torchvision files or image folder)", 10, 32,
          display="CIFAR-10")
def load_cifar10(options: dict) -> Loaded:
    return _load_cifar(options, "cifar10", "CIFAR10", "cifar-10-batches-py", 10, CIFAR10_MEAN, CIFAR10_STD)


@register("cifar100", "CIFAR-100, 32x32 RGB, 100 classes, 50,000 train / 10,000 test (torchvision files or image folder)", 100, 32,
          display="CIFAR-100")
def load_cifar100(options: dict) -> Loaded:
    return _load_cifar(options, "cifar100", "CIFAR100", "cifar-100-python", 100, CIFAR100_MEAN, CIFAR100_STD)
