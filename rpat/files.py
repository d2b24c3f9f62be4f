"""Files that readers can trust: written atomically (a temporary file renamed into place), readable by
collaborators (the umask applies), read with errors that name the file. Imports nothing heavy, so the
workflow can use it while planning."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from rpat.errors import UserError


class DiskFull(UserError, OSError):
    """No space left where a result is written; the previous version of the file (if any) is untouched."""


class ResultFileError(UserError, ValueError):
    """A result file (train.json, eval.json, ...) that is truncated, empty or not what it should hold."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _disk_full(err: BaseException, directory: Path) -> bool:
    """ENOSPC, or a writer that hides it (torch.save raises RuntimeError 'unexpected pos' on a full disk)."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return isinstance(err, (OSError, RuntimeError)) and shutil.disk_usage(directory).free < 1 << 20
    except OSError:
        return False


def atomic_write(path: str | Path, write) -> None:
    """Call ``write(tmp_path)``, then rename into place: readers never see a half-written file, and a failed
    write (a full disk included) leaves the previous file as it was. The file gets the mode a plain ``open``
    would give it (0666 less the umask), so collaborators on a shared file system can read results."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if _disk_full(e, path.parent):
            raise DiskFull(f"no space left on the device holding {path}; free some space (or point results_dir "
                           "elsewhere) and rerun: nothing was written, earlier results are intact") from None
        raise


def write_json(path: str | Path, obj: Any) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False, default=str)
            f.write("\n")

    atomic_write(path, write)


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_npz(path: str | Path, arrays: dict) -> None:
    """``numpy.savez`` of ``arrays`` (name -> array), atomically."""
    import numpy as np

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to the temporary name
            np.savez(f, **arrays)

    atomic_write(path, write)


def sha256(path: str | Path) -> str:
    """The hex SHA-256 of a file's bytes, read in chunks (checkpoints can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def read_json(path: str | Path) -> Any:
    """The JSON in ``path``; a truncated or corrupt file raises :class:`ResultFileError` naming it."""
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ResultFileError(f"{path} is not valid JSON ({e}); it is truncated or corrupt: delete it and rerun "
                              "the job that writes it") from None


def read_record(path: str | Path, required: tuple[str, ...]) -> dict:
    """A JSON object with at least the ``required`` keys, else :class:`ResultFileError` naming the file."""
    obj = read_json(path)
    if not isinstance(obj, dict):
        raise ResultFileError(f"{path} holds {type(obj).__name__}, not a JSON object; delete it and rerun the job "
                              "that writes it")
    missing = [k for k in required if k not in obj]
    if missing:
        raise ResultFileError(f"{path} lacks {', '.join(missing)}; it was written by another version or edited: "
                              "delete it and rerun the job that writes it")
    return obj
