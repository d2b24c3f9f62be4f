"""Grid cells of pretrained RobustBench models, as the config sees them (no torch: planning stays fast).

A zoo model is named ``robustbench:<entry>`` in a grid block's ``model`` list and is evaluated, never trained,
with method ``pretrained``. The entry a cell loads is ``<dataset>/<threat model>/<entry>`` in the zoo:

- threat model: the cell's norm (``linf`` -> ``Linf``, ``l2`` -> ``L2``), so a cell is evaluated under the threat
  model its zoo entry was trained for. ``methods.pretrained.threat_model`` names another one explicitly, e.g. a
  ``Linf`` entry evaluated in an ``l2`` cell (the cell's norm and eps are what the attacks use, always).
- data set: the cell's data set, or ``methods.pretrained.dataset`` for a data set the zoo does not know (an
  ``imagefolder`` holding CIFAR-10-like images); its classes and image size must fit the entry.

The entries themselves (architectures, files) are in :mod:`rpat.models.robustbench`; the catalog snapshots them.
"""

from __future__ import annotations

PREFIX = "robustbench:"
THREAT_MODELS = {"linf": "Linf", "l2": "L2"}  # rpat's norm names -> the zoo's directory names


def is_zoo_model(model: str) -> bool:
    return model.startswith(PREFIX)


def entry_name(model: str) -> str:
    """``robustbench:Wong2020Fast`` -> ``Wong2020Fast``."""
    return model[len(PREFIX):] if is_zoo_model(model) else model


def zoo_threat_model(norm: str) -> str:
    return THREAT_MODELS.get(norm.lower(), norm)


def entry_key(dataset: str, norm: str, model: str, hp) -> tuple[str, str, str]:
    """``(dataset, threat model, entry)`` that a ``pretrained`` cell on ``dataset``/``norm``/``model`` loads,
    with the method's hyperparameters ``hp`` (``dataset``, ``threat_model``: None means the cell's)."""
    return (hp.get("dataset") or dataset, zoo_threat_model(hp.get("threat_model") or norm), entry_name(model))


def cell_problems(cell, hp, cat: dict) -> list[str]:
    """What is wrong with a cell as a zoo cell, from the catalog ``cat``: a zoo model with a method that trains,
    ``pretrained`` with a model that is not a zoo model, or an entry the zoo lacks for the cell's data set and
    threat model."""
    pretrained = cat["objectives"][cell.method].get("pretrained", False)
    zoo = cat["pretrained_models"]
    if not pretrained and not is_zoo_model(cell.model):
        return []
    if not pretrained:
        return [f"cell {cell.id}: {cell.model} is a pretrained RobustBench model; it is evaluated, not trained: "
                "put it in a block with method: [pretrained], rpat: [false]"]
    if cell.model not in zoo:
        return [f"cell {cell.id}: method pretrained evaluates RobustBench models, named robustbench:<entry>; "
                f"{cell.model!r} is not one. Supported: {', '.join(sorted(zoo))}"]
    dataset, threat_model, _ = entry_key(cell.dataset, cell.norm, cell.model, hp)
    have = zoo[cell.model]
    if f"{dataset}/{threat_model}" in have:
        return []
    same_data = [k.split("/")[1] for k in have if k.split("/")[0] == dataset]
    if same_data:
        norms = {v: k for k, v in THREAT_MODELS.items()}
        hint = (f"evaluate it in a {' or '.join(norms.get(t, t) for t in same_data)} cell, or set "
                f"methods.pretrained.threat_model: {same_data[0]} (in this block's set) to evaluate that entry under "
                f"{cell.norm} anyway")
    else:
        hint = f"set methods.pretrained.dataset to the zoo data set it was trained on ({have[0].split('/')[0]})"
    return [f"cell {cell.id}: RobustBench has no supported entry {dataset}/{threat_model}/{entry_name(cell.model)} "
            f"(entries of {cell.model}: {', '.join(have)}); {hint}"]
