"""AutoAttack, the official code (pyautoattack: fra31/auto-attack repackaged), with its per-attack numbers.

``run_autoattack`` returns the per-example outcome (robust or not), the robust accuracy after each attack
of the ensemble (parsed from AutoAttack's log, made exact from the counts) and its sanity-check warnings.
"""

from __future__ import annotations

import logging
import re
import time
from importlib import metadata

import torch

NORMS = {"linf": "Linf", "l2": "L2", "l1": "L1"}
_AFTER = re.compile(r"robust accuracy after ([A-Z0-9-]+): ([0-9.]+)%")


def package_version() -> str:
    """The installed AutoAttack package and its version (eval.json records it)."""
    try:
        return f"pyautoattack {metadata.version('pyautoattack')}"
    except metadata.PackageNotFoundError:  # pragma: no cover - a dependency of rpat
        return "pyautoattack (version unknown)"


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


class captured_log:
    """Collect AutoAttack's log records (it logs per-attack accuracies and sanity-check warnings)."""

    def __enter__(self) -> _Capture:
        self.capture = _Capture()
        self.logger = logging.getLogger("auto-attack")
        self.saved = self.logger.level, self.logger.propagate
        self.logger.addHandler(self.capture)
        self.logger.setLevel(logging.DEBUG)
        self.logger.propagate = False
        return self.capture

    def __exit__(self, *exc):
        self.logger.removeHandler(self.capture)
        self.logger.setLevel(self.saved[0])
        self.logger.propagate = self.saved[1]


def run_autoattack(model, x: torch.Tensor, y: torch.Tensor, *, norm: str, eps: float, seed: int,
                   version: str = "standard", batch_size: int = 500, device=None) -> dict:
    """pyautoattack's ``run_standard_evaluation`` on (x, y): per-example robustness, robust accuracy (%), after
    each attack too."""
    from pyautoattack import AutoAttack

    model.eval()
    adversary = AutoAttack(model, norm=NORMS[norm], eps=eps, seed=seed, version=version, device=device or x.device)
    t0 = time.time()
    with captured_log() as capture:
        x_adv, y_adv = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
    seconds = time.time() - t0
    per_attack = {}
    for r in capture.records:
        m = _AFTER.search(r.getMessage())
        if m:  # the log rounds to 0.01 %: recover the exact count (exact for up to 10,000 examples)
            per_attack[m[1].lower()] = 100.0 * round(float(m[2]) / 100.0 * len(y)) / len(y)
    robust = (y_adv == y.to(y_adv.device)).cpu()
    warnings = [r.getMessage() for r in capture.records if r.levelno >= logging.WARNING]
    return {"robust": robust, "aa": 100.0 * float(robust.sum()) / len(y), "per_attack": per_attack,
            "warnings": warnings, "seconds": seconds, "attacks": list(adversary.attacks_to_run)}
