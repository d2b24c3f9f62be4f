"""Export a grid cell for the RobustBench leaderboard: its weights in the model zoo's file layout and a model-info
JSON in the leaderboard's format.

The JSON has the fields of RobustBench's ``model_info/<dataset>/<threat_model>/<name>.json`` files, in their order:
``link``, ``name`` (the paper's title), ``authors``, ``additional_data`` (bool), ``number_forward_passes`` (int),
``dataset``, ``venue``, ``architecture``, ``eps`` (a string: ``"8/255"`` where 255 eps is a whole number, else the
number, e.g. ``"0.5"``), ``clean_acc``, ``reported``, ``autoattack_acc`` (percentages as strings rounded to two
decimals, as RobustBench's own ``update_json`` writes them), and ``footnote`` where there is one. The fields the
leaderboard's maintainers set (``unreliable``, ``external``) are left to them. The threat model is not a field: it
is the directory the file goes into on submission.

The ``.pt`` file holds ``{"state_dict": ..., "rpat_model": ..., "epoch": ...}``: the network's state_dict under
``"state_dict"``, as the zoo's files hold it, with the keys of the registered architecture (``rpat.models.build(...)
.net``); the normalisation is not in the weights (as for the zoo's Rice2020Overfitting) but in ``rpat_model``
(``model_name``, ``num_classes``, ``in_channels``, ``image_size``, ``mean``, ``std``, and ``zoo_entry`` for a
RobustBench cell), from which ``rpat.models.build_from_meta`` rebuilds the model on inputs in [0, 1]. The keys of
``preact_resnet18``, ``wrn28_10`` and ``wrn34_10`` are those of the zoo's ``PreActResNet(PreActBlockV2,
[2, 2, 2, 2], bn_before_fc=True)`` and ``WideResNet(depth, 10)``, so their exports load strictly into those
classes too.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from rpat import checkpoint as ckpt_io
from rpat import files, models
from rpat.cells import CellFiles
from rpat.errors import UserError
from rpat.models import robustbench

# The leaderboard's architecture strings for rpat's registered models; others keep their rpat name.
ARCHITECTURES = {
    "preact_resnet18": "PreActResNet-18",
    "resnet18": "ResNet-18",
    "resnet18_bottleneck": "ResNet-18 (bottleneck blocks)",
    "wrn28_10": "WideResNet-28-10",
    "wrn34_10": "WideResNet-34-10",
}
LEADERBOARD_EXAMPLES = {"cifar10": 10_000, "cifar100": 10_000, "imagenet": 5_000}  # test images AutoAttack runs on


class ExportError(UserError, ValueError):
    """A cell that cannot be exported as it is (not evaluated, no AutoAttack, mismatched records)."""


def eps_string(eps: float) -> str:
    """The leaderboard's ε: ``"8/255"`` where 255·ε is whole (within 1e-6), else the number (``"0.5"``)."""
    k = round(eps * 255)
    if k > 0 and math.isclose(eps * 255, k, abs_tol=1e-6):
        return f"{k}/255"
    return f"{eps:g}"


def percent_string(acc: float) -> str:
    """An accuracy in percent as the leaderboard writes it: ``str(round(acc, 2))``, e.g. 85.34, 58.5, 0.0."""
    return str(round(float(acc), 2))


def _footnote(evaluation: dict, footnote: str | None) -> str | None:
    """The given footnote, plus what departs from the leaderboard's protocol (fewer images, another AA version)."""
    notes = [footnote] if footnote else []
    full = LEADERBOARD_EXAMPLES.get(evaluation.get("dataset", ""))
    n = evaluation.get("n_examples")
    if full is not None and n is not None and n < full:
        drawn = evaluation.get("examples", {})
        which = (f"the first {n} test images" if drawn.get("subset", "first") == "first" else
                 f"{n} test images drawn {drawn['subset']} (seed {drawn.get('seed')})")
        notes.append(f"Evaluated on {which}, not {full:,}.")
    version = evaluation.get("aa_version", "standard")
    if version != "standard":
        notes.append(f"AutoAttack version {version!r}, not 'standard'.")
    return " ".join(notes) or None


def model_info(train: dict, evaluation: dict, *, title: str | None = None, link: str = "", authors: str = "",
               venue: str = "", additional_data: bool = False, number_forward_passes: int = 1,
               reported: float | None = None, footnote: str | None = None,
               architecture: str | None = None) -> dict:
    """The leaderboard model-info dict of a cell, from its train.json and eval.json records (as dicts).

    ``title`` is the JSON's ``name`` (the paper's title; default: the cell's id); ``reported`` is the robust
    accuracy (%) the paper claims (default: this evaluation's AutoAttack accuracy); ``architecture`` defaults to
    the leaderboard's name for the cell's model.
    """
    if evaluation.get("cell") != train.get("cell"):
        raise ExportError(f"eval.json is of cell {evaluation.get('cell')!r}, train.json of {train.get('cell')!r}; "
                          "re-run the cell's evaluation")
    if evaluation.get("aa") is None:
        raise ExportError(f"cell {train['cell']} has no AutoAttack accuracy (eval.autoattack.enabled was off); the "
                          "leaderboard ranks by it: enable AutoAttack and re-run the cell's evaluation")
    info = {
        "link": link,
        "name": title if title is not None else f"rpat cell {train['cell']}",
        "authors": authors,
        "additional_data": bool(additional_data),
        "number_forward_passes": int(number_forward_passes),
        "dataset": evaluation["dataset"],
        "venue": venue,
        "architecture": architecture or ARCHITECTURES.get(train["model"], train["model"]),
        "eps": eps_string(evaluation["eps"]),
        "clean_acc": percent_string(evaluation["clean"]),
        "reported": percent_string(evaluation["aa"] if reported is None else reported),
        "autoattack_acc": percent_string(evaluation["aa"]),
    }
    note = _footnote(evaluation, footnote)
    if note:
        info["footnote"] = note
    return info


def export_name(cell_id: str) -> str:
    """A file name from a cell id (``cifar10/wrn34_10/linf/trades+rpat/seed0`` ->
    ``cifar10_wrn34_10_linf_trades_rpat_seed0``)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", cell_id).strip("_")


def _records(run_dir: Path, which: str, expected: tuple[str, str] | None) -> tuple[dict, dict]:
    """train.json and the evaluation of checkpoint ``which``; ``expected`` = (cell id, training fingerprint) the
    config gives the cell, checked where given."""
    cell_files = CellFiles(run_dir)
    paths = [cell_files.train_record, cell_files.primary_evaluation]
    for p in paths:
        if not p.is_file():
            raise ExportError(f"{p} does not exist; train and evaluate the cell before exporting it")
    train = files.read_json(paths[0])
    if expected is not None and (train.get("cell"), train.get("fingerprint")) != expected:
        raise ExportError(f"{paths[0]} is not the record of cell {expected[0]} as the config defines it (cell "
                          f"{train.get('cell')!r}, other training settings); rerun the cell (snakemake does) or "
                          "export with the config it was run with")
    if which not in train.get("checkpoints", {}):
        raise ExportError(f"checkpoint {which!r} is not one of the cell's ({', '.join(train.get('checkpoints', {}))})")
    primary = files.read_json(paths[1])
    path = cell_files.evaluation(which, primary=primary.get("checkpoint"))
    if not path.is_file():
        raise ExportError(f"the cell's evaluation did not measure its {which!r} checkpoint ({path} does not exist): "
                          f"export checkpoint {primary.get('checkpoint')!r}, which eval.json measured, or evaluate "
                          f"{which!r} first")
    return train, primary if path == paths[1] else files.read_json(path)


def export_cell(run_dir: str | Path, out_dir: str | Path, checkpoint: str = "best", *, name: str | None = None,
                expected: tuple[str, str] | None = None, **fields) -> dict:
    """Write ``<out_dir>/<name>.pt`` (the weights, zoo layout) and ``<out_dir>/<name>.json`` (model info).

    ``run_dir`` is the cell's directory (train.json, eval.json, checkpoints); ``checkpoint`` must be one its
    evaluation measured. ``expected`` (cell id, training fingerprint) refuses a run directory that the config's
    cell did not write. ``fields`` go to :func:`model_info`. Returns the paths and the model info.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    train, evaluation = _records(run_dir, checkpoint, expected)
    ckpt_path = run_dir / train["checkpoints"][checkpoint]
    ckpt = ckpt_io.load(ckpt_path)
    missing = [k for k in models.META_KEYS if k not in ckpt]
    if missing:
        raise ExportError(f"{ckpt_path} lacks {', '.join(missing)}, needed to rebuild its model; re-train the cell")
    meta = {k: ckpt[k] for k in (*models.META_KEYS, "zoo_entry") if k in ckpt}
    if "zoo_entry" in meta:  # a RobustBench cell: the leaderboard's own architecture name
        fields.setdefault("architecture", robustbench.zoo_entry(**meta["zoo_entry"]).architecture)
    info = model_info(train, evaluation, **fields)
    model = models.build_from_meta(meta)
    model.load_state_dict(ckpt["model"])  # checks the weights fit the architecture before anything is written
    name = name or export_name(train["cell"])
    pt_path, json_path = out_dir / f"{name}.pt", out_dir / f"{name}.json"
    payload = {"state_dict": model.net.state_dict(), "rpat_model": meta, "epoch": ckpt.get("epoch")}
    files.atomic_write(pt_path, lambda tmp: torch.save(payload, tmp))
    files.write_json(json_path, info)
    return {"pt": str(pt_path), "json": str(json_path), "info": info}
