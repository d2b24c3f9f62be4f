"""The saved progress of one evaluation job, so that a killed or preempted job resumes where it stopped.

Progress is kept per measurement and block: the per-example outcomes of every finished block, and for the block
in progress the finished stages of a measurement that has several (AutoAttack: one stage per attack of the
ensemble, each holding which examples are still robust). It is saved atomically after every block and every
stage to ``<cell>/eval-state/<checkpoint>[-<i>of<N>].pt``, a file no workflow rule declares (Snakemake neither
deletes it when a job fails nor asks for it), and removed once the job's results are written.

The state is keyed by everything that determines the outcomes (the evaluation fingerprint, the checkpoint file's
digest, the evaluated examples, the shard, the device type): a state with another key is ignored, so changed settings or a
retrained checkpoint start over instead of mixing two evaluations.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from rpat.files import atomic_write

FORMAT = "rpat-eval-state-v1"


class Progress:
    def __init__(self, path: Path, key: dict, batch_size: int):
        self.path, self.key = Path(path), key
        self.data = {"format": FORMAT, "key": key, "batch_size": batch_size, "halvings": [], "blocks": {},
                     "stages": {}, "seconds": {}, "sessions": 1, "units": 0}
        self._t = time.perf_counter()

    @classmethod
    def open(cls, path: str | Path, key: dict, batch_size: int) -> "Progress":
        """The progress saved in ``path`` for ``key``, or a fresh one (an unreadable or foreign state is ignored)."""
        progress = cls(path, key, batch_size)
        if not progress.path.is_file():
            return progress
        try:
            saved = torch.load(progress.path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
            saved = f"unreadable ({type(e).__name__})"
        if isinstance(saved, dict) and saved.get("format") == FORMAT and saved.get("key") == key:
            saved["sessions"] += 1
            progress.data = saved
            print(f"[rpat] resuming the evaluation saved in {progress.path} ({saved['units']} blocks and stages "
                  "done)", file=sys.stderr)
        else:
            why = saved if isinstance(saved, str) else "saved for other settings, checkpoint or shard"
            print(f"[rpat] ignoring {progress.path}: {why}; starting over", file=sys.stderr)
        return progress

    @property
    def batch_size(self) -> int:
        return self.data["batch_size"]

    @property
    def units(self) -> int:
        """Finished blocks and stages so far (in every session)."""
        return self.data["units"]

    def finished(self, key: str, block: int) -> dict | None:
        """A finished block's record (``correct``, ``counts``, ``warnings``, ``details``), or None."""
        return self.data["blocks"].get(key, {}).get(block)

    def stages(self, key: str, block: int) -> dict:
        """The finished stages of a block in progress, by name."""
        return dict(self.data["stages"].get(key, {}).get(block, {}))

    def start(self) -> None:
        """Start timing a piece of work (time between saves is credited to the measurement saved)."""
        self._t = time.perf_counter()

    def save_stage(self, key: str, block: int, stage: str, value: dict) -> None:
        self.data["stages"].setdefault(key, {}).setdefault(block, {})[stage] = value
        self._commit(key)

    def finish_block(self, key: str, block: int, record: dict) -> None:
        self.data["blocks"].setdefault(key, {})[block] = record
        self.data["stages"].get(key, {}).pop(block, None)
        self._commit(key)

    def halve(self, key: str, block: int, examples: int) -> int:
        """Halve the batch size actually used on a block of ``examples`` after a CUDA out-of-memory error (kept for
        the rest of the job and on resume)."""
        old = self.batch_size
        new = max(1, min(old, examples) // 2)
        self.data["batch_size"] = new
        self.data["halvings"].append({"measurement": key, "block": block, "from": old, "to": new})
        self.save()
        return new

    def _commit(self, key: str) -> None:
        now = time.perf_counter()
        self.data["seconds"][key] = self.data["seconds"].get(key, 0.0) + now - self._t
        self._t = now
        self.data["units"] += 1
        self.save()

    def save(self) -> None:
        atomic_write(self.path, lambda tmp: torch.save(self.data, tmp))

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        try:
            self.path.parent.rmdir()  # the last state of the cell
        except OSError:
            pass
