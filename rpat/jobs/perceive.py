"""The perception job (`rpat perceive`): the paper's perception analysis of one cell's primary checkpoint.

On the evaluated examples (``rpat.jobs.evaluate.evaluated_examples``), with the model in eval mode:
- "noise": x' = x + u, u uniform in the eps-ball (Linf: each pixel in [-eps, eps], as the paper's analysis; L2:
  a uniformly random direction at a radius uniform in [0, eps]), clipped to [0, 1];
- "pgd20": x' = evaluation's PGD-20 example (``accuracy.pgd_examples``, ``eval.pgd_steps`` steps);
each with the motivation measurements (``perception.motivation``), and the path x -> x' (PGD-20's x') at
``eval.perception_alphas`` evenly spaced points (``perception.path_analysis``). Both perturbations draw their
randomness per block of ``eval.block_size`` examples from ``rpat.blocks.block_generator`` under the keys "noise"
and "pgd20", so x' is the example evaluation attacked, whatever the batch size or sharding.

It is a job of its own rather than a registered measurement: its results are logit distances and a path
profile, not a per-example correct/incorrect outcome, so they have no place among the accuracy columns, Mean/NRR
and ``test_<key>`` metrics that the measurement registry feeds; and a separate job adds the analysis to cells
already evaluated without rerunning AutoAttack.

Writes perception.json (summaries; NaN as null) and perception.npz (per-example values, in example order).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from rpat import accuracy, attacks, blocks, files, perception
from rpat.jobs.evaluate import EvaluationError, cell_run, examples_record, load_for, read_train_record
from rpat.settings import CellSettings

PERTURBATIONS = ("noise", "pgd20")
def perturb(model, x: torch.Tensor, y: torch.Tensor, settings: CellSettings, key: str) -> torch.Tensor:
    """x' for perturbation ``key`` ("noise" or "pgd20"), drawn block by block from the blocks' generators."""
    e, threat, device = settings.eval, settings.threat, x.device
    parts = []
    for b, r in enumerate(blocks.block_ranges(len(x), e.block_size)):
        g = blocks.block_generator(settings.cell.seed, key, b, device)
        xb, yb = x[r.start:r.stop], y[r.start:r.stop]
        if key == "noise":
            parts.append(attacks.random_start(xb, threat.eps, threat.norm, "ball", g))
        else:
            parts.append(accuracy.pgd_examples(model, xb, yb, threat, e.pgd_steps, generator=g))
    return torch.cat(parts)


def measure(model, x: torch.Tensor, y: torch.Tensor, settings: CellSettings) -> tuple[dict, dict]:
    """(summary, per_example) of the motivation measurements for both perturbations and of the path."""
    e = settings.eval
    alphas = perception.default_alphas(e.perception_alphas)
    summary, per_example, x_pert = {}, {}, {}
    for key in PERTURBATIONS:
        x_pert[key] = perturb(model, x, y, settings, key)
        m = perception.motivation(model, x, y, x_pert[key], batch_size=e.batch_size)
        pe = m.pop("per_example")
        summary[key] = m
        per_example[f"mse_{key}"], per_example[f"defended_{key}"] = pe["mse"], pe["defended"]
    path = perception.path_analysis(model, x, x_pert["pgd20"], alphas, batch_size=e.batch_size)
    summary["path"] = perception.summarize_path(path, alphas)
    per_example["path_mse"], per_example["nonlinearity"] = path["path_mse"], perception.nonlinearity(path["path_mse"])
    return summary, per_example


def tracked_metrics(summary: dict) -> dict:
    """What MLflow records: perception_nonlinearity, perception_mid_{clean,adv}, perception_<key>_acc and
    perception_mse_<key>_{all,success,failure}; undefined values (an empty group) are left out."""
    path = summary["path"]
    out = {"perception_nonlinearity": path["nonlinearity"], "perception_mid_clean": path["mid_clean"],
           "perception_mid_adv": path["mid_adv"]}
    for key in PERTURBATIONS:
        out[f"perception_{key}_acc"] = summary[key]["perturbed_acc"]
        out.update({f"perception_mse_{key}_{g}": summary[key]["mse"][g] for g in ("all", "success", "failure")})
    return {k: float(v) for k, v in out.items() if v is not None and not math.isnan(v)}


def nan_to_none(obj):
    """A JSON-able copy with every NaN float replaced by None (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {k: nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [nan_to_none(v) for v in obj]
    return None if isinstance(obj, float) and math.isnan(obj) else obj


def perceive(settings: CellSettings, record_path: str | Path, out_path: str | Path, *, tracking: dict,
             checkpoint_path: str | Path | None = None, threads: int | None = None) -> dict:
    """Measure one cell's primary checkpoint; write ``out_path`` (perception.json) and its .npz twin."""
    record_path, out_path = Path(record_path), Path(out_path)
    cell, e = settings.cell, settings.eval
    if out_path.suffix != ".json":
        raise EvaluationError(f"--out {out_path}: give a .json path (perception.npz is written beside it)")
    record = read_train_record(record_path)
    name = e.checkpoints[0]
    _, model, ckpt, device, (x, y, index) = load_for(settings, record, record_path, name, checkpoint_path, threads)

    t0 = time.time()
    summary, per_example = measure(model, x.to(device), y.to(device), settings)
    result = {"cell": cell.id, **cell.coordinates(), "experiment": settings.experiment, "checkpoint": name,
              "checkpoint_epoch": ckpt.get("epoch"), "examples": examples_record(settings, index),
              "eps": settings.threat.eps, "pgd_steps": e.pgd_steps, **summary}
    result["mlflow_metrics"] = tracked_metrics(summary)
    result.update({"wall_s": time.time() - t0, "device": str(device), "eval_fingerprint": settings.eval_fingerprint})
    arrays = {"index": index.to(torch.int64).numpy()}
    arrays.update({k: v.cpu().numpy() for k, v in per_example.items()})
    files.write_npz(out_path.with_suffix(".npz"), arrays)
    files.write_json(out_path, nan_to_none(result))

    with cell_run(settings, tracking, record.get("mlflow_run_id")) as run:  # re-opened, ended with this job
        if run is not None:
            run.log_metrics(result["mlflow_metrics"])
            run.log_artifact(out_path)
    return result
