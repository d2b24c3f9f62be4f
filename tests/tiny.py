"""The one tiny config every test that trains derives from: digits, the small CNN, seconds per cell on a CPU.

A test takes ``tiny_config(**changes)`` with only the changes its assertions need (the end-to-end tests:
more data and AutoAttack; the unit tests: other methods, epochs, tracking).
"""

from rpat.config import deep_merge

TINY = {
    "experiment": "tiny",
    "grid": [{"dataset": ["digits"], "model": ["cnn"], "norm": ["linf"], "method": ["pgd_at"],
              "rpat": [False, True], "seed": [0]}],
    "data": {"val_size": 64, "augment": "none", "batch_size": 64, "train_subset": 128},
    "threat": {"linf": {"eps": 0.3, "step": 0.1, "steps": 2}},
    "train": {"epochs": 2, "lr": 0.05, "schedule": {"name": "constant"}, "val_attack_steps": 2},
    "eval": {"n_examples": 16, "pgd_steps": 3, "cw_steps": 3, "autoattack": {"enabled": False}},
}


def tiny_config(**changes) -> dict:
    """TINY with sections deep-merged from ``changes`` (top-level values such as ``grid`` replace)."""
    return deep_merge(TINY, changes)


def tiny_grid(**coordinates) -> list[dict]:
    """TINY's one grid block with some coordinate lists replaced, e.g. ``tiny_grid(rpat=[True])``."""
    return [{**TINY["grid"][0], **coordinates}]
