"""Evaluation: clean accuracy, PGD-20, CW-inf (margin-loss PGD, 30 steps) and AutoAttack.

All metrics use the same test examples (the first ``eval.n_examples`` of the test split, or all of
it), the norm and eps the cell was trained for, and the model in eval mode. AutoAttack is the
official code (pyautoattack), standard version, fixed seed; its robust accuracy after each attack of
the ensemble and its sanity-check warnings are recorded.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from pathlib import Path

import torch

from rpat import attacks, checkpoint, data, models, runtime
from rpat.config import Config, fingerprint
from rpat.tracking import CellRun

AA_NORMS = {"linf": "Linf", "l2": "L2"}


@torch.no_grad()
def _count_correct(model, x, y) -> torch.Tensor:
    return (model(x).argmax(1) == y).sum()


def accuracies(model, batches, threat: dict, steps: int, loss: str = "ce", with_clean: bool = True) -> dict:
    """Clean and PGD accuracy (%) over ``batches``, model in eval mode; one host sync at the end.

    The PGD is the reference's evaluation adversary (advertorch: uniform random start, box clip before the
    L2 rescale)."""
    was_training = model.training
    model.eval()
    clean = torch.zeros((), dtype=torch.long, device=batches.y.device)
    robust = torch.zeros_like(clean)
    for x, y in batches:
        if with_clean:
            clean += _count_correct(model, x, y)
        x_adv = attacks.pgd(model, x, y, eps=threat["eps"], step=threat["step"], steps=steps, norm=threat["norm"],
                            loss=loss, init="uniform", bn="eval", box_first=True) if steps > 0 else x
        robust += _count_correct(model, x_adv, y)
    model.train(was_training)
    n = len(batches.y)
    return {"clean": 100.0 * float(clean) / n, "pgd": 100.0 * float(robust) / n}


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


_AFTER = re.compile(r"robust accuracy after ([A-Z0-9-]+): ([0-9.]+)%")


def run_autoattack(model, x: torch.Tensor, y: torch.Tensor, *, norm: str, eps: float, seed: int,
                   version: str = "standard", batch_size: int = 500, device=None) -> dict:
    """pyautoattack's ``run_standard_evaluation`` on (x, y): robust accuracy (%), after each attack too."""
    from pyautoattack import AutoAttack

    model.eval()
    adversary = AutoAttack(model, norm=AA_NORMS[norm], eps=eps, seed=seed, version=version,
                           device=device or x.device)
    capture = _Capture()
    logger = logging.getLogger("auto-attack")
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(capture)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    t0 = time.time()
    try:
        x_adv, y_adv = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
    finally:
        logger.removeHandler(capture)
        logger.setLevel(old_level)
        logger.propagate = old_propagate
    seconds = time.time() - t0
    per_attack = {}
    for r in capture.records:
        m = _AFTER.search(r.getMessage())
        if m:  # the log rounds to 0.01 %: recover the exact count (exact for up to 10,000 examples)
            per_attack[m[1].lower()] = 100.0 * round(float(m[2]) / 100.0 * len(y)) / len(y)
    robust = 100.0 * float((y_adv == y.to(y_adv.device)).sum()) / len(y)
    warnings = [r.getMessage() for r in capture.records if r.levelno >= logging.WARNING]
    return {"aa": robust, "per_attack": per_attack, "warnings": warnings, "seconds": seconds,
            "attacks": list(adversary.attacks_to_run)}


def load_model(path: str | Path, device) -> tuple[torch.nn.Module, dict]:
    ckpt = checkpoint.load(path, map_location=device)
    model = models.build(ckpt["model_name"], num_classes=ckpt["num_classes"], in_channels=ckpt["in_channels"],
                         image_size=ckpt["image_size"], mean=ckpt["mean"], std=ckpt["std"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


def evaluate_cell(cfg: Config, cell, run_dir: str | Path, *, threads: int | None = None) -> dict:
    run_dir = Path(run_dir)
    resolved = cfg.resolve(cell)
    ecfg = resolved["eval"]
    threat = {**resolved["threat"][cell.norm], "norm": cell.norm}
    device = runtime.select_device(resolved["train"]["device"])
    runtime.set_threads(threads or resolved["train"].get("threads"))
    runtime.seed_everything(cell.seed)
    train_record = runtime.read_json(run_dir / "train.json")
    ckpt_path = run_dir / train_record["checkpoints"][ecfg["checkpoint"]]
    model, ckpt = load_model(ckpt_path, device)

    splits = data.load_splits(cell.dataset, resolved["data"])
    x, y = splits.test
    n = min(len(y), ecfg["n_examples"] or len(y))
    x, y = data.to_float(x[:n]).to(device), y[:n].to(device)
    batches = data.Batches(x, y, ecfg["batch_size"], device=device)

    t0 = time.time()
    pgd = accuracies(model, batches, threat, steps=ecfg["pgd_steps"])
    t_pgd = time.time() - t0
    cw = accuracies(model, batches, threat, steps=ecfg["cw_steps"], loss="cw", with_clean=False)
    result = {
        "cell": cell.id, **cell.tags(), "rpat": cell.rpat, "seed": cell.seed, "experiment": cfg.experiment,
        "checkpoint": ecfg["checkpoint"], "checkpoint_epoch": ckpt["epoch"],
        "selection": train_record["selection"],
        "n_examples": n, "norm": cell.norm, "eps": threat["eps"],
        "clean": pgd["clean"], "pgd20": pgd["pgd"], "cw": cw["pgd"],
        "pgd_steps": ecfg["pgd_steps"], "pgd_step_size": threat["step"], "cw_steps": ecfg["cw_steps"],
    }
    aa_cfg = ecfg["autoattack"]
    if aa_cfg["enabled"]:
        aa = run_autoattack(model, x, y, norm=cell.norm, eps=threat["eps"], seed=aa_cfg["seed"],
                            version=aa_cfg["version"], batch_size=ecfg["batch_size"], device=device)
        result.update({"aa": aa["aa"], "aa_per_attack": aa["per_attack"], "aa_warnings": aa["warnings"],
                       "aa_seconds": aa["seconds"], "aa_version": aa_cfg["version"], "aa_seed": aa_cfg["seed"],
                       "aa_attacks": aa["attacks"]})
        for w in aa["warnings"]:
            print(f"[rpat] AutoAttack warning for {cell.id}: {w}", file=sys.stderr)
    else:
        result["aa"] = None
    result["mean"], result["nrr"] = summary_metrics(result["clean"], result["aa"])
    result["pgd_seconds"] = t_pgd
    result["wall_s"] = time.time() - t0
    result["device"] = str(device)
    result["eval_fingerprint"] = fingerprint({"eval": ecfg, "train": train_record["fingerprint"]})
    runtime.write_json(run_dir / "eval.json", result)

    run = CellRun(cfg.tracking["uri"], cfg.experiment, cell.tags(), run_id=train_record.get("mlflow_run_id"),
                  enabled=cfg.tracking["enabled"])
    metrics = {f"test_{k}": result[k] for k in ("clean", "pgd20", "cw", "aa", "mean", "nrr") if result[k] is not None}
    metrics.update({f"test_aa_after_{k}": v for k, v in result.get("aa_per_attack", {}).items()})
    run.log_metrics(metrics)
    run.log_artifact(run_dir / "eval.json")
    run.finish()
    return result


def summary_metrics(clean: float, aa: float | None) -> tuple[float | None, float | None]:
    """Mean = (Clean + AA)/2, NRR = 2 Clean AA / (Clean + AA) (0 when both are 0)."""
    if aa is None:
        return None, None
    mean = (clean + aa) / 2
    nrr = 2 * clean * aa / (clean + aa) if clean + aa > 0 else 0.0
    return mean, nrr
