"""AutoAttack, the official code (pyautoattack: fra31/auto-attack repackaged), with its per-attack numbers.

``attack_examples`` runs one attack of the ensemble on the examples still robust, the unit evaluation saves
progress after. pyautoattack's ``run_standard_evaluation`` with ``attacks_to_run = [attack]`` first keeps the
examples it classifies correctly, then attacks them in batches of ``batch_size``, reseeding the attack with the
fixed seed before each batch. Fed the examples still robust after the previous attacks, one attack at a time, it
therefore computes exactly what one ``run_standard_evaluation`` over all attacks computes, as long as those
examples fit one batch (a block of at most ``batch_size`` examples). With more, the batches' composition - and so
the outcome - depends on the batch size (as in pyautoattack itself).
"""

from __future__ import annotations

import logging
from importlib import metadata

import torch

NORMS = {"linf": "Linf", "l2": "L2", "l1": "L1"}


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


def attacks_of(version: str, norm: str) -> list[str]:
    """The attacks of AutoAttack's ``version`` for ``norm``, in the order it runs them."""
    from pyautoattack import AutoAttack

    with captured_log():
        return list(AutoAttack(torch.nn.Identity(), norm=NORMS[norm], version=version).attacks_to_run)


def attack_examples(model, x: torch.Tensor, y: torch.Tensor, attack: str, *, norm: str, eps: float, seed: int,
                    version: str = "standard", batch_size: int = 500, device=None) -> tuple[torch.Tensor, list[str]]:
    """Run ``attack`` of AutoAttack's ``version`` on (x, y): per-example robustness (bool, on x's device: correctly
    classified and not broken by the attack) and AutoAttack's warnings."""
    from pyautoattack import AutoAttack

    model.eval()
    with captured_log() as capture:
        adversary = AutoAttack(model, norm=NORMS[norm], eps=eps, seed=seed, version=version, device=device or x.device)
        adversary.attacks_to_run = [attack]
        _, y_adv = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
    warnings = [r.getMessage() for r in capture.records if r.levelno >= logging.WARNING]
    return (y_adv == y.to(y_adv.device)).to(x.device), warnings


def square_check(per_attack: dict[str, float]) -> list[str]:
    """AutoAttack's own warning when Square lowers the robust accuracy left by the other attacks (run here on the
    whole evaluation's numbers: attack by attack on blocks, pyautoattack never sees them together)."""
    from pyautoattack import checks

    with captured_log() as capture:
        checks.check_square_sr({"clean": 1.0, **{k: v / 100 for k, v in per_attack.items()}},
                               logger=logging.getLogger("auto-attack"))
    return [r.getMessage() for r in capture.records if r.levelno >= logging.WARNING]
