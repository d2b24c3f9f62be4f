"""``rpat status``: where every cell of a grid stands, read from the files its jobs write (nothing else).

It needs no connection to the jobs or the scheduler, so it works from a cluster's login node while Slurm runs
them, and as well after the controller died. Per cell, under ``<results_dir>``:

  done        train.json (with the config's training settings), every eval*.json of ``eval.checkpoints`` and
              perception.json exist
  failed      a job's output is missing and its log (``logs/<rule>/<cell>...log``) holds a Python traceback or the
              CLI's one-line ``rpat <command>: error:``. Snakemake truncates a job's log when the job starts, so a
              retry that has started is no longer failed; one still queued is, until it starts
  evaluating  trained; evaluation or perception not finished (``running`` when a log or saved progress exists,
              else ``waiting``)
  training    the training log or ``progress.json`` exists (training writes it after every epoch: epoch k of N,
              the validation accuracies, seconds per epoch); time left = remaining epochs × the mean epoch time.
              A job stopped by a signal says so (its rerun resumes)
  planned     nothing on disk yet (or train.json from other settings: the cell will be retrained)
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from rpat import files
from rpat.cells import Cell, CellFiles

STATES = ("planned", "training", "evaluating", "done", "failed")
FAILURE = re.compile(r"^Traceback \(most recent call last\):|^rpat [\w-]+: error:", re.M)
STOPPED = re.compile(r"^rpat train: .*rerun to resume", re.M)
TAIL_BYTES = 65536  # the end of a log is where a failure shows


@dataclass
class CellStatus:
    cell: str
    state: str
    progress: str = ""
    val_clean: float | None = None
    val_pgd: float | None = None
    left: str = ""
    detail: str = ""


def log_tail(path: Path) -> str | None:
    """The end of a log, or None when there is none."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - TAIL_BYTES))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return None


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


def _read(path: Path) -> dict | None:
    try:
        record = files.read_json(path)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _failure(logs: list[Path]) -> Path | None:
    for log in logs:
        text = log_tail(log)
        if text and FAILURE.search(text):
            return log
    return None


def training_status(cell_files: CellFiles, fingerprint: str, status: CellStatus) -> CellStatus:
    """A cell not trained yet: planned, or training with its last epoch's numbers."""
    log = cell_files.log("train")
    progress = _read(cell_files.progress)
    if progress is not None and progress.get("fingerprint") != fingerprint:
        progress = None  # from other settings: training starts over
    text = log_tail(log)
    if progress is None and text is None:
        status.state = "planned"
        return status
    status.state = "training"
    if progress is None:
        status.progress, status.detail = "starting", "no epoch finished yet"
    else:
        k, n = progress["epoch"], progress["epochs"]
        status.progress = f"epoch {k}/{n}"
        status.val_clean, status.val_pgd = progress.get("val_clean"), progress.get("val_pgd")
        status.left = duration((n - k) * progress["mean_epoch_s"])
        status.detail = f"updated {duration(max(0.0, time.time() - progress['updated']))} ago"
    if text and STOPPED.search(text):
        status.detail = "stopped by a signal; rerunning resumes it"
    return status


def cell_status(results_dir: str | Path, cell: Cell, settings) -> CellStatus:
    """Where ``cell`` stands (see the module's docstring for the rules)."""
    cell_files = CellFiles.of(results_dir, cell)
    status = CellStatus(cell.id, "planned")
    record = _read(cell_files.train_record)
    trained = record is not None and record.get("fingerprint") == settings.train_fingerprint
    if not trained:
        failed = _failure([cell_files.log("train")])
        if failed is None:
            return training_status(cell_files, settings.train_fingerprint, status)
        status.state, status.detail = "failed", f"train: see {failed}"
        return status
    history = record.get("history") or [{}]
    status.val_clean, status.val_pgd = history[-1].get("val_clean"), history[-1].get("val_pgd")
    pretrained = (record.get("selection") or {}).get("rule") == "pretrained"
    status.progress = "pretrained" if pretrained else f"epoch {len(record.get('history') or [])}/{settings.train.epochs}"
    primary = settings.eval.checkpoints[0]
    outputs = {cell_files.evaluation(c, primary): "evaluate" for c in settings.eval.checkpoints}
    outputs[cell_files.perception] = "perceive"
    missing = {path.name: rule for path, rule in outputs.items() if not path.is_file()}
    if not missing:
        status.state = "done"
        evaluation = _read(cell_files.evaluation(primary, primary)) or {}
        status.detail = "test " + ", ".join(f"{k} {evaluation[k]:.2f}" for k in ("clean", "pgd20", "aa")
                                           if isinstance(evaluation.get(k), (int, float)))
        return status
    logs = {"evaluate": cell_files.evaluation_logs(), "perceive": [cell_files.log("perceive")]}
    failed = _failure([log for rule in set(missing.values()) for log in logs[rule]])
    if failed is not None:
        rule = next(rule for rule, ls in logs.items() if failed in ls)
        status.state, status.detail = "failed", f"{rule}: see {failed}"
        return status
    status.state = "evaluating"
    running = cell_files.evaluation_state_dir.is_dir() or any(log.is_file() for rule in missing.values()
                                                          for log in logs[rule])
    status.detail = f"{'running' if running else 'waiting'}: {', '.join(sorted(missing))}"
    return status


def grid_status(cfg) -> list[CellStatus]:
    return [cell_status(cfg.results_dir, cell, cfg.settings(cell)) for cell in cfg.cells()]


def _number(v) -> str:
    return f"{v:.2f}" if isinstance(v, (int, float)) else ""


def table(statuses: list[CellStatus]) -> str:
    """The statuses as a plain-text table (columns left-aligned), then a one-line summary."""
    head = ["cell", "state", "progress", "val clean", "val pgd", "time left", "detail"]
    rows = [[s.cell, s.state, s.progress, _number(s.val_clean), _number(s.val_pgd), s.left, s.detail]
            for s in statuses]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in [head, *rows]]
    return "\n".join(lines + [summary(statuses)])


def summary(statuses: list[CellStatus]) -> str:
    counts = {state: sum(s.state == state for s in statuses) for state in STATES}
    return f"{len(statuses)} cells: " + ", ".join(f"{n} {state}" for state, n in counts.items())


def finished(statuses: list[CellStatus]) -> bool:
    """Nothing left to change: every cell done or failed."""
    return all(s.state in ("done", "failed") for s in statuses)
