"""`rpat status`: each cell's state read from the files real jobs wrote (training, a failed job, nothing yet)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from interrupt import signal_at_step
from tiny import tiny_config

from rpat import config, status, train
from rpat.cells import CellFiles

ROOT = Path(__file__).resolve().parents[1]
# pgd_at/seed0 trains (2 epochs), pgd_at/seed1 is never started, pgd_at+rpat/seed0 fails (its loss overflows).
RAW = tiny_config(experiment="status", tracking={"enabled": False}, grid=[
    {"dataset": ["digits"], "model": ["cnn"], "norm": ["linf"], "method": ["pgd_at"], "rpat": [False],
     "seed": [0, 1]},
    {"dataset": ["digits"], "model": ["cnn"], "norm": ["linf"], "method": ["pgd_at"], "rpat": [True], "seed": [0],
     "set": {"train": {"lr": 1e30}}}])
TRAINING, PLANNED, FAILING = (config.Cell("digits", "cnn", "linf", "pgd_at", r, s) for r, s in
                              ((False, 0), (False, 1), (True, 0)))


def run_job(cfg_path: Path, log: Path, *args) -> int:
    """An `rpat` command as the workflow's rules run it: stdout and stderr into the job's log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        return subprocess.run([sys.executable, "-m", "rpat", *args, "--config", str(cfg_path)], stdout=f,
                              stderr=subprocess.STDOUT, cwd=cfg_path.parent).returncode


def test_training_planned_failed_then_evaluating(tmp_path, monkeypatch):
    cfg_path = tmp_path / "status.yaml"
    cfg_path.write_text(yaml.safe_dump({**RAW, "results_dir": str(tmp_path / "results")}))
    cfg = config.load(cfg_path)
    results = Path(cfg.results_dir)

    # Epoch 1 of 2 trained, then a SIGTERM in epoch 2 (as Slurm sends before a time limit): the job stops.
    restore = signal_at_step(monkeypatch, 3)  # epoch 2, step 1 of 2
    with pytest.raises(train.Preempted):
        train.train_cell(cfg, TRAINING, cfg.run_dir(TRAINING))
    restore()
    history = torch.load(cfg.run_dir(TRAINING) / "state" / "last.pt", weights_only=True)["history"]
    assert [h["epoch"] for h in history] == [1]
    progress = json.loads((cfg.run_dir(TRAINING) / "progress.json").read_text())
    assert (progress["epoch"], progress["epochs"], progress["val_pgd"]) == (1, 2, history[0]["val_pgd"])
    assert progress["mean_epoch_s"] == pytest.approx(history[0]["epoch_s"])

    log = results / "logs" / "train" / f"{FAILING.id}.log"
    assert run_job(cfg_path, log, "train", "--cell", FAILING.id) == 2
    assert "rpat train: error: " in log.read_text() and "non-finite loss" in log.read_text()

    by_cell = {s.cell: s for s in status.grid_status(cfg)}
    s = by_cell[TRAINING.id]
    assert (s.state, s.progress, s.val_clean, s.val_pgd) == ("training", "epoch 1/2", history[0]["val_clean"],
                                                             history[0]["val_pgd"])
    assert s.left == status.duration(history[0]["epoch_s"])  # one epoch left at the mean epoch time
    assert by_cell[PLANNED.id].state == "planned" and by_cell[PLANNED.id].progress == ""
    assert by_cell[FAILING.id].state == "failed" and by_cell[FAILING.id].detail == f"train: see {log}"
    assert status.summary(list(by_cell.values())) == "3 cells: 1 planned, 1 training, 0 evaluating, 0 done, 1 failed"

    out = subprocess.run([sys.executable, "-m", "rpat", "status", "--config", str(cfg_path)], capture_output=True,
                         text=True, cwd=tmp_path)
    assert out.returncode == 1  # a cell failed
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["cell", "state", "progress", "val", "clean", "val", "pgd", "time", "left", "detail"]
    assert lines[-1] == "3 cells: 1 planned, 1 training, 0 evaluating, 0 done, 1 failed"
    assert any(line.startswith(TRAINING.id) and " training " in line and "epoch 1/2" in line for line in lines)

    # The rerun resumes and finishes training: the cell now waits for its evaluation and perception jobs.
    train.train_cell(cfg, TRAINING, cfg.run_dir(TRAINING))
    s = status.cell_status(cfg.results_dir, TRAINING, cfg.settings(TRAINING))
    assert (s.state, s.progress, s.detail) == ("evaluating", "epoch 2/2", "waiting: eval.json, perception.json")


def test_a_failed_evaluation_names_its_log_and_a_traceback_counts(tmp_path):
    cfg = config.from_dict({**RAW, "results_dir": str(tmp_path)})
    layout = CellFiles.of(tmp_path, TRAINING)
    run = layout.run
    run.mkdir(parents=True)
    (run / "train.json").write_text(json.dumps({"fingerprint": cfg.settings(TRAINING).train_fingerprint,
                                                "history": [{"epoch": 1, "val_clean": 50.0, "val_pgd": 20.0}]}))
    (run / "perception.json").write_text("{}")
    log = layout.log("evaluate")
    log.parent.mkdir(parents=True)
    log.write_text("[rpat] evaluating\nTraceback (most recent call last):\n  File ...\nRuntimeError: boom\n")
    s = status.cell_status(tmp_path, TRAINING, cfg.settings(TRAINING))
    assert (s.state, s.detail) == ("failed", f"evaluate: see {log}")
    log.write_text("[rpat] evaluating block 1\n")  # the retry started: Snakemake truncated the log
    s = status.cell_status(tmp_path, TRAINING, cfg.settings(TRAINING))
    assert (s.state, s.detail) == ("evaluating", "running: eval.json")
    # another cell's log (seed1, or a name that merely starts like it) is not this cell's
    assert layout.evaluation_logs() == [log]
    (log.parent / "seed01.log").write_text("Traceback (most recent call last):\n")
    assert layout.evaluation_logs() == [log]


def test_duration():
    assert [status.duration(s) for s in (0, 59.6, 61, 3599, 3600, 7325)] == ["0m00s", "1m00s", "1m01s", "59m59s",
                                                                            "1h00m", "2h02m"]
