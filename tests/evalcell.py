"""The tiny trained cell the evaluation tests evaluate (tests/test_evaluate.py, tests/test_evaluate_kills.py)."""

import shutil
from pathlib import Path

from tiny import tiny_config

from rpat import config, train
from rpat.jobs import evaluate
from rpat.evaluation import results

# A digits CNN trained with plain CE on which AutoAttack is cheap but not trivial: of its 32 evaluated examples
# (4 blocks of 8), block 1 keeps 2 robust after APGD-CE, 1 of them after APGD-T, FAB-T and Square; block 3 keeps 1
# after APGD-CE, broken by APGD-T (measured; the tests compare runs and do not depend on these numbers).
EVAL_CELL = tiny_config(
    experiment="eval-blocks", tracking={"enabled": False},
    grid=[{"dataset": ["digits"], "model": ["cnn"], "norm": ["linf"], "method": ["ce"], "rpat": [False], "seed": [0]}],
    data={"val_size": 100, "batch_size": 128, "train_subset": 512},
    threat={"linf": {"eps": 0.3, "step": 0.075, "steps": 3}}, train={"epochs": 4, "val_attack_steps": 3},
    eval={"n_examples": 32, "block_size": 8, "pgd_steps": 5, "cw_steps": 5, "autoattack": {"enabled": True}})
NO_AA = {"autoattack": {"enabled": False}}


def cfg_of(results_dir, **eval_changes) -> config.Config:
    raw = config.deep_merge(EVAL_CELL, {"results_dir": str(results_dir), "eval": eval_changes})
    return config.from_dict(raw)


def train_cell(root: Path) -> Path:
    """The cell trained under ``root``; its directory (train.json and both checkpoints), which tests copy."""
    cfg = cfg_of(root)
    cell = cfg.cells()[0]
    train.train_cell(cfg, cell, cfg.run_dir(cell))
    return cfg.run_dir(cell)


def cell_copy(trained: Path, results_dir: Path, **eval_changes) -> tuple[config.Config, Path]:
    """The trained cell under ``results_dir`` (what a fresh evaluation sees) and its config."""
    cfg = cfg_of(results_dir, **eval_changes)
    run_dir = cfg.run_dir(cfg.cells()[0])
    run_dir.mkdir(parents=True)
    for name in ("train.json", "checkpoint-best.pt", "checkpoint-last.pt"):
        shutil.copy2(trained / name, run_dir / name)
    return cfg, run_dir


def outcomes_of(run_dir: Path, name: str = "outcomes.npz") -> dict:
    return {k: v.tolist() for k, v in results.read_outcomes(run_dir / name).items()}
