"""What a training job writes beside its checkpoints: the cell's training record (its presence means the cell is
trained) and, after every epoch, its progress. Both the training loop (rpat/train.py) and the objectives that
provide weights instead of training (rpat/objectives/pretrained.py) write the record here; the file names are
:class:`rpat.cells.CellFiles`'.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from rpat import files
from rpat.cells import CellFiles
from rpat.settings import CellSettings
from rpat.tracking import CellRun

CHECKPOINTS = ("best", "last")  # what every trained cell holds


def write_record(settings: CellSettings, out_dir: Path, run: CellRun, *, fingerprint: str, selection: dict,
                 history: list, wall_s: float, device, metrics: dict) -> dict:
    """Write the cell's training record (last: its presence means the cell is trained) and log it to its MLflow
    run."""
    s, path = settings, CellFiles(out_dir).train_record
    result = {
        "cell": s.cell.id, **s.cell.tags(), "rpat": s.cell.rpat, "seed": s.cell.seed, "experiment": s.experiment,
        "fingerprint": fingerprint, "selection": selection,
        "checkpoints": {c: CellFiles.checkpoint_name(c) for c in CHECKPOINTS},
        "history": history, "wall_s": wall_s, "device": str(device), "torch": torch.__version__,
        "mlflow_run_id": run.run_id, "settings": s.resolved, "mlflow_metrics": metrics,
    }
    files.write_json(path, result)
    run.log_metrics(metrics)
    run.log_artifact(path)
    return result


def write_progress(out_dir: Path, settings: CellSettings, state) -> None:
    """The cell's progress after every epoch (``state``: the training loop's state, with its ``history``,
    ``fingerprint`` and ``epoch``): the epoch reached, its validation accuracies and the seconds per epoch, what
    ``rpat status`` shows while the cell trains (rpat/status.py); written atomically."""
    last, seconds = state.history[-1], [h["epoch_s"] for h in state.history]
    files.write_json(CellFiles(out_dir).progress, {
        "cell": settings.cell.id, "fingerprint": state.fingerprint, "epoch": state.epoch,
        "epochs": settings.train.epochs, "val_clean": last["val_clean"], "val_pgd": last["val_pgd"],
        "loss_total": last.get("loss_total"), "epoch_s": last["epoch_s"],
        "mean_epoch_s": sum(seconds) / len(seconds), "updated": time.time()})


def finished_record(out_dir: Path, fingerprint: str) -> dict | None:
    """The training record of a cell already trained with these settings (every checkpoint present), else None."""
    cell_files = CellFiles(out_dir)
    try:
        record = files.read_json(cell_files.train_record)
    except (OSError, ValueError):
        return None
    done = isinstance(record, dict) and record.get("fingerprint") == fingerprint
    return record if done and all(cell_files.checkpoint(c).is_file() for c in CHECKPOINTS) else None
