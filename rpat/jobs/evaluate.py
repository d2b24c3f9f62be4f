"""The evaluation job: the registered measurements (rpat/evaluation/measurements.py) run on a cell's checkpoints.

All measurements use the same test examples (:func:`evaluated_examples`), cut into fixed blocks of
``eval.block_size``; a measurement's randomness on a block comes from the block's own generator, so the
per-example outcomes do not depend on sharding (``eval.shards``), on resuming a killed job, or on the batch size
(docs/evaluation.md). Each of ``eval.checkpoints`` is evaluated with the norm and eps the cell was trained for,
in eval mode; the first writes ``eval.json`` and ``outcomes.npz``, another ``c`` writes ``eval-<c>.json`` and
``outcomes-<c>.npz`` (the names are :class:`rpat.cells.CellFiles`'). The checkpoint must belong to the cell: its
model, its number of classes and the training fingerprint recorded in its training record are checked before
any work.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from rpat import autoattack, blocks, checkpoint, data, files, models, runtime
from rpat.cells import Cell, CellFiles
from rpat.config import Config
from rpat.errors import UserError
from rpat.evaluation import engine, results
from rpat.evaluation.measurements import MEASUREMENTS, Measurement, derive, tracked_metrics
from rpat.evaluation.progress import Progress
from rpat.preemption import StopSignals
from rpat.settings import CellSettings
from rpat.tracking import CellRun

__all__ = ["EvaluationError", "evaluate", "evaluate_cell", "evaluated_examples", "merge"]


class EvaluationError(UserError, RuntimeError):
    """The evaluation's inputs do not belong together (checkpoint, train.json, cell, shard results)."""


def evaluated_examples(settings: CellSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The test examples every measurement (and the perception analysis) uses: ``eval.n_examples`` drawn by
    ``eval.subset`` (a seeded, class-stratified draw by default) with ``eval.subset_seed``; float images in [0, 1],
    labels, and their sorted indices in the test set."""
    e = settings.eval
    x, y = data.load_splits(settings.cell.dataset, settings.data.options()).test
    index = data.eval_subset(y, e.n_examples, e.subset, e.subset_seed)
    return data.to_float(x[index]), y[index], index


def examples_record(settings: CellSettings, index: torch.Tensor) -> dict:
    """What eval.json records of the evaluated examples (the digest pairs cells evaluated on the same ones)."""
    return {"subset": settings.eval.subset, "seed": settings.eval.subset_seed, "n": len(index),
            "digest": results.index_digest(index.cpu().numpy())}


def load_model(path: str | Path, device) -> tuple[torch.nn.Module, dict]:
    ckpt = checkpoint.load(path, map_location=device)
    model = models.build_from_meta(ckpt)
    checkpoint.load_weights(model, ckpt["model"], path)
    return model.to(device).eval(), ckpt


def check_belongs(settings: CellSettings, record: dict, record_path: Path, ckpt: dict, ckpt_path: Path) -> None:
    """Refuse a train.json or checkpoint that is not this cell's, or was trained with other settings."""
    cell = settings.cell
    if record.get("cell") != cell.id:
        raise EvaluationError(f"{record_path} belongs to cell {record.get('cell')!r}, not {cell.id}; evaluate it "
                              "with its own cell, or retrain this cell")
    if record.get("fingerprint") != settings.train_fingerprint:
        raise EvaluationError(f"{record_path} was trained with other training settings than the config gives "
                              f"{cell.id}; rerun its training (snakemake does) or restore the config it was trained with")
    if ckpt.get("model_name") != cell.model or ckpt.get("fingerprint") != record["fingerprint"]:
        raise EvaluationError(f"checkpoint {ckpt_path} is not the one cell {cell.id} trained (model "
                              f"{ckpt.get('model_name')!r}, fingerprint {ckpt.get('fingerprint')!r}; expected model "
                              f"{cell.model!r}, fingerprint {record['fingerprint']!r}); rerun the cell's training")


def read_train_record(path: Path) -> dict:
    if not path.is_file():
        raise EvaluationError(f"{path} does not exist: the cell has not been trained; run its training first "
                              "(snakemake does, or `rpat train` by hand)")
    return files.read_record(path, ("cell", "fingerprint", "checkpoints", "selection"))


def _checkpoint_path(record: dict, record_path: Path, which: str) -> Path:
    if which not in record["checkpoints"]:
        raise EvaluationError(f"{record_path} lists no {which!r} checkpoint (it has {', '.join(record['checkpoints'])})"
                              "; set eval.checkpoints to some of those")
    return record_path.parent / record["checkpoints"][which]


def result_header(settings: CellSettings, record: dict, which: str, ckpt: dict,
                  index: torch.Tensor) -> dict:
    """What every part of one checkpoint's evaluation records alike (shards included)."""
    cell, e = settings.cell, settings.eval
    return {"cell": cell.id, **cell.tags(), "rpat": cell.rpat, "seed": cell.seed, "experiment": settings.experiment,
            "checkpoint": which, "checkpoint_epoch": ckpt["epoch"], "selection": record["selection"],
            "n_examples": len(index), "examples": examples_record(settings, index), "norm": cell.norm,
            "eps": settings.threat.eps, "pgd_steps": e.pgd_steps, "pgd_step_size": settings.threat.step,
            "cw_steps": e.cw_steps, "block_size": e.block_size, "aa_package": autoattack.package_version(),
            "eval_fingerprint": settings.eval_fingerprint}


def measure_blocks(settings: CellSettings, model, examples, key: dict, state_path: Path, shard: tuple[int, int],
                   device, measurements: list[Measurement] | None = None) -> tuple[dict, dict, Progress]:
    """Run this job's blocks of ``measurements`` (default: those enabled; resuming saved progress); its part of the
    outcomes."""
    x, y, index = examples
    e = settings.eval
    ranges = blocks.block_ranges(len(y), e.block_size)
    mine = blocks.shard_blocks(len(ranges), shard[1], shard[0] - 1)
    measurements = measurements or [m for m in MEASUREMENTS.values() if m.enabled(e)]
    with StopSignals() as stop:
        progress = Progress.open(state_path, {**key, "shard": shard[0]}, e.batch_size)
        engine.run(model, x.to(device), y.to(device), measurements=measurements, threat=settings.threat, settings=e,
                   seed=settings.cell.seed, block_ids=mine, progress=progress, stop=stop)
    stats, arrays = results.part(progress, [m.key for m in measurements], ranges, mine, index)
    stats["wall_s"] = sum(progress.data["seconds"].values())
    return stats, arrays, progress


def evaluate(settings: CellSettings, record_path: str | Path, out_path: str | Path, *, tracking: dict,
             checkpoint: str | None = None, checkpoint_path: str | Path | None = None,
             outcomes_path: str | Path | None = None, shard: tuple[int, int] | None = None,
             threads: int | None = None) -> dict:
    """Evaluate the ``checkpoint`` named in train.json (default: the first of ``eval.checkpoints``); write
    ``out_path`` (eval.json) and ``outcomes_path`` (default :meth:`CellFiles.outcomes_beside`). With ``shard=(i, N)``,
    N > 1, only shard i's blocks are evaluated into a shard result, which :func:`merge` combines with the others'.
    Progress is saved as it goes, and a rerun after a kill or a signal resumes it."""
    record_path, out_path = Path(record_path), Path(out_path)
    outcomes_path = Path(outcomes_path) if outcomes_path else CellFiles.outcomes_beside(out_path)
    cell, e = settings.cell, settings.eval
    which = checkpoint or e.checkpoints[0]
    i, n_shards = shard or (1, 1)
    if not 1 <= i <= n_shards:
        raise EvaluationError(f"shard {i} of {n_shards} does not exist; shards are numbered 1..{n_shards}")
    record = read_train_record(record_path)
    # the cell's MLflow run (re-opened; it ends FINISHED, KILLED or FAILED with this job); shards leave it to the merge
    with cell_run(settings, tracking, record.get("mlflow_run_id"), active=n_shards == 1) as run:
        ckpt_path, model, ckpt, device, (x, y, index) = load_for(settings, record, record_path, which,
                                                                 checkpoint_path, threads)
        header = result_header(settings, record, which, ckpt, index)
        # what makes parts (and saved progress) belong together; the device type too: CPU and CUDA generators differ
        key = {"eval_fingerprint": settings.eval_fingerprint, "checkpoint": which, "shards": n_shards,
               "checkpoint_digest": files.sha256(ckpt_path), "examples_digest": header["examples"]["digest"],
               "device_type": device.type}
        state = CellFiles.beside(record_path).evaluation_state(which, i, n_shards)
        stats, arrays, progress = measure_blocks(settings, model, (x, y, index), key, state, (i, n_shards),
                                                 device)
        stats.update(header=header, key=key, shard={"index": i, "of": n_shards}, device=str(device),
                     mlflow_run_id=record.get("mlflow_run_id"))
        if n_shards > 1:
            results.write_shard(out_path, stats, arrays, outcomes_path)
            result = stats
        else:
            result = _write_result(settings, [(stats, arrays)], out_path, outcomes_path, run)
    progress.remove()
    return result


def load_for(settings: CellSettings, record: dict, record_path: Path, which: str, checkpoint_path=None,
             threads: int | None = None):
    """What a job that measures a cell's checkpoint needs, set up alike for every such job (evaluation,
    perception): the checkpoint (checked to belong to the cell), the device, and the evaluated examples."""
    ckpt_path = Path(checkpoint_path) if checkpoint_path else _checkpoint_path(record, record_path, which)
    device = runtime.select_device(settings.train.device)
    runtime.set_threads(threads or settings.train.threads)
    runtime.seed_everything(settings.cell.seed)
    model, ckpt = load_model(ckpt_path, device)
    check_belongs(settings, record, record_path, ckpt, ckpt_path)
    return ckpt_path, model, ckpt, device, evaluated_examples(settings)


def cell_run(settings: CellSettings, tracking: dict, run_id: str | None, active: bool = True):
    """The cell's MLflow run as a context (see :class:`rpat.tracking.CellRun`); None when tracking is off."""
    if not (tracking["enabled"] and active):
        return contextlib.nullcontext()
    return CellRun(tracking["uri"], settings.experiment, settings.cell.tags(), run_id=run_id, name=settings.run_name)


def merge(settings: CellSettings, shard_paths: list[str | Path], out_path: str | Path, *, tracking: dict,
          outcomes_path: str | Path | None = None) -> dict:
    """Combine the shard results of one checkpoint's evaluation into ``out_path`` (eval.json) and its outcomes."""
    out_path = Path(out_path)
    parts = [results.read_shard(p) for p in shard_paths]
    for path, (stats, _) in zip(shard_paths, parts):
        if stats["header"].get("cell") != settings.cell.id:
            raise EvaluationError(f"{path} is a shard of cell {stats['header'].get('cell')!r}, not {settings.cell.id}")
        if stats["header"].get("eval_fingerprint") != settings.eval_fingerprint:
            raise EvaluationError(f"{path} was computed with other evaluation settings than the config gives "
                                  f"{settings.cell.id}; rerun its shard job (snakemake does)")
    with cell_run(settings, tracking, parts[0][0].get("mlflow_run_id")) as run:
        return _write_result(settings, parts, out_path, Path(outcomes_path) if outcomes_path else
                             CellFiles.outcomes_beside(out_path), run)


def _result(settings: CellSettings, header: dict, combined: dict) -> dict:
    """eval.json from the combined parts: accuracies, the measurements' summaries, derived metrics."""
    n = header["n_examples"]
    result = {**header, "seconds": {}, "extra_metrics": {}}
    for m in MEASUREMENTS.values():
        st = combined["measured"].get(m.key)
        if st is None:
            result[m.key] = None
            continue
        result[m.key] = 100.0 * st["correct"] / n if n else None
        result.update(st["details"])
        if m.summary:
            entries, metrics = m.summary(st["counts"], st["warnings"], n)
            result.update(entries)
            result["extra_metrics"].update(metrics)
        result["seconds"][m.key] = st["seconds"]
    result.update(derive(result))
    metrics = tracked_metrics(result)
    if header["checkpoint"] != settings.eval.checkpoints[0]:  # a second checkpoint: test_last_clean, ...
        metrics = {f"test_{header['checkpoint']}_{k[len('test_'):]}": v for k, v in metrics.items()}
    result["mlflow_metrics"] = metrics
    result.update({k: combined[k] for k in ("shards", "shard_wall_s", "batch_size", "batch_halvings", "sessions")})
    result["wall_s"] = sum(combined["shard_wall_s"])
    return result


def _write_result(settings: CellSettings, parts: list, out_path: Path, outcomes_path: Path, run) -> dict:
    header, combined, arrays = results.combine(parts)
    result = _result(settings, header, combined)
    result["device"] = ", ".join(dict.fromkeys(s["device"] for s, _ in parts))
    result["outcomes"] = os.path.relpath(outcomes_path, out_path.parent)
    results.write_outcomes(outcomes_path, arrays)
    files.write_json(out_path, result)
    if run is not None:
        run.log_metrics(result["mlflow_metrics"])
        run.log_dataset(settings.cell.dataset, "test", result["examples"]["digest"], result["examples"]["n"])
        run.log_artifact(out_path)
    return result


def evaluate_cell(cfg: Config, cell: Cell, run_dir: str | Path, *, threads: int | None = None) -> dict:
    """Evaluate every checkpoint of ``eval.checkpoints`` of ``cell`` from ``run_dir``'s train.json (unsharded):
    ``run_dir``/eval.json for the first (returned), eval-<name>.json for the others."""
    cell_files, settings = CellFiles(run_dir), cfg.settings(cell)
    primary, out = settings.eval.checkpoints[0], {}
    for which in settings.eval.checkpoints:
        out[which] = evaluate(settings, cell_files.train_record, cell_files.evaluation(which, primary),
                              tracking=cfg.tracking, checkpoint=which, threads=threads)
    return out[primary]
