"""The tiny digits grid that the end-to-end tests (local, Slurm) run through the real workflow."""

from rpat.config import deep_merge

TINY = {
    "experiment": "tiny-e2e",
    "grid": [{"dataset": ["digits"], "model": ["cnn"], "norm": ["linf"], "method": ["pgd_at"],
              "rpat": [False, True], "seed": [0]}],
    "data": {"val_size": 100, "augment": "none", "batch_size": 128, "train_subset": 512},
    "threat": {"linf": {"eps": 0.3, "step": 0.1, "steps": 3}},
    "train": {"epochs": 2, "lr": 0.05, "schedule": {"name": "constant"}, "val_attack_steps": 3},
    "eval": {"n_examples": 24, "pgd_steps": 5, "cw_steps": 5},
}


def tiny_config(**changes) -> dict:
    """TINY with sections deep-merged from ``changes`` (top-level values replace)."""
    return deep_merge(TINY, changes)
