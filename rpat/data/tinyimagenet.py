"""Tiny-ImageNet-200: train/<wnid>/images/*.JPEG; the official val split (50 per class) is the test set."""

from __future__ import annotations

import os
import shutil
import warnings
import zipfile
from pathlib import Path

from rpat.data.registry import Loaded, dataset_root, register
from rpat.data.folders import class_dirs, decode_imagefolder, folder_options
from rpat.errors import DataProblem

TINYIMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
# MD5 of the official zip (248,100,043 bytes), as pinned by public loaders of it (e.g. ContinualAI's Avalanche).
TINYIMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
TINYIMAGENET_ZIP = "tiny-imagenet-200.zip"
TINYIMAGENET_MEAN = (0.4802, 0.4481, 0.3975)
TINYIMAGENET_STD = (0.2770, 0.2691, 0.2821)


def _tinyimagenet_dir(root: Path) -> Path | None:
    """``root`` itself or the ``tiny-imagenet-200/`` the official zip unpacks to, whichever has train/ and val/."""
    for d in (root, root / "tiny-imagenet-200"):
        if (d / "train").is_dir() and (d / "val").is_dir():
            return d
    return None


def verify_archive(path: Path) -> None:
    """Raise a DataProblem unless ``path``'s MD5 is the official zip's (:data:`TINYIMAGENET_MD5`)."""
    from torchvision.datasets.utils import calculate_md5

    found = calculate_md5(path)
    if found != TINYIMAGENET_MD5:
        raise DataProblem(
            f"tinyimagenet: {path} is corrupt or not the official archive (MD5 {found}, expected "
            f"{TINYIMAGENET_MD5}). To fix: delete it and run again with data.download: true, or replace it with "
            f"an intact copy of {TINYIMAGENET_URL}."
        )


def _fetch_archive(root: Path) -> Path:
    """The official zip in ``root``, checked; downloaded if absent (to a ``.part`` file, renamed once checked)."""
    from torchvision.datasets.utils import download_url

    zip_path = root / TINYIMAGENET_ZIP
    if zip_path.is_file():
        verify_archive(zip_path)
        return zip_path
    part = root / (TINYIMAGENET_ZIP + ".part")
    part.unlink(missing_ok=True)  # left by an interrupted run; download_url would take it as complete
    warnings.warn(f"downloading {TINYIMAGENET_URL} (about 240 MB) to {zip_path}", stacklevel=4)
    download_url(TINYIMAGENET_URL, str(root), filename=part.name)
    verify_archive(part)
    os.replace(part, zip_path)  # only a complete, verified download gets the final name
    return zip_path


def _download_tinyimagenet(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    zip_path = _fetch_archive(root)
    target = root / "tiny-imagenet-200"
    if target.exists():
        raise DataProblem(f"{target} exists but has no train/ and val/; move it away and run again")
    staging = root / ".tiny-imagenet-200.extracting"
    if staging.exists():  # left by an interrupted run
        shutil.rmtree(staging)
    with zipfile.ZipFile(zip_path) as z:
        z.extractall(staging)
    os.rename(staging / "tiny-imagenet-200" if (staging / "tiny-imagenet-200").is_dir() else staging, target)
    shutil.rmtree(staging, ignore_errors=True)
    zip_path.unlink()
    return target


def _layout_tinyimagenet_val(val_dir: Path) -> None:
    """Move ``val/images/<file>`` to ``val/<wnid>/images/<file>`` as listed in ``val/val_annotations.txt``.

    Safe to re-run and to interrupt: each file is moved with one atomic ``os.replace`` and a file already
    at its destination is skipped, so a later run finishes the job. ``val/images/`` is removed once empty.
    """
    ann = val_dir / "val_annotations.txt"
    flat = val_dir / "images"
    if not ann.is_file() or not flat.is_dir():
        return  # already laid out by class (or not the official layout; the loader checks)
    for line in ann.read_text().splitlines():
        fields = line.split("\t")
        if len(fields) < 2 or not fields[0].strip():
            continue
        fname, wnid = fields[0].strip(), fields[1].strip()
        src, dst = flat / fname, val_dir / wnid / "images" / fname
        if src.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(src, dst)
            except FileNotFoundError:  # moved meanwhile by a concurrent run
                if not dst.exists():
                    raise
        elif not dst.exists():
            raise DataProblem(f"{src}: listed in {ann} but missing (and not at {dst}); re-extract the dataset")
    try:
        flat.rmdir()
    except OSError:
        warnings.warn(f"{flat} still holds files not listed in {ann.name}; they are ignored", stacklevel=3)


def prepare_tinyimagenet(root: Path, download: bool) -> Path:
    """Make Tiny-ImageNet loadable from ``root``; return the directory holding ``train/`` and ``val/``.

    ``root`` may be that directory or its parent (the zip unpacks to ``tiny-imagenet-200/``). If absent
    and ``download`` is true, the official zip is downloaded with torchvision's ``download_url`` (to a
    ``.part`` file, renamed once its MD5 matches :data:`TINYIMAGENET_MD5`) and unpacked there; a zip
    already in ``root`` is checked the same way, and a wrong checksum is a DataProblem. Then the val
    split is laid out by class (what the reference's ``tiny_pre.py`` does, but idempotent; see
    :func:`_layout_tinyimagenet_val`).
    """
    root = Path(root).expanduser()
    data_dir = _tinyimagenet_dir(root)
    if data_dir is None:
        if not download:
            raise DataProblem(
                f"tinyimagenet: expected {root}/train/<wnid>/images/*.JPEG and {root}/val/ (or the same under "
                f"{root}/tiny-imagenet-200/). To fix: set data.download: true on a machine with internet (fetches "
                f"{TINYIMAGENET_URL}); or unzip that file into {root}; or point data.paths.tinyimagenet at the "
                f"tiny-imagenet-200 directory."
            )
        data_dir = _download_tinyimagenet(root)
    _layout_tinyimagenet_val(data_dir / "val")
    return data_dir


@register("tinyimagenet", "Tiny-ImageNet-200, 64x64 RGB, 200 classes, 100,000 train / 10,000 test (official val)", 200, 64,
          display="Tiny-ImageNet")
def load_tinyimagenet(options: dict) -> Loaded:
    data_dir = prepare_tinyimagenet(dataset_root(options, "tinyimagenet"), bool(options.get("download", False)))
    classes = class_dirs(data_dir / "train")  # sorted wnids, as ImageFolder
    if len(classes) != 200:
        raise DataProblem(
            f"tinyimagenet: {data_dir / 'train'} has {len(classes)} class folders, expected 200; re-extract the "
            f"dataset ({TINYIMAGENET_URL})"
        )
    kw = folder_options(options, data_dir)
    if not any((data_dir / "val" / c).is_dir() for c in classes):
        raise DataProblem(
            f"tinyimagenet: no val images under {data_dir / 'val'}/<wnid>/; the val split needs "
            f"val/val_annotations.txt + val/images/ (the official zip) or a val/<wnid>/ layout"
        )
    x, y, _ = decode_imagefolder(data_dir / "train", classes=classes, image_size=64, **kw)
    tx, ty, _ = decode_imagefolder(data_dir / "val", classes=classes, image_size=64, **kw)
    return Loaded(
        train=(x, y), test=(tx, ty), num_classes=200, mean=list(TINYIMAGENET_MEAN), std=list(TINYIMAGENET_STD), classes=classes
    )
