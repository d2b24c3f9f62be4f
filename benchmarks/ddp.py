"""Data-parallel training speed: steps per second of one cell on 1 and on N processes, and their ratio.

    python benchmarks/ddp.py                                  # digits, this machine's CPUs: 1 and 2 processes
    python benchmarks/ddp.py --model resnet18 --train-subset 512   # a heavier model on the same digits
    python benchmarks/ddp.py --processes 1 4 --config benchmarks/cifar10_paper.yaml my-paths.yaml \\
        --cell cifar10/resnet18/linf/pgd_at+rpat/seed0 --epochs 1 --train-subset 10240   # 4 GPUs

Each run is a real ``rpat train --processes N`` (rpat/launch.py) with ``train.step_log`` on; the rate is read
from the steps' timestamps within each epoch (process start, data loading and validation excluded), the first
epoch's first steps too (warm-up). Every run has the same global batch, so the runs compute the same training
(tests/test_distributed.py) and only the time differs. Prints one JSON line per run and one with the ratios.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from rpat.cells import CellFiles

ROOT = Path(__file__).resolve().parents[1]

DIGITS = {
    "experiment": "bench-ddp",
    "tracking": {"enabled": False},
    "data": {"batch_size": 128, "train_subset": 1024, "val_size": 100},
    "train": {"val_attack_steps": 1},
    "grid": [{"dataset": ["digits"], "model": ["cnn"], "norm": ["linf"], "method": ["pgd_at"], "rpat": [True],
              "seed": [0]}],
}
WARMUP_STEPS = 2


def steps_per_second(steps_file: Path) -> tuple[float, int]:
    """Steps per second over every epoch's consecutive steps, the first WARMUP_STEPS of the run left out."""
    lines = [json.loads(s) for s in steps_file.read_text().splitlines()][WARMUP_STEPS:]
    seconds, counted = 0.0, 0
    for a, b in zip(lines, lines[1:]):
        if a["epoch"] == b["epoch"]:
            seconds += b["time"] - a["time"]
            counted += 1
    return counted / seconds, counted


def run(configs: list[str], cell: str, processes: int, threads: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "rpat", "train", "--config", *configs, "--cell", cell, "--out", str(out),
           "--processes", str(processes), "--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"benchmarks/ddp.py: {' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    rate, counted = steps_per_second(CellFiles(out).step_log)
    history = json.loads((out / "train.json").read_text())["history"]
    line = {"name": "ddp_steps_per_s", "processes": processes, "value": rate, "unit": "steps/s", "steps": counted,
            "cell": cell, "device": json.loads((out / "train.json").read_text())["device"]}
    if "max_gpu_mb" in history[-1]:
        line["max_gpu_mb_per_process"] = max(h["max_gpu_mb"] for h in history)
    return line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", nargs="+", help="config file(s) (default: digits, PGD-AT+RPAT, batch 128)")
    p.add_argument("--cell", help="the cell to train (default: the digits cell of --model)")
    p.add_argument("--model", default="cnn", help="the default config's model (e.g. resnet18)")
    p.add_argument("--processes", nargs="+", type=int, default=[1, 2])
    p.add_argument("--threads-per-process", type=int, default=1,
                   help="CPU threads of each process (one process gets as many as each of N: the same work per core)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-subset", type=int, help="train on this many images (data.train_subset)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        digits = {**DIGITS, "grid": [{**DIGITS["grid"][0], "model": [args.model]}]}
        configs = args.config or [str(_write(tmp / "digits.yaml", digits))]
        cell = args.cell or f"digits/{args.model}/linf/pgd_at+rpat/seed0"
        override = {"train": {"epochs": args.epochs, "step_log": True}, "results_dir": str(tmp / "results")}
        if args.train_subset:
            override["data"] = {"train_subset": args.train_subset}
        configs = [*configs, str(_write(tmp / "override.yaml", override))]
        lines = [run(configs, cell, n, n * args.threads_per_process, tmp / f"p{n}") for n in args.processes]
    for line in lines:
        print(json.dumps(line))
    base = lines[0]["value"]
    print(json.dumps({"name": "ddp_speedup", "unit": "ratio", "cell": lines[0]["cell"],
                      "value": {str(x["processes"]): x["value"] / base for x in lines}}))
    return 0


def _write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


if __name__ == "__main__":
    sys.exit(main())
