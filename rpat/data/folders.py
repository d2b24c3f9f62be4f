"""Image folders (``<split>/<class>/**/<image>``): decode once with PIL into uint8 tensors, cache as ``.pt``.

Used by every dataset that lives as image files (CIFAR image folders, Tiny-ImageNet, ``imagefolder``).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from rpat.errors import DataProblem
from rpat.files import atomic_write

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CACHE_DIRNAME = ".rpat-cache"
_CACHE_VERSION = 1
_POOL_MIN_FILES = 2000  # below this a plain loop is faster than starting a process pool
_CHUNK = 1000  # files per pool task
_BAD_IMAGE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)  # PIL's ways to fail on bad bytes
_RESIZE_HINT = (
    "every image of a dataset must be square and of one size; resize them first, e.g. with ImageMagick "
    "`mogrify -resize 32x32! <folder>/*/*.png` or PIL's Image.resize"
)


def class_dirs(split_dir: Path) -> list[str]:
    """The sorted names of the (non-hidden) sub-folders of ``split_dir``: the classes, as ImageFolder."""
    return sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


def has_imagefolder(root: Path) -> bool:
    return (root / "train").is_dir() and (root / "test").is_dir()


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


def _unreadable(path, e: Exception) -> DataProblem:
    reason = " ".join(str(e).replace(f" '{path}'", "").split()) or type(e).__name__  # the path is said once
    return DataProblem(
        f"{path}: not a readable image ({reason}). To fix: replace this file with an intact copy (e.g. extract "
        f"the data set again) or delete it."
    )


def _read_rgb(path: str, size: tuple[int, int]):
    """``path`` as an (h, w, 3) uint8 array; a DataProblem naming the file if it is unreadable or not ``size``."""
    import numpy as np

    h, w = size
    try:
        with Image.open(path) as im:
            if im.size != (w, h):
                raise DataProblem(f"{path}: image is {im.size[0]}x{im.size[1]}, expected {w}x{h}; {_RESIZE_HINT}")
            return np.asarray(im.convert("RGB"))
    except _BAD_IMAGE as e:
        raise _unreadable(path, e) from None


def _decode_chunk(args: tuple[list[str], tuple[int, int]]):
    """Decode ``paths`` (all of size ``(h, w)``) to an (n, h, w, 3) uint8 array. Runs in pool workers, whose
    exceptions (DataProblem, naming the file) are re-raised in the parent."""
    import numpy as np

    paths, (h, w) = args
    out = np.empty((len(paths), h, w, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        out[i] = _read_rgb(path, (h, w))
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


def _list_images(split_dir: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    """Every image file of ``split_dir/<class>/`` for ``classes`` in order, and its label (the class index)."""
    files: list[Path] = []
    labels: list[int] = []
    for i, c in enumerate(classes):
        if (split_dir / c).is_dir():
            found = _image_files(split_dir / c)
            if not found:
                raise DataProblem(
                    f"class folder {split_dir / c} holds no images ({', '.join(IMG_EXTENSIONS)}), so class {c!r} "
                    f"would have no examples. To fix: put its images there, or delete the folder if {c!r} is "
                    f"not a class of this data set."
                )
            files.extend(found)
            labels.extend([i] * len(found))
    if not files:
        raise DataProblem(f"no images ({', '.join(IMG_EXTENSIONS)}) under {split_dir}/<class>/")
    return files, labels


def _cache_location(split_dir: Path, classes: list[str], image_size: int | None, files: list[Path],
                    cache_dir: Path) -> tuple[Path, str, str]:
    """``(cache file, key, stem)``: the key covers the resolved folder, the classes and every file's
    relative path, size and mtime; ``stem`` is shared by every version of this folder's cache."""
    resolved = str(split_dir.resolve())
    h = hashlib.sha256(f"v{_CACHE_VERSION}\n{resolved}\n{classes}\n{image_size}\n".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(split_dir).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    key = h.hexdigest()
    stem = f"{split_dir.name}-{hashlib.sha256(resolved.encode()).hexdigest()[:8]}"
    return Path(cache_dir) / f"{stem}-{key[:16]}.pt", key, stem


def _read_cache(cache_path: Path, key: str):
    """The cached ``(x, y, classes)`` if ``cache_path`` holds this key's tensors, else None."""
    if not cache_path.is_file():
        return None
    try:
        blob = torch.load(cache_path, map_location="cpu", weights_only=True)
        if blob.get("version") == _CACHE_VERSION and blob.get("key") == key:
            return blob["x"], blob["y"], list(blob["classes"])
    except Exception as e:  # a corrupt or foreign file: decode again and overwrite it
        warnings.warn(f"ignoring unreadable image cache {cache_path}: {e}", stacklevel=3)
    return None


def _write_cache(cache_path: Path, stem: str, blob: dict) -> None:
    try:
        atomic_write(cache_path, lambda tmp: torch.save(blob, tmp))
        for old in cache_path.parent.glob(f"{stem}-*.pt"):  # stale versions of this folder
            if old != cache_path:
                old.unlink(missing_ok=True)
    except OSError as e:  # read-only data directory: work without the cache
        warnings.warn(f"could not write image cache {cache_path}: {e}", stacklevel=3)


def _first_image_size(path: Path) -> int:
    try:
        with Image.open(path) as im:
            w, h = im.size
    except _BAD_IMAGE as e:
        raise _unreadable(path, e) from None
    if w != h:
        raise DataProblem(f"{path}: image is {w}x{h}, not square; {_RESIZE_HINT}")
    return w


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
    image's size; otherwise a DataProblem names the offending file, as it does for an unreadable
    (corrupt, truncated) image and for a class folder without images.

    With ``cache_dir`` the tensors are saved there once (atomically) and reloaded on later calls. The
    cache key covers the resolved folder path, the class list and every file's relative path, size and
    mtime, so a changed folder is decoded again (and the stale cache file replaced).
    """
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise DataProblem(f"image folder {split_dir} does not exist")
    classes = list(classes) if classes is not None else class_dirs(split_dir)
    if not classes:
        raise DataProblem(f"no class folders in {split_dir}: expected {split_dir}/<class>/<image files>")
    files, labels = _list_images(split_dir, classes)

    if cache_dir is not None:
        cache_path, key, stem = _cache_location(split_dir, classes, image_size, files, cache_dir)
        cached = _read_cache(cache_path, key)
        if cached is not None:
            return cached

    if image_size is None:
        image_size = _first_image_size(files[0])
    x = _decode_files(files, (image_size, image_size), workers if workers is not None else _default_workers())
    y = torch.tensor(labels, dtype=torch.int64)

    if cache_dir is not None:
        _write_cache(cache_path, stem, {"version": _CACHE_VERSION, "key": key, "x": x, "y": y, "classes": classes})
    return x, y, classes


def folder_options(options: dict, data_dir: Path) -> dict:
    """The cache/worker arguments of :func:`decode_imagefolder` for a dataset living in ``data_dir``."""
    return {
        "cache_dir": data_dir / CACHE_DIRNAME if options.get("cache", True) else None,
        "workers": int(options["decode_workers"]) if options.get("decode_workers") else None,
    }


def channel_stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
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
