"""Seconds per epoch of PreActResNet-18 PGD-10 + RPAT on CIFAR-10, float32 vs bf16 + channels_last
(data on the device in both), and clean / PGD-20 accuracy after a short run in each precision.

    python benchmarks/cifar_epoch.py --cifar10 PATH [--epochs 1] [--accuracy-epochs 5] [--subset N]

PATH holds torchvision's CIFAR-10 files or train/<class>/ + test/<class>/ image folders. Prints JSON lines.
Meant for a GPU; runs on CPU too (use --subset for a smoke test).
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from rpat import config, train
from rpat.jobs import evaluate


def run(args, precision: str, channels_last: bool, epochs: int, out: Path) -> dict:
    cfg = config.from_dict({
        "experiment": "cifar-epoch-bench",
        "tracking": {"enabled": False},
        "grid": [{"dataset": ["cifar10"], "model": ["preact_resnet18"], "norm": ["linf"], "method": ["pgd_at"],
                  "rpat": [True], "seed": [0]}],
        "data": {"paths": {"cifar10": args.cifar10}, "train_subset": args.subset, "val_size": 1000,
                 "batch_size": 128, "augment": "crop_flip"},
        "train": {"epochs": epochs, "schedule": {"name": "constant"}, "precision": precision,
                  "channels_last": channels_last, "val_attack_steps": 10},
        "eval": {"n_examples": args.eval_examples, "pgd_steps": 20, "cw_steps": 1, "autoattack": {"enabled": False}},
    })
    cell = cfg.cells()[0]
    t0 = time.perf_counter()
    rec = train.train_cell(cfg, cell, out)
    wall = time.perf_counter() - t0
    res = evaluate.evaluate_cell(cfg, cell, out)
    return {"precision": precision, "channels_last": channels_last, "epochs": epochs,
            "epoch_s": [h["epoch_s"] for h in rec["history"]], "train_wall_s": wall,
            "clean": res["clean"], "pgd20": res["pgd20"], "n_examples": res["n_examples"],
            "device": rec["device"], "peak_device_mb": (torch.cuda.max_memory_allocated() / 2**20
                                                        if torch.cuda.is_available() else None)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cifar10", required=True)
    p.add_argument("--epochs", type=int, default=2, help="epochs timed per setting (the first includes warm-up)")
    p.add_argument("--accuracy-epochs", type=int, default=0, help="also train this long per precision and compare")
    p.add_argument("--subset", type=int, default=None)
    p.add_argument("--eval-examples", type=int, default=1000)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for i, (precision, cl) in enumerate([("float32", False), ("bf16", True)]):
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            print(json.dumps({"name": "cifar10_epoch", **run(args, precision, cl, args.epochs, Path(tmp) / f"t{i}")}),
                  flush=True)
        if args.accuracy_epochs:
            for i, (precision, cl) in enumerate([("float32", False), ("bf16", True)]):
                print(json.dumps({"name": "cifar10_short_run_accuracy",
                                  **run(args, precision, cl, args.accuracy_epochs, Path(tmp) / f"a{i}")}), flush=True)


if __name__ == "__main__":
    main()
