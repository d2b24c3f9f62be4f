"""How large is the RPAT term next to the rest of the loss? Per-step loss parts of a short training run.

    python benchmarks/rpat_share.py --config config/config.yaml --cell digits/cnn/linf/pgd_at+rpat/seed0 --steps 200
    python benchmarks/rpat_share.py --config config/rpat_share_cifar10.yaml \
        --cell cifar10/resnet18/linf/pgd_at+rpat/seed0 --steps 40

Trains the cell exactly as ``rpat train`` does (same setup, attack, objective and step), for ``--steps`` steps,
and prints one JSON line per ``--every`` steps: the loss parts (CE, the baseline's regulariser, the RPAT term
unweighted and weighted by λ), the weighted term's share of the total loss, and the logit scale (mean absolute
clean logit), which the term grows with quadratically. A last line summarises the run (medians over its second half).
Nothing is written to the cell's directory or to MLflow.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from rpat import config, objectives, recipes, schedules
from rpat.train import setup, train_step


def run(cfg_path: list[str], cell_id: str, steps: int, every: int, threads: int | None) -> list[dict]:
    cfg = config.load(cfg_path)
    settings = cfg.settings(cfg.cell(cell_id))
    if settings.rpat is None:
        raise SystemExit(f"{cell_id} has RPAT off; give its +rpat cell")
    tr = setup(settings, threads)
    tr.model.train()
    rows, step, t0 = [], 0, time.time()
    while step < steps:
        for x, y in tr.batches:
            epoch = 1 + step // len(tr.batches)
            plan = recipes.epoch_plan(tr.objective, settings, epoch)
            awp = tr.awp if tr.awp is not None and tr.awp.active(epoch) else None
            lr = schedules.lr_at(settings.train.schedule, settings.train.lr, epoch,
                                 (step % len(tr.batches) + 1) / len(tr.batches), settings.train.epochs)
            for group in tr.opt.param_groups:
                group["lr"] = lr
            _, parts = train_step(tr.objective, tr.fmodel, tr.opt, x, y, plan, settings.method, settings.rpat,
                                  amp=tr.amp, average=tr.average, awp=awp)
            step += 1
            if step % every == 0 or step == steps:
                with torch.no_grad():
                    scale = float(tr.model(x).abs().mean())
                tr.model.train()
                row = {"step": step, **{k: float(v.detach()) for k, v in parts.items()}, "logit_scale": scale,
                       "seconds": time.time() - t0}
                row["rpat_share"] = row["rpat_weighted"] / row["total"] if row["total"] else float("nan")
                rows.append(row)
                print(json.dumps(row), flush=True)
            if step >= steps:
                break
    late = rows[len(rows) // 2:]
    summary = {"summary": cell_id, "steps": steps, "lambda": settings.rpat.weight,
               "eps": settings.threat.eps, "norm": settings.threat.norm,
               **{f"median_{k}": statistics.median(r[k] for r in late)
                  for k in ("total", "ce", "rpat", "rpat_weighted", "rpat_share", "logit_scale")}}
    print(json.dumps(summary), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", nargs="+", required=True)
    p.add_argument("--cell", required=True)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    run(args.config, args.cell, args.steps, args.every, args.threads)


if __name__ == "__main__":
    assert objectives.OBJECTIVES  # registries loaded
    main()
