"""imagefolder: any train/<class>/ + test/<class>/ tree; classes, size and statistics from the data."""

from __future__ import annotations

from rpat.data.registry import Loaded, dataset_root, register
from rpat.data.folders import channel_stats, class_dirs, decode_imagefolder, folder_options, has_imagefolder
from rpat.errors import DataProblem


@register(
    "imagefolder",
    "any train/<class>/ + test/<class>/ tree of square images (data.paths.imagefolder or <root>/imagefolder); "
    "classes, size and mean/std read from the data",
    None,
    None,
)
def load_imagefolder(options: dict) -> Loaded:
    root = dataset_root(options, "imagefolder")
    if not has_imagefolder(root):
        raise DataProblem(
            f"imagefolder: expected {root}/train/<class>/<images> and {root}/test/<class>/<images>. To fix: create "
            f"that tree there, or point data.paths.imagefolder at a directory that has it."
        )
    classes = class_dirs(root / "train")
    extra = sorted(set(class_dirs(root / "test")) - set(classes))
    if extra:
        raise DataProblem(
            f"imagefolder: {root / 'test'} has class folders missing from train/: {', '.join(extra)}. To fix: add "
            f"their training images under {root / 'train'}/<class>/, or remove them from test/."
        )
    kw = folder_options(options, root)
    x, y, classes = decode_imagefolder(root / "train", classes=classes, **kw)
    tx, ty, _ = decode_imagefolder(root / "test", classes=classes, image_size=int(x.shape[-1]), **kw)
    mean, std = channel_stats(x)
    return Loaded(train=(x, y), test=(tx, ty), num_classes=len(classes), mean=mean, std=std, classes=classes)
