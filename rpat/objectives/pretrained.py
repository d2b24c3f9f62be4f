"""``pretrained``: a RobustBench zoo model as a grid cell, evaluated and never trained (docs/robustbench.md).

A cell ``<dataset>/robustbench:<entry>/<norm>/pretrained/seedN`` (RPAT off) runs the same jobs as any cell.
Its train job trains nothing: it loads the entry's file from ``methods.pretrained.model_dir`` (RobustBench's
layout, ``<model_dir>/<dataset>/<threat model>/<entry>.pt``; fetched from the zoo only with
``methods.pretrained.download: true``) and writes what training writes: ``checkpoint-best.pt`` and
``checkpoint-last.pt`` (the same weights, epoch 0, with the metadata that rebuilds the zoo's architecture and
normalisation) and train.json, whose ``selection`` rule is ``pretrained`` and whose ``selection.source`` records
the entry, its file and the file's SHA-256. Evaluation, its checks and the report then treat the cell as any other:
the same examples, the same attacks at the cell's norm and eps. Which entry a cell loads: :mod:`rpat.zoo`.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Mapping

from rpat import checkpoint, data, files, zoo
from rpat.cells import CellFiles
from rpat.errors import UserError
from rpat.models import robustbench
from rpat.objectives.registry import Objective, register
from rpat.records import write_record
from rpat.settings import CellSettings
from rpat.tracking import CellRun

DEFAULTS = {
    "model_dir": "models",  # RobustBench's own default directory
    "download": False,  # fetch a missing file from the zoo (needs internet and gdown)
    "dataset": None,  # the zoo data set the entry was trained on; None: the cell's
    "threat_model": None,  # the entry's threat model (Linf, L2); None: the cell's norm
}


class IncompatibleData(UserError, ValueError):
    """The cell's data set does not have the classes, channels or image size of the zoo entry."""


def not_trained(*args, **kwargs):
    raise TypeError("the pretrained objective has no attack or loss: its models are loaded, never trained")


def check_data(settings: CellSettings, entry: robustbench.ZooEntry) -> None:
    """Refuse a data set the entry cannot classify (another number of classes, channels or image size)."""
    splits = data.load_splits(settings.cell.dataset, settings.data.options())
    got = (splits.num_classes, splits.channels, splits.image_size)
    want = (entry.num_classes, 3, entry.image_size)
    if got != want:
        raise IncompatibleData(
            f"cell {settings.cell.id}: RobustBench entry {entry.dataset}/{entry.threat_model}/{entry.name} "
            f"classifies {want[0]} classes of {want[1]}x{want[2]}x{want[2]} images; data set "
            f"{settings.cell.dataset!r} has {got[0]} classes of {got[1]}x{got[2]}x{got[2]} images; evaluate it on "
            f"{entry.dataset} (or a data set shaped like it)")


def _link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` holding ``src``'s bytes: a hard link where the file system allows (zoo files reach 740 MB;
    every write in rpat replaces a file, never edits it in place, so the two names cannot diverge)."""

    def write(tmp):
        try:
            os.unlink(tmp)
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)

    files.atomic_write(dst, write)


def _note_eps(settings: CellSettings, entry: robustbench.ZooEntry) -> None:
    ranked = robustbench.LEADERBOARD_EPS.get(entry.threat_model)
    if zoo.zoo_threat_model(settings.cell.norm) == entry.threat_model and ranked is not None \
            and not math.isclose(settings.threat.eps, ranked, rel_tol=1e-6):
        print(f"[rpat] {settings.cell.id}: evaluated at eps={settings.threat.eps:g}, the cell's; the leaderboard "
              f"ranks {entry.threat_model} entries at eps={ranked:g}", file=sys.stderr)


def provide(settings: CellSettings, out_dir: str | Path, tracking: Mapping) -> dict:
    """Load the cell's zoo entry and write its checkpoints and train.json (see the module's docstring)."""
    t0, out_dir, hp, cell = time.time(), Path(out_dir), settings.method, settings.cell
    dataset, threat_model, name = zoo.entry_key(cell.dataset, cell.norm, cell.model, hp)
    entry = robustbench.zoo_entry(name, dataset, threat_model)
    check_data(settings, entry)
    model, info = robustbench.load_robustbench(name, model_dir=hp["model_dir"], dataset=dataset,
                                               threat_model=threat_model, download=hp["download"])
    _note_eps(settings, entry)
    fp = settings.train_fingerprint
    checkpoint.save({"model": model.state_dict(), "epoch": 0, "fingerprint": fp, **robustbench.entry_meta(entry)},
                    CellFiles(out_dir).checkpoint("last"))
    _link_or_copy(CellFiles(out_dir).checkpoint("last"), CellFiles(out_dir).checkpoint("best"))
    source = {**info, "sha256": files.sha256(info["path"]), "leaderboard_eps": robustbench.LEADERBOARD_EPS.get(
        entry.threat_model)}
    selection = {"rule": "pretrained", "split": None, "metric": None, "best_epoch": 0, "best_value": None,
                 "source": source}
    run = CellRun(tracking["uri"], settings.experiment, cell.tags(), enabled=tracking["enabled"], new=True,
                  name=settings.run_name)
    run.log_params(settings.resolved)
    run.set_tags({"train_fingerprint": fp, "robustbench_entry": f"{dataset}/{threat_model}/{name}"})
    wall_s = time.time() - t0
    print(f"[rpat] {cell.id}: loaded RobustBench {dataset}/{threat_model}/{name} from {info['path']} "
          f"({info['params']:,} parameters); nothing to train", file=sys.stderr)
    return write_record(settings, out_dir, run, fingerprint=fp, selection=selection, history=[], wall_s=wall_s,
                        device="cpu", metrics={"train_wall_s": wall_s})


register(Objective(
    name="pretrained",
    description="a pretrained RobustBench zoo model (model: robustbench:<entry>), loaded and evaluated, "
                "never trained",
    attack=not_trained,
    loss=not_trained,
    defaults=DEFAULTS,
    supports_rpat=False,
    provide=provide,
    display="RobustBench",
    help={"model_dir": "where the zoo checkpoints are read (RobustBench's layout and default directory; "
                       "docs/robustbench.md)",
          "download": "fetch a missing checkpoint from the zoo (needs internet and gdown)",
          "dataset": "the zoo data set the entry was trained on; null: the cell's",
          "threat_model": "the entry's threat model (Linf, L2); null: the cell's norm"},
))
