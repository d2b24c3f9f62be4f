"""Each cell's training curves, from the per-epoch ``history`` of its train.json (rpat/train.py).

One PNG per cell, ``plots/training/<cell>.png`` (the cell id as a path): the loss parts per epoch on the left
(log scale when all are positive), the validation accuracies (clean and PGD) the best checkpoint was selected
on at the right, the selected epoch marked. A cell without history (a pretrained model, or results without
their train.json) gets a figure that says so, so the report's file list is the same for every grid.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.ticker import MaxNLocator

from rpat import files
from rpat.cells import CellFiles
from rpat.report.plots import pyplot

FOLDER = "plots/training"


def figure_path(out_dir: str | Path, cell_id: str) -> Path:
    return Path(out_dir) / FOLDER / f"{cell_id}.png"


def _loss_keys(history: list[dict]) -> list[str]:
    """The loss parts logged for every epoch, total first; the weighted copies are left out (the unweighted
    part and the total say what they add)."""
    keys = [k for k in history[0] if k.startswith("loss_") and not k.endswith("_weighted")]
    keys = [k for k in keys if all(k in h for h in history)]
    return sorted(keys, key=lambda k: (k != "loss_total", k))


def curves_figure(record: dict):
    """The figure for one train.json record (a dict with ``cell``, ``history`` and ``selection``)."""
    plt = pyplot()
    history = record.get("history") or []
    if not history:
        fig = plt.figure(figsize=(9, 3.4))
        fig.suptitle(record.get("cell", "?"), fontsize=10)
        fig.text(0.5, 0.5, record.get("missing", "no training history (pretrained weights)"), ha="center",
                 va="center")
        return fig
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(9, 3.4), layout="constrained")
    fig.suptitle(record.get("cell", "?"), fontsize=10)
    epochs = [h["epoch"] for h in history]
    for key in _loss_keys(history):
        loss_ax.plot(epochs, [h[key] for h in history], marker="o", ms=3, label=key[len("loss_"):])
    values = [h[k] for h in history for k in _loss_keys(history)]
    if values and min(values) > 0:  # the parts differ by orders of magnitude (the RPAT term is small)
        loss_ax.set_yscale("log")
    loss_ax.set(xlabel="epoch", ylabel="training loss (mean per example)")
    loss_ax.legend(fontsize=7)
    for key, label in (("val_clean", "clean"), ("val_pgd", "PGD")):
        acc_ax.plot(epochs, [h.get(key, float("nan")) for h in history], marker="o", ms=3, label=label)
    best = (record.get("selection") or {}).get("best_epoch")
    if best:
        acc_ax.axvline(best, color="grey", ls=":", lw=1, label=f"selected (epoch {best})")
    split = (record.get("selection") or {}).get("split", "val")
    acc_ax.set(xlabel="epoch", ylabel=f"{split} accuracy (%)")
    acc_ax.legend(fontsize=7)
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


def write_curves(record: dict, path: Path) -> list[Path]:
    fig = curves_figure(record)
    files.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    pyplot().close(fig)
    return [path]


def write_all(eval_files: list[Path], out_dir: str | Path) -> list[Path]:
    """The curves of every cell whose eval.json is given (its train.json lies beside it)."""
    written = []
    for f in eval_files:
        path = CellFiles.beside(f).train_record
        if path.is_file():
            record = files.read_record(path, ("cell", "history"))
        else:
            cell = files.read_record(f, ("cell",))["cell"]
            record = {"cell": cell, "history": [], "missing": f"no train.json beside {f}"}
        written += write_curves(record, figure_path(out_dir, record["cell"]))
    return written
