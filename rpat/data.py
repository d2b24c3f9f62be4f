"""Dataset registry, seeded splits and in-memory batch loaders.

Every dataset loads into memory as ``(x, y)`` tensors: ``x`` is NCHW, either ``uint8`` (0..255) or
``float32`` in [0, 1]; ``y`` is ``int64``. CIFAR-sized sets fit easily (150 MB as uint8), so batches
are sliced from tensors, augmented on the device, and no per-image Python runs in the hot loop
(except in ``autoaugment_cutout``, which runs torchvision's AutoAugment image by image on the CPU).

A dataset is one :func:`register` entry: a loader ``load(options) -> Loaded`` plus its metadata.
The validation split is carved out of the training set here, for every dataset the same way.

Registered datasets: ``digits`` (offline demo), ``cifar10``, ``cifar100``, ``tinyimagenet`` and
``imagefolder`` (any ``train/<class>/`` + ``test/<class>/`` tree). Image folders are decoded once with
PIL and cached as a ``.pt`` file under ``<dataset root>/.rpat-cache/`` (see :func:`decode_imagefolder`).

Keys of the run's ``data`` config section read here:

- ``root`` (default ``"data"``): directory holding one sub-directory per dataset (``<root>/<name>``).
- ``paths`` (default ``{}``): per-dataset overrides, ``paths.<name>`` = that dataset's directory.
- ``download`` (default ``false``): allow fetching CIFAR-10/100 (torchvision) or Tiny-ImageNet from the
  internet when they are absent. Never on by default: offline machines get a clear error instead.
- ``cache`` (default ``true``): cache decoded image folders under ``<dataset root>/.rpat-cache/``.
- ``decode_workers`` (default ``min(8, cpu count)``): processes used to decode image folders (1 = no pool).
- ``val_size`` (default 1000), ``split_seed`` (default 0), ``train_subset`` (default none): see
  :func:`load_splits`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from rpat.errors import DataProblem, UnknownName


@dataclass
class Loaded:
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    num_classes: int
    mean: Sequence[float]
    std: Sequence[float]
    classes: list[str] = field(default_factory=list)

    @property
    def channels(self) -> int:
        return int(self.train[0].shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train[0].shape[-1])


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    load: Callable[[dict], Loaded]
    description: str
    num_classes: int | None  # None: read from the data (imagefolder)
    image_size: int | None
    # Files on disk (downloaded, laid out, decoded into a cache) that one job should prepare before
    # many jobs read them; False for data bundled with a package.
    on_disk: bool = True
    display: str = ""  # the paper's name (tables, plots)


DATASETS: dict[str, DatasetSpec] = {}


def register(name: str, description: str, num_classes: int | None, image_size: int | None, on_disk: bool = True,
             display: str = ""):
    """Register ``load(options) -> Loaded``; ``options`` is the run's ``data`` config section."""

    def deco(fn):
        if name in DATASETS:
            raise ValueError(f"dataset {name!r} is registered twice")
        DATASETS[name] = DatasetSpec(name, fn, description, num_classes, image_size, on_disk, display or name)
        return fn

    return deco


def dataset_info() -> list[dict]:
    """One dict per registered dataset (name, description, num_classes, image_size), for ``rpat info``.

    ``num_classes`` / ``image_size`` are ``None`` where they are read from the data (``imagefolder``).
    """
    return [
        {"name": s.name, "description": s.description, "num_classes": s.num_classes, "image_size": s.image_size}
        for s in DATASETS.values()
    ]


def dataset_root(options: dict, name: str) -> Path:
    """Where dataset ``name`` lives offline: ``data.paths[name]`` or ``<data.root>/<name>``."""
    paths = options.get("paths") or {}
    if name in paths:
        return Path(paths[name]).expanduser()
    return Path(options.get("root", "data")).expanduser() / name


def _seeded_permutation(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)


# ---------------------------------------------------------------------------------------------
# digits: scikit-learn's bundled 8x8 handwritten digits (1,797 images), the offline demo data.

DIGITS_TEST_SIZE = 400
DIGITS_SPLIT_SEED = 0  # the test split is part of the dataset's definition, not of a run


@register("digits", "scikit-learn's bundled 8x8 grey digits, 10 classes; 400 held-out test images", 10, 8,
          on_disk=False, display="Digits")
def load_digits(options: dict) -> Loaded:
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    perm = _seeded_permutation(len(y), DIGITS_SPLIT_SEED)
    test_idx, train_idx = perm[:DIGITS_TEST_SIZE], perm[DIGITS_TEST_SIZE:]
    return Loaded(
        train=(x[train_idx], y[train_idx]),
        test=(x[test_idx], y[test_idx]),
        num_classes=10,
        mean=[0.5],
        std=[0.5],
        classes=[str(i) for i in range(10)],
    )


# ---------------------------------------------------------------------------------------------
# Image folders: decode once with PIL into uint8 tensors, cache the result as a .pt file.

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CACHE_DIRNAME = ".rpat-cache"
_CACHE_VERSION = 1
_POOL_MIN_FILES = 2000  # below this a plain loop is faster than starting a process pool
_CHUNK = 1000  # files per pool task
_RESIZE_HINT = (
    "every image of a dataset must be square and of one size; resize them first, e.g. with ImageMagick "
    "`mogrify -resize 32x32! <folder>/*/*.png` or PIL's Image.resize"
)


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


def _image_files(class_dir: Path) -> list[Path]:
    """Image files under ``class_dir``, recursively (Tiny-ImageNet keeps them in ``<wnid>/images/``), sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        out.extend(Path(dirpath) / f for f in filenames if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith("."))
    return sorted(out)


def _default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def _decode_chunk(args: tuple[list[str], tuple[int, int]]):
    """Decode ``paths`` (all of size ``(h, w)``) to an (n, h, w, 3) uint8 array. Runs in pool workers."""
    import numpy as np
    from PIL import Image

    paths, (h, w) = args
    out = np.empty((len(paths), h, w, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        with Image.open(path) as im:
            if im.size != (w, h):
                raise ValueError(f"{path}: image is {im.size[0]}x{im.size[1]}, expected {w}x{h}; {_RESIZE_HINT}")
            out[i] = np.asarray(im.convert("RGB"))
    return out


def _decode_files(files: list[Path], size: tuple[int, int], workers: int) -> torch.Tensor:
    """Decode ``files`` into one (N, 3, h, w) uint8 tensor, in file order."""
    h, w = size
    x = torch.empty((len(files), 3, h, w), dtype=torch.uint8)
    tasks = [([str(f) for f in files[i : i + _CHUNK]], size) for i in range(0, len(files), _CHUNK)]
    if workers <= 1 or len(files) < _POOL_MIN_FILES:
        results = map(_decode_chunk, tasks)
        pool = None
    else:
        import multiprocessing as mp

        pool = mp.get_context().Pool(min(workers, len(tasks)))
        results = pool.imap(_decode_chunk, tasks)  # ordered
    try:
        start = 0
        for arr in results:
            x[start : start + len(arr)] = torch.from_numpy(arr).permute(0, 3, 1, 2)
            start += len(arr)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return x


def _atomic_torch_save(obj, path: Path) -> None:
    """``torch.save`` to a temp file in the same directory, then ``os.replace``: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def decode_imagefolder(
    split_dir: Path,
    *,
    classes: Sequence[str] | None = None,
    image_size: int | None = None,
    cache_dir: Path | None = None,
    workers: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Load ``split_dir/<class>/**/<image>`` as ``(x uint8 (N,3,S,S), y int64 (N,), classes)``.

    Images are converted to RGB (as torchvision's ImageFolder does). ``classes`` fixes the class list and
    its order (label = index; folders not in it are ignored); by default the sorted sub-folders. All
    images must be ``image_size`` square, or, when ``image_size`` is None, square and of the first
    image's size; otherwise a ValueError names the offending file.

    With ``cache_dir`` the tensors are saved there once (atomically) and reloaded on later calls. The
    cache key covers the resolved folder path, the class list and every file's relative path, size and
    mtime, so a changed folder is decoded again (and the stale cache file replaced).
    """
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise FileNotFoundError(f"image folder {split_dir} does not exist")
    classes = list(classes) if classes is not None else _class_dirs(split_dir)
    if not classes:
        raise FileNotFoundError(f"no class folders in {split_dir}: expected {split_dir}/<class>/<image files>")
    files: list[Path] = []
    labels: list[int] = []
    for i, c in enumerate(classes):
        if (split_dir / c).is_dir():
            found = _image_files(split_dir / c)
            files.extend(found)
            labels.extend([i] * len(found))
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMG_EXTENSIONS)}) under {split_dir}/<class>/")

    cache_path = None
    key = ""
    if cache_dir is not None:
        resolved = str(split_dir.resolve())
        h = hashlib.sha256(f"v{_CACHE_VERSION}\n{resolved}\n{classes}\n{image_size}\n".encode())
        for f in files:
            st = f.stat()
            h.update(f"{f.relative_to(split_dir).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        key = h.hexdigest()
        stem = f"{split_dir.name}-{hashlib.sha256(resolved.encode()).hexdigest()[:8]}"
        cache_path = Path(cache_dir) / f"{stem}-{key[:16]}.pt"
        if cache_path.is_file():
            try:
                blob = torch.load(cache_path, map_location="cpu", weights_only=True)
                if blob.get("version") == _CACHE_VERSION and blob.get("key") == key:
                    return blob["x"], blob["y"], list(blob["classes"])
            except Exception as e:  # a corrupt or foreign file: decode again and overwrite it
                warnings.warn(f"ignoring unreadable image cache {cache_path}: {e}", stacklevel=2)

    if image_size is None:
        from PIL import Image

        with Image.open(files[0]) as im:
            w, h_ = im.size
        if w != h_:
            raise ValueError(f"{files[0]}: image is {w}x{h_}, not square; {_RESIZE_HINT}")
        image_size = w
    x = _decode_files(files, (image_size, image_size), workers if workers is not None else _default_workers())
    y = torch.tensor(labels, dtype=torch.int64)

    if cache_path is not None:
        try:
            _atomic_torch_save({"version": _CACHE_VERSION, "key": key, "x": x, "y": y, "classes": classes}, cache_path)
            for old in cache_path.parent.glob(f"{stem}-*.pt"):  # stale versions of this folder
                if old != cache_path:
                    old.unlink(missing_ok=True)
        except OSError as e:  # read-only data directory: work without the cache
            warnings.warn(f"could not write image cache {cache_path}: {e}", stacklevel=2)
    return x, y, classes


def _folder_options(options: dict, data_dir: Path) -> dict:
    """The cache/worker arguments of :func:`decode_imagefolder` for a dataset living in ``data_dir``."""
    return {
        "cache_dir": data_dir / CACHE_DIRNAME if options.get("cache", True) else None,
        "workers": int(options["decode_workers"]) if options.get("decode_workers") else None,
    }


def _has_imagefolder(root: Path) -> bool:
    return (root / "train").is_dir() and (root / "test").is_dir()


def _channel_stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std of uint8 images, on the [0, 1] scale."""
    c = x.shape[1]
    s = torch.zeros(c, dtype=torch.float64)
    ss = torch.zeros(c, dtype=torch.float64)
    for i in range(0, len(x), 4096):
        chunk = x[i : i + 4096].double().div_(255.0)
        s += chunk.sum(dim=(0, 2, 3))
        ss += chunk.square_().sum(dim=(0, 2, 3))
    n = x.numel() // c
    mean = s / n
    std = (ss / n - mean.square()).clamp_min(0).sqrt()
    std = torch.where(std > 0, std, torch.ones_like(std))  # constant channel: avoid dividing by zero
    return [float(v) for v in mean], [float(v) for v in std]


# ---------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100: torchvision's pickled batches or an image folder (e.g. the JPEG archive).

# Population statistics of the training images (REFERENCE.md 1.11 for CIFAR-10). The reference's SOTAs
# code uses the CIFAR-10 numbers for CIFAR-100 too; rpat uses each dataset's own (DECISIONS.md 7).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def _load_cifar(options: dict, name: str, tv_class: str, base_folder: str, num_classes: int, mean, std) -> Loaded:
    root = dataset_root(options, name)
    if root.name == base_folder:  # data.paths pointed at torchvision's folder itself
        root = root.parent
    download = bool(options.get("download", False))
    tv_dir = root / base_folder
    if tv_dir.is_dir() or (download and not _has_imagefolder(root)):
        import torchvision.datasets

        cls = getattr(torchvision.datasets, tv_class)
        try:
            sets = [cls(str(root), train=train, download=download) for train in (True, False)]
        except RuntimeError as e:
            raise DataProblem(
                f"{name}: {tv_dir} is incomplete or corrupted ({e}). Delete it and set data.download: true "
                f"on a machine with internet, or copy a complete {base_folder}/ there."
            ) from e
        (x, y), (tx, ty) = [
            (torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(s.targets, dtype=torch.int64))
            for s in sets
        ]
        classes = list(sets[0].classes)
    elif _has_imagefolder(root):
        kw = _folder_options(options, root)
        x, y, classes = decode_imagefolder(root / "train", image_size=32, **kw)
        if len(classes) != num_classes:
            raise ValueError(f"{name}: {root / 'train'} has {len(classes)} class folders, expected {num_classes}")
        tx, ty, _ = decode_imagefolder(root / "test", classes=classes, image_size=32, **kw)
    else:
        raise FileNotFoundError(
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


# ---------------------------------------------------------------------------------------------
# Tiny-ImageNet: train/<wnid>/images/*.JPEG; the official val split (50 per class) is the test set.

TINYIMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINYIMAGENET_MEAN = (0.4802, 0.4481, 0.3975)
TINYIMAGENET_STD = (0.2770, 0.2691, 0.2821)


def _tinyimagenet_dir(root: Path) -> Path | None:
    """``root`` itself or the ``tiny-imagenet-200/`` the official zip unpacks to, whichever has train/ and val/."""
    for d in (root, root / "tiny-imagenet-200"):
        if (d / "train").is_dir() and (d / "val").is_dir():
            return d
    return None


def _download_tinyimagenet(root: Path) -> Path:
    import urllib.request

    root.mkdir(parents=True, exist_ok=True)
    zip_path = root / "tiny-imagenet-200.zip"
    if not zipfile.is_zipfile(zip_path):
        part = root / "tiny-imagenet-200.zip.part"
        warnings.warn(f"downloading {TINYIMAGENET_URL} (about 240 MB) to {zip_path}", stacklevel=3)
        with urllib.request.urlopen(TINYIMAGENET_URL, timeout=60) as response, open(part, "wb") as f:
            shutil.copyfileobj(response, f, 1 << 20)
        os.replace(part, zip_path)  # only a complete download gets the final name
    target = root / "tiny-imagenet-200"
    if target.exists():
        raise FileExistsError(f"{target} exists but has no train/ and val/; move it away and run again")
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
            raise FileNotFoundError(f"{src}: listed in {ann} but missing (and not at {dst}); re-extract the dataset")
    try:
        flat.rmdir()
    except OSError:
        warnings.warn(f"{flat} still holds files not listed in {ann.name}; they are ignored", stacklevel=3)


def prepare_tinyimagenet(root: Path, download: bool) -> Path:
    """Make Tiny-ImageNet loadable from ``root``; return the directory holding ``train/`` and ``val/``.

    ``root`` may be that directory or its parent (the zip unpacks to ``tiny-imagenet-200/``). If absent
    and ``download`` is true, the official zip is downloaded (to a ``.part`` file, then renamed) and
    unpacked there. Then the val split is laid out by class (what the reference's ``tiny_pre.py`` does,
    but idempotent; see :func:`_layout_tinyimagenet_val`).
    """
    root = Path(root).expanduser()
    data_dir = _tinyimagenet_dir(root)
    if data_dir is None:
        if not download:
            raise FileNotFoundError(
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
    classes = _class_dirs(data_dir / "train")  # sorted wnids, as ImageFolder
    if len(classes) != 200:
        raise ValueError(f"tinyimagenet: {data_dir / 'train'} has {len(classes)} class folders, expected 200")
    kw = _folder_options(options, data_dir)
    x, y, _ = decode_imagefolder(data_dir / "train", classes=classes, image_size=64, **kw)
    try:
        tx, ty, _ = decode_imagefolder(data_dir / "val", classes=classes, image_size=64, **kw)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"tinyimagenet: no val images under {data_dir / 'val'}/<wnid>/; the val split needs "
            f"val/val_annotations.txt + val/images/ (the official zip) or a val/<wnid>/ layout ({e})"
        ) from e
    return Loaded(
        train=(x, y), test=(tx, ty), num_classes=200, mean=list(TINYIMAGENET_MEAN), std=list(TINYIMAGENET_STD), classes=classes
    )


# ---------------------------------------------------------------------------------------------
# imagefolder: any train/<class>/ + test/<class>/ tree; classes, size and statistics from the data.


@register(
    "imagefolder",
    "any train/<class>/ + test/<class>/ tree of square images (data.paths.imagefolder or <root>/imagefolder); "
    "classes, size and mean/std read from the data",
    None,
    None,
)
def load_imagefolder(options: dict) -> Loaded:
    root = dataset_root(options, "imagefolder")
    if not _has_imagefolder(root):
        raise FileNotFoundError(
            f"imagefolder: expected {root}/train/<class>/<images> and {root}/test/<class>/<images>. To fix: create "
            f"that tree there, or point data.paths.imagefolder at a directory that has it."
        )
    classes = _class_dirs(root / "train")
    extra = sorted(set(_class_dirs(root / "test")) - set(classes))
    if extra:
        raise ValueError(f"imagefolder: {root / 'test'} has class folders missing from train/: {', '.join(extra)}")
    kw = _folder_options(options, root)
    x, y, classes = decode_imagefolder(root / "train", classes=classes, **kw)
    tx, ty, _ = decode_imagefolder(root / "test", classes=classes, image_size=int(x.shape[-1]), **kw)
    mean, std = _channel_stats(x)
    return Loaded(train=(x, y), test=(tx, ty), num_classes=len(classes), mean=mean, std=std, classes=classes)


# ---------------------------------------------------------------------------------------------


@dataclass
class Splits:
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    num_classes: int
    mean: Sequence[float]
    std: Sequence[float]
    channels: int
    image_size: int


def prepare(name: str, options: dict) -> dict:
    """Download (if ``data.download``), lay out and decode-cache dataset ``name`` once, so the jobs that
    follow only read it. Returns a summary (sizes, classes)."""
    if name not in DATASETS:
        raise UnknownName(f"unknown dataset {name!r}; registered datasets: {', '.join(sorted(DATASETS))}")
    loaded = DATASETS[name].load(options)
    return {"dataset": name, "train": len(loaded.train[1]), "test": len(loaded.test[1]),
            "num_classes": loaded.num_classes, "image_size": loaded.image_size}


def load_splits(name: str, options: dict) -> Splits:
    """Load ``name`` and hold out ``options['val_size']`` training images (seed ``split_seed``)."""
    if name not in DATASETS:
        raise UnknownName(f"unknown dataset {name!r}; registered datasets: {', '.join(sorted(DATASETS))}")
    data = DATASETS[name].load(options)
    x, y = data.train
    val_size = int(options.get("val_size", 1000))
    if not 0 <= val_size < len(y):
        raise ValueError(f"data.val_size={val_size} must be in [0, {len(y)}) for dataset {name!r}")
    perm = _seeded_permutation(len(y), int(options.get("split_seed", 0)))
    val_idx, train_idx = perm[:val_size].sort().values, perm[val_size:].sort().values
    subset = options.get("train_subset")
    if subset:
        train_idx = train_idx[: int(subset)]
    test_x, test_y = data.test
    return Splits(
        train=(x[train_idx], y[train_idx]),
        val=(x[val_idx], y[val_idx]),
        test=(test_x, test_y),
        num_classes=data.num_classes,
        mean=data.mean,
        std=data.std,
        channels=data.channels,
        image_size=data.image_size,
    )


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 or float [0, 1] -> float32 [0, 1]."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


# ---------------------------------------------------------------------------------------------
# Batch augmentations: functions of (x float [0,1] on the device, generator) -> x.

Augment = Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def random_crop_flip(x: torch.Tensor, generator: torch.Generator | None = None, padding: int | None = None) -> torch.Tensor:
    """RandomCrop(size, padding=4, zero fill) + RandomHorizontalFlip(0.5), per image, batched.

    Padding 4 for every size, as the reference does for CIFAR and Tiny-ImageNet alike (REFERENCE.md 4.1);
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
       bit-identical with, the reference's DeepVoltaire implementation (REFERENCE.md 4.1): the same 25
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


class Batches:
    """Iterate ``(x, y)`` batches from in-memory tensors, moved to ``device`` once.

    ``views=2`` yields ``(cat(aug(x), aug(x)), cat(y, y))``: two independent augmentations of the
    same images, as Consistency-AT trains on (REFERENCE.md 1.8).
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
        drop_last: bool = False,
    ):
        self.x = x.to(device)
        self.y = y.to(device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.views = views
        self.generator = generator
        self.drop_last = drop_last

    def __len__(self) -> int:
        n = len(self.y)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def new_order(self) -> torch.Tensor | None:
        """This epoch's example order (None: sequential); drawn from ``generator``."""
        return torch.randperm(len(self.y), generator=self.generator) if self.shuffle else None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iterate(self.new_order())

    def iterate(self, order: torch.Tensor | None, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches ``start, start+1, ...`` of an epoch with example ``order`` (resume mid-epoch)."""
        n = len(self.y)
        order = order.to(self.x.device) if order is not None else None
        for b in range(start, len(self)):
            sl = slice(b * self.batch_size, min(n, (b + 1) * self.batch_size))
            idx = order[sl] if order is not None else sl
            xb, yb = to_float(self.x[idx]), self.y[idx]
            if self.views == 1:
                yield (self.augment(xb, self.generator) if self.augment else xb), yb
            else:
                views = [self.augment(xb, self.generator) if self.augment else xb for _ in range(self.views)]
                yield torch.cat(views), yb.repeat(self.views)
