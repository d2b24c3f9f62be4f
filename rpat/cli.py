"""``rpat train | evaluate | report | info | init-tracking``: every pipeline job, runnable by hand.

Examples::

    rpat train    --config config/config.yaml --cell digits/cnn/linf/trades+rpat/seed0
    rpat evaluate --config config/config.yaml --cell digits/cnn/linf/trades+rpat/seed0
    rpat report   --config config/config.yaml
    rpat info --json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _load(args):
    from rpat import config

    cfg = config.load(args.config)
    cell = None
    if getattr(args, "cell", None):
        cell = config.Cell.parse(args.cell)
        if cell not in cfg.cells():
            raise config.ConfigError(f"cell {cell.id} is not in the grid of {cfg.source}; "
                                     f"cells: {', '.join(c.id for c in cfg.cells()[:8])}"
                                     f"{' ...' if len(cfg.cells()) > 8 else ''}")
    return cfg, cell


def _run_dir(cfg, cell, given):
    return Path(given) if given else Path(cfg.results_dir) / "runs" / cell.id


def cmd_train(args) -> int:
    from rpat.train import Preempted, train_cell

    cfg, cell = _load(args)
    try:
        train_cell(cfg, cell, _run_dir(cfg, cell, args.out), threads=args.threads)
    except Preempted as e:
        print(f"rpat train: {e}", file=sys.stderr)
        return Preempted.exit_code
    return 0


def cmd_evaluate(args) -> int:
    from rpat.evaluate import evaluate_cell

    cfg, cell = _load(args)
    res = evaluate_cell(cfg, cell, _run_dir(cfg, cell, args.out), threads=args.threads)
    print(json.dumps({k: res[k] for k in ("cell", "clean", "pgd20", "cw", "aa", "mean", "nrr")}))
    return 0


def cmd_report(args) -> int:
    from rpat.report import write_report

    cfg, _ = _load(args)
    paths = write_report(cfg, eval_files=args.inputs or None, out_dir=args.out)
    for p in paths:
        print(p)
    return 0


def cmd_prepare_data(args) -> int:
    from rpat import data, runtime
    from rpat.errors import UnknownName

    cfg, _ = _load(args)
    cells = [c for c in cfg.cells() if c.dataset == args.dataset]
    if not cells:
        raise UnknownName(f"no cell of {cfg.source} uses dataset {args.dataset!r}")
    summary = data.prepare(args.dataset, cfg.resolve(cells[0])["data"])
    print(json.dumps(summary))
    if args.out:
        runtime.write_json(args.out, summary)
    return 0


def cmd_init_tracking(args) -> int:
    from rpat import tracking

    cfg, _ = _load(args)
    if cfg.tracking["enabled"]:
        uri = tracking.tracking_uri(cfg.tracking["uri"])
        exp = tracking.init_store(uri, cfg.experiment)
        print(f"MLflow store {uri}, experiment {cfg.experiment!r} (id {exp})")
    return 0


def cmd_sync_tracking(args) -> int:
    from rpat import tracking

    cfg, _ = _load(args)
    added = tracking.reconcile(cfg, Path(cfg.results_dir) / "runs")
    print(f"MLflow reconciled with the JSON results: added {added['runs']} runs, "
          f"{added['metric_points']} metric points, {added['artifacts']} artifacts")
    return 0


def info() -> dict:
    from rpat import attacks, data, models, objectives, schedules

    model_rows = []
    for name, spec in sorted(models.MODELS.items()):
        net = spec.builder(num_classes=10, in_channels=3, image_size=32)
        model_rows.append({"name": name, "description": spec.description,
                           "params_10_classes": models.param_count(net),
                           "image_sizes": list(spec.image_sizes) if spec.image_sizes else "any"})
    return {
        "datasets": data.dataset_info(),
        "models": model_rows,
        "objectives": objectives.objective_info(),
        "attacks": {"norms": list(attacks.NORMS), "inner_losses": sorted(attacks.INNER_LOSSES),
                    "inits": list(attacks.INITS), "bn_modes": list(attacks.BN_MODES),
                    "evaluation": ["clean", "pgd20", "cw", "autoattack"]},
        "augmentations": sorted(data.AUGMENTATIONS),
        "schedules": list(schedules.SCHEDULES),
    }


def cmd_info(args) -> int:
    res = info()
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    for section in ("datasets", "models", "objectives"):
        print(f"{section}:")
        for row in res[section]:
            extra = f" ({row['params_10_classes']:,} params)" if "params_10_classes" in row else ""
            print(f"  {row['name']:<22}{extra} {row['description']}")
    print("attacks:", json.dumps(res["attacks"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rpat", description="RPAT experiment pipeline")
    sub = p.add_subparsers(dest="command", required=True)

    def job(name, fn, helptext, cell=True):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--config", nargs="+", default=["config/config.yaml"],
                       help="config file(s); later files override earlier ones")
        if cell:
            s.add_argument("--cell", required=True, help="dataset/model/norm/method[+rpat]/seedN")
            s.add_argument("--out", help="run directory (default <results_dir>/runs/<cell>)")
            s.add_argument("--threads", type=int, help="CPU threads for torch")
        s.set_defaults(fn=fn)
        return s

    job("train", cmd_train, "train one grid cell")
    job("evaluate", cmd_evaluate, "evaluate one trained cell: clean, PGD-20, CW, AutoAttack")
    r = job("report", cmd_report, "tables and plots from eval.json files", cell=False)
    r.add_argument("--inputs", nargs="*", help="eval.json files (default: those of the config's grid)")
    r.add_argument("--out", help="output directory (default <results_dir>)")
    d = job("prepare-data", cmd_prepare_data, "download / lay out / cache a dataset once", cell=False)
    d.add_argument("--dataset", required=True)
    d.add_argument("--out", help="write a summary JSON here (the workflow's marker)")
    job("init-tracking", cmd_init_tracking, "create the MLflow store and experiment once", cell=False)
    job("sync-tracking", cmd_sync_tracking, "add to MLflow whatever the JSON results hold and it lacks", cell=False)
    sub.add_parser("bench", help="speed and memory benchmarks (rpat bench --help)")
    i = sub.add_parser("info", help="registered datasets, models, objectives, attacks")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_info)

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own parser, so `rpat bench --help` shows its options
        from rpat.bench import main as bench_main

        return bench_main(argv[1:])
    args = p.parse_args(argv)
    from rpat.errors import UserError

    try:
        return args.fn(args)
    except (UserError, FileNotFoundError) as e:  # anything else is a bug: keep its traceback
        print(f"rpat {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
