"""What an evaluation job writes: per-example outcomes (``outcomes.npz``), shard results, and their merge.

A job's *part* is its blocks' outcomes: a JSON-able record (``stats``: the cell's header, the key that says what
was evaluated, per measurement the number correct, the summed counts, warnings, details and seconds) and arrays
(``index``: the test-set indices of its examples, one bool array per measurement). An unsharded job combines its
one part into the cell's eval.json; shard jobs write theirs (``<name>.json`` + ``<name>.npz``) and the merge
combines all of them, concatenating the outcomes in index order.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from rpat import files
from rpat.errors import UserError


class MergeError(UserError, ValueError):
    """Shard results that do not make up one evaluation."""


def index_digest(index) -> str:
    return hashlib.sha256(np.asarray(index, dtype=np.int64).tobytes()).hexdigest()


def write_outcomes(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """``index`` (int64) and one bool array per measurement, atomically."""
    files.write_npz(path, {k: np.asarray(v, dtype=np.int64 if k == "index" else bool) for k, v in arrays.items()})


def read_outcomes(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of an outcomes file: ``index`` and one bool array per measurement that ran."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise files.ResultFileError(f"{path} does not exist; run the evaluation that writes it") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise files.ResultFileError(f"{path} cannot be read ({type(e).__name__}); it is truncated or corrupt: delete "
                                    "it and rerun the evaluation") from None
    if "index" not in arrays or any(len(v) != len(arrays["index"]) for v in arrays.values()):
        raise files.ResultFileError(f"{path} lacks an index or has arrays of different lengths; delete it and rerun "
                                    "the evaluation")
    return arrays


def _union(lists) -> list:
    return list(dict.fromkeys(w for ws in lists for w in ws))


def _summed(dicts) -> dict:
    out: dict = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def _merged(records: list[dict], correct: int, seconds: float) -> dict:
    """One measurement's stats over several blocks (or shards): counts summed, warnings and details collected."""
    details: dict = {}
    for r in records:
        details.update(r["details"])
    return {"correct": correct, "counts": _summed(r["counts"] for r in records),
            "warnings": _union(r["warnings"] for r in records), "details": details, "seconds": seconds}


def part(progress, keys: list[str], ranges: list[range], block_ids: list[int],
         index: torch.Tensor) -> tuple[dict, dict]:
    """One job's part from its finished progress (``keys``: the measurements that ran)."""
    mine = torch.cat([index[ranges[b].start:ranges[b].stop] for b in block_ids]) if block_ids else index[:0]
    arrays = {"index": mine.cpu().numpy().astype(np.int64)}
    measured = {}
    for key in keys:
        recs = [progress.finished(key, b) for b in block_ids]
        flags = torch.cat([r["correct"] for r in recs]) if recs else torch.zeros(0, dtype=torch.bool)
        arrays[key] = flags.numpy()
        measured[key] = _merged(recs, int(flags.sum()), progress.data["seconds"].get(key, 0.0))
    stats = {"measured": measured, "blocks": block_ids, "n_examples": len(mine), "batch_size": progress.batch_size,
             "batch_halvings": progress.data["halvings"], "sessions": progress.data["sessions"]}
    return stats, arrays


def write_shard(path: str | Path, stats: dict, arrays: dict, outcomes_path: str | Path) -> None:
    write_outcomes(outcomes_path, arrays)
    files.write_json(path, {**stats, "outcomes": os.path.relpath(outcomes_path, Path(path).parent)})


def read_shard(path: str | Path) -> tuple[dict, dict]:
    stats = files.read_record(path, ("header", "key", "shard", "measured", "outcomes", "n_examples"))
    return stats, read_outcomes(Path(path).parent / stats["outcomes"])


def combine(parts: list[tuple[dict, dict]]) -> tuple[dict, dict, dict]:
    """The shards' parts as one: (header, per-measurement stats summed, arrays in index order). Refuses parts
    that are not exactly the shards 1..N of one evaluation of the same examples."""
    stats0 = parts[0][0]
    n_shards = stats0["shard"]["of"]
    if any(s["key"] != stats0["key"] for s, _ in parts):
        raise MergeError("the shard results were computed with different settings, checkpoints, examples or device "
                         "types; rerun the evaluation's shard jobs (delete their results first)")
    got = sorted(s["shard"]["index"] for s, _ in parts)
    if got != list(range(1, n_shards + 1)):
        raise MergeError(f"shards {got} given, but the evaluation was split into {n_shards} (1..{n_shards}); give each "
                         "shard's result once")
    index = np.concatenate([a["index"] for _, a in parts])
    order = np.argsort(index, kind="stable")
    index = index[order]
    examples = stats0["header"]["examples"]
    if len(index) != examples["n"] or index_digest(index) != examples["digest"]:
        raise MergeError(f"the shards hold {len(index)} examples, not the {examples['n']} evaluated ones; rerun "
                         "the shard jobs")
    arrays = {"index": index}
    measured = {}
    for key in stats0["measured"]:
        arrays[key] = np.concatenate([a[key] for _, a in parts])[order]
        ms = [s["measured"][key] for s, _ in parts]
        measured[key] = _merged(ms, int(arrays[key].sum()), sum(m["seconds"] for m in ms))
    by_shard = sorted(parts, key=lambda p: p[0]["shard"]["index"])
    layout = {"shards": n_shards, "shard_wall_s": [s["wall_s"] for s, _ in by_shard],
              "batch_size": min(s["batch_size"] for s, _ in parts),
              "batch_halvings": [h for s, _ in parts for h in s["batch_halvings"]],
              "sessions": max(s["sessions"] for s, _ in parts)}
    return stats0["header"], {"measured": measured, **layout}, arrays
