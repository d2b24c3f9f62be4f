"""Checkpoints: written atomically, loaded with ``weights_only=True`` (a checkpoint cannot run code).

Model checkpoints (``checkpoint-best.pt``, ``checkpoint-last.pt``) hold the weights and what is needed
to rebuild the model; the training state (``state/last.pt``) adds optimizer, RNG and history for resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rpat.errors import UserError
from rpat.files import atomic_write

FORMAT = "rpat-checkpoint-v1"


class CheckpointError(UserError, RuntimeError):
    pass


def save(obj: dict, path: str | Path) -> None:
    atomic_write(path, lambda tmp: torch.save({**obj, "format": FORMAT}, tmp))


def load(path: str | Path, map_location: Any = "cpu", hint: str = "") -> dict:
    """Load an rpat checkpoint; a truncated, foreign or unsafe file raises CheckpointError naming it."""
    path = Path(path)
    fix = hint or f"delete {path} and rerun the job to recompute it"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; {fix}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e)[:200]}); "
                              f"it is truncated, corrupt or not a safe rpat checkpoint; {fix}") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not an rpat checkpoint (format {FORMAT!r} expected); {fix}")
    return obj


def load_weights(module: torch.nn.Module, weights: dict, path: str | Path, hint: str = "") -> None:
    """``module.load_state_dict(weights)``; weights that do not fit the module (another model, number of classes
    or image size) raise CheckpointError naming the checkpoint file and the first parameter that differs."""
    own = module.state_dict()
    wrong = [k for k in own if k in weights and tuple(weights[k].shape) != tuple(own[k].shape)]
    missing, unexpected = [k for k in own if k not in weights], [k for k in weights if k not in own]
    if not (wrong or missing or unexpected):
        module.load_state_dict(weights)
        return
    if wrong:
        k = wrong[0]
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        what = (f"parameter {k} has shape {list(weights[k].shape)} in the checkpoint, {list(own[k].shape)} in the "
                f"model{more}")
    else:
        what = f"its parameter names differ from the model's (missing {missing[:3]}, unexpected {unexpected[:3]})"
    fix = hint or ("it was written for another model, number of classes or image size: use this cell's checkpoint, "
                   "or delete it and rerun the cell's training")
    raise CheckpointError(f"checkpoint {path} does not fit the model it is loaded into: {what}; "
                          f"{fix}")
