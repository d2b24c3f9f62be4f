"""Issue 9's acceptance on real processes: an AutoAttack evaluation killed with SIGKILL at several moments and
stopped with SIGTERM, then resumed, gives the per-example outcomes and accuracies of an uninterrupted run; 1 and 4
shards give the same outcomes; `rpat train` on a finished cell changes nothing."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from evalcell import cell_copy, outcomes_of, train_cell
from tiny import tiny_config

from rpat.jobs import evaluate

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
CELL = "digits/cnn/linf/ce/seed0"
# Saved units of a run: 4 blocks x (clean, PGD-20, CW) = 12, then AutoAttack per block: 4 attacks + the block.
AA_BLOCK_1_AFTER_APGD_T, AA_BLOCK_1_AFTER_FAB_T, ALL_UNITS = 12 + 5 + 2, 12 + 5 + 3, 12 + 4 * 5


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The trained cell and its uninterrupted, unsharded evaluation (eval.json and outcomes)."""
    trained = train_cell(tmp_path_factory.mktemp("trained"))
    cfg, run_dir = cell_copy(trained, tmp_path_factory.mktemp("reference"))
    t0 = time.perf_counter()
    result = evaluate.evaluate_cell(cfg, cfg.cells()[0], run_dir)
    print(f"uninterrupted evaluation with AutoAttack: {time.perf_counter() - t0:.1f} s")
    assert result["aa_per_attack"]["apgd-ce"] > result["aa"] > 0  # AutoAttack has work to do after its first attack
    return trained, result, outcomes_of(run_dir)


def accuracies(result: dict) -> dict:
    return {k: result[k] for k in ("clean", "pgd20", "cw", "aa", "mean", "nrr", "aa_per_attack", "n_examples")}


def test_one_and_four_shards_give_the_same_outcomes(reference, tmp_path):
    trained, expected, outcomes = reference
    cfg, run_dir = cell_copy(trained, tmp_path, shards=4)
    s = cfg.settings(cfg.cells()[0])
    paths = [run_dir / "eval-shards" / f"best-{i}of4.json" for i in range(1, 5)]
    for i, path in enumerate(paths, 1):
        evaluate.evaluate(s, run_dir / "train.json", path, tracking=cfg.tracking, shard=(i, 4))
    merged = evaluate.merge(s, paths, run_dir / "eval.json", tracking=cfg.tracking)
    assert outcomes_of(run_dir) == outcomes
    assert accuracies(merged) == accuracies(expected)


def units_done(state: Path) -> int:
    try:
        return torch.load(state, weights_only=True)["units"]
    except (OSError, RuntimeError, EOFError, KeyError):  # not written yet
        return 0


def start(cfg_path: Path, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rpat", "evaluate", "--config", str(cfg_path), "--cell", CELL,
                             "--threads", "1"], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop_after(proc: subprocess.Popen, state: Path, units: int, sig: int) -> None:
    """Send ``sig`` once the saved progress holds at least ``units`` blocks and stages."""
    deadline = time.time() + 300
    while units_done(state) < units:
        assert proc.poll() is None, f"the evaluation ended before {units} units: {proc.communicate()[1][-2000:]}"
        assert time.time() < deadline, "no progress saved"
        time.sleep(0.05)
    proc.send_signal(sig)


def test_killed_and_stopped_autoattack_evaluation_resumes_to_the_uninterrupted_outcomes(reference, tmp_path):
    trained, expected, outcomes = reference
    cfg, run_dir = cell_copy(trained, tmp_path / "results")
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.raw))
    state = run_dir / "eval-state" / "best.pt"
    t0 = time.perf_counter()

    for units in (2, AA_BLOCK_1_AFTER_APGD_T):  # killed among the first blocks, then inside AutoAttack (in FAB-T)
        proc = start(cfg_path, tmp_path)
        stop_after(proc, state, units, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
        assert not (run_dir / "eval.json").exists()
    assert units_done(state) >= AA_BLOCK_1_AFTER_APGD_T

    proc = start(cfg_path, tmp_path)  # SIGTERM while Square runs on block 1: the attack finishes, is saved, exit 75
    stop_after(proc, state, AA_BLOCK_1_AFTER_FAB_T, signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-2000:]
    assert re.search(r"rpat evaluate: signal SIGTERM after aa stage \S+ of block \d; progress saved in .*best\.pt; "
                     "rerun to resume", err), err[-2000:]
    assert AA_BLOCK_1_AFTER_FAB_T < units_done(state) < ALL_UNITS

    proc = start(cfg_path, tmp_path)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    print(f"killed twice, stopped once, resumed: {time.perf_counter() - t0:.1f} s in 4 processes")
    assert "resuming the evaluation saved in" in err
    result = json.loads((run_dir / "eval.json").read_text())
    assert outcomes_of(run_dir) == outcomes
    assert accuracies(result) == accuracies(expected) and result["sessions"] == 4
    assert not state.exists()


def test_train_on_a_finished_cell_changes_nothing(tmp_path):
    raw = tiny_config(grid=[{**tiny_config()["grid"][0], "rpat": [False]}], train={"epochs": 1},
                      eval={"autoattack": {"enabled": False}})
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(raw))
    target = "results/runs/digits/cnn/linf/pgd_at/seed0"  # relative to the working directory, as the rules name it
    cell_dir = tmp_path / target
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    snakemake = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--configfile", "tiny.yaml"]
    out = subprocess.run([*snakemake, "--cores", "1", f"{target}/train.json"], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    before = {p: p.stat().st_mtime_ns for p in cell_dir.rglob("*")}
    assert {"train.json", "checkpoint-best.pt", "checkpoint-last.pt"} <= {p.name for p in before}

    out = subprocess.run([sys.executable, "-m", "rpat", "train", "--config", "tiny.yaml", "--cell",
                          "digits/cnn/linf/pgd_at/seed0"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "already trained with these settings" in out.stderr, out.stderr
    assert {p: p.stat().st_mtime_ns for p in cell_dir.rglob("*")} == before

    out = subprocess.run([*snakemake, "-n", f"{target}/eval.json"], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert re.search(r"^evaluate\s+1$", out.stdout, re.M) and not re.search(r"^train\s", out.stdout, re.M)
