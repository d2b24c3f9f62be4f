"""``rpat train | evaluate | curve | perceive | report | export | prepare-data | sync-tracking | status |
config-docs | info | bench``: every pipeline job, runnable by hand, and the tools around them. The workflow's
rules call the jobs with explicit input and output paths; by hand the paths default to the cell's files in its
run directory under ``<results_dir>`` (named by ``rpat.cells.CellFiles``).

Examples::

    rpat train    --config config/config.yaml --cell digits/cnn/linf/trades+rpat/seed0
    rpat evaluate --config config/config.yaml --cell digits/cnn/linf/trades+rpat/seed0
    rpat perceive --config config/config.yaml --cell digits/cnn/linf/trades+rpat/seed0
    rpat curve    --config config/recipes-digits.yaml --cell digits/cnn/linf/trades+rpat/seed0
    rpat report   --config config/config.yaml
    rpat status   --config config/config.yaml --watch
    rpat export   --config config/config.yaml --cell digits/cnn/linf/trades+rpat/seed0 --out export/
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
    cell = cfg.cell(args.cell) if getattr(args, "cell", None) else None
    return cfg, cell


def cmd_train(args) -> int:
    from rpat import processes
    from rpat.train import train

    cfg, cell = _load(args)
    out, settings = args.out or cfg.run_dir(cell), cfg.settings(cell)
    args.processes = args.processes or settings.resources["processes"]
    args.nodes = args.nodes or settings.resources["nodes"]
    if args.processes > 1 and not processes.world_from_env().distributed:
        return _launch_ranks(args, settings, out)
    train(settings, out, tracking=cfg.tracking, threads=args.threads)
    return 0


def _launch_ranks(args, settings, out) -> int:
    """``--processes N``: the same command as N ranks (rpat/launch.py), after the checks that need no data."""
    from rpat import launch, processes

    problems = processes.resource_problems({**settings.resources, "processes": args.processes, "nodes": args.nodes},
                                           settings.data.batch_size)
    if problems:
        raise processes.DistributedSetupError("; ".join(problems))
    worker = ["train", "--config", *args.config, "--cell", args.cell, "--out", str(out)]
    return launch.launch(worker, args.processes, args.nodes, threads=args.threads)


def cmd_evaluate(args) -> int:
    from rpat.jobs.evaluate import evaluate, merge

    cfg, cell = _load(args)
    settings, cell_files = cfg.settings(cell), cfg.files(cell)
    primary = settings.eval.checkpoints[0]
    which = args.which or primary
    out = args.out or cell_files.evaluation(which, primary)
    if args.merge:
        res = merge(settings, args.merge, out, tracking=cfg.tracking, outcomes_path=args.outcomes)
    else:
        res = evaluate(settings, args.record or cell_files.train_record, out, tracking=cfg.tracking, checkpoint=which,
                       checkpoint_path=args.checkpoint, outcomes_path=args.outcomes, shard=args.shard,
                       threads=args.threads)
    shard = res.get("shard", {"index": 1, "of": 1})
    print(json.dumps({"cell": cell.id, "checkpoint": which, "shard": f"{shard['index']}/{shard['of']}",
                      **res.get("mlflow_metrics", {})}))
    return 0


def cmd_curve(args) -> int:
    from rpat.jobs.curve import evaluate_curve

    cfg, cell = _load(args)
    cell_files = cfg.files(cell)
    res = evaluate_curve(cfg.settings(cell), args.record or cell_files.train_record, args.out or cell_files.curve,
                         outcomes_path=args.outcomes, checkpoint_path=args.checkpoint, threads=args.threads)
    print(json.dumps({"cell": cell.id, "clean": res["clean"],
                      "points": {f"{p['attack']}@{p['norm']}:{p['eps']:g}": p["accuracy"] for p in res["points"]}}))
    return 0


def _shard(text: str) -> tuple[int, int]:
    """``I/N`` -> (I, N), 1 <= I <= N."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not I/N (e.g. 2/4)") from None
    if not 1 <= i <= n:
        raise argparse.ArgumentTypeError(f"shard {text}: I must be in 1..N")
    return i, n


def cmd_perceive(args) -> int:
    from rpat.jobs.perceive import perceive

    cfg, cell = _load(args)
    cell_files = cfg.files(cell)
    res = perceive(cfg.settings(cell), args.record or cell_files.train_record, args.out or cell_files.perception,
                   tracking=cfg.tracking, checkpoint_path=args.checkpoint, threads=args.threads)
    print(json.dumps({"cell": res["cell"], **res["mlflow_metrics"]}))
    return 0


def cmd_report(args) -> int:
    from rpat.report import write_report

    cfg, _ = _load(args)
    for p in write_report(cfg, eval_files=args.inputs or None, out_dir=args.out):
        print(p)
    return 0


def cmd_prepare_data(args) -> int:
    from rpat import data, files

    cfg, _ = _load(args)
    summary = data.prepare(args.dataset, cfg.data_options(args.dataset))
    print(json.dumps(summary))
    if args.out:
        files.write_json(args.out, summary)
    return 0


def cmd_export(args) -> int:
    from rpat.export import export_cell

    cfg, cell = _load(args)
    fields = {"title": args.title, "link": args.link, "authors": args.authors, "venue": args.venue,
              "footnote": args.footnote, "reported": args.reported, "architecture": args.architecture}
    out = export_cell(cfg.run_dir(cell), args.out, args.checkpoint, name=args.name,
                      expected=(cell.id, cfg.settings(cell).train_fingerprint), additional_data=args.additional_data,
                      number_forward_passes=args.forward_passes, **{k: v for k, v in fields.items() if v is not None})
    print(json.dumps({"pt": out["pt"], "json": out["json"]}))
    return 0


def cmd_sync_tracking(args) -> int:
    from rpat.reconcile import reconcile

    cfg, _ = _load(args)
    added = reconcile(cfg)
    problems = added["problems"]
    for problem in problems:  # reported, not fatal: the other cells were reconciled
        print(f"rpat sync-tracking: skipped: {problem}", file=sys.stderr)
    skipped = f"; skipped {len(problems)} cell(s) with a malformed result file" if problems else ""
    print(f"MLflow reconciled with the JSON results: added {added['runs']} runs, "
          f"{added['metric_points']} metric points, {added['artifacts']} artifacts{skipped}")
    return 0


def cmd_status(args) -> int:
    import time

    from rpat import config, status

    cfg = config.load(args.config)
    while True:
        statuses = status.grid_status(cfg)
        if args.watch and sys.stdout.isatty():
            print("\033[2J\033[H", end="")  # clear the screen: the table replaces the previous one
        print(status.table(statuses))
        if not args.watch or status.finished(statuses):
            return 1 if any(s.state == "failed" for s in statuses) else 0
        print(f"(refreshing every {args.watch:g} s; Ctrl-C to stop)", flush=True)
        try:
            time.sleep(args.watch)
        except KeyboardInterrupt:
            return 0


def cmd_config_docs(args) -> int:
    from rpat import config_docs, files

    if args.check:
        if config_docs.stale(args.out):
            print(f"rpat config-docs: {args.out} is stale: run {config_docs.COMMAND}", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    files.write_text(args.out, config_docs.render())
    print(args.out)
    return 0


def info() -> dict:
    from rpat import attacks, data, models, objectives, schedules
    from rpat.evaluation.measurements import MEASUREMENTS

    model_rows = []
    for name, spec in sorted(models.MODELS.items()):
        net = spec.builder(num_classes=10, in_channels=3, image_size=32)
        model_rows.append({"name": name, "display": spec.display, "description": spec.description,
                           "params_10_classes": models.param_count(net),
                           "image_sizes": list(spec.image_sizes) if spec.image_sizes else "any"})
    return {
        "datasets": data.dataset_info(),
        "models": model_rows,
        "objectives": objectives.objective_info(),
        "attacks": {"norms": list(attacks.NORMS), "inner_losses": sorted(attacks.INNER_LOSSES),
                    "inits": list(attacks.INITS), "bn_modes": list(attacks.BN_MODES)},
        "measurements": [{"key": m.key, "header": m.header, "description": m.description}
                         for m in MEASUREMENTS.values()],
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
    print("measurements:", ", ".join(m["key"] for m in res["measurements"]))
    print("attacks:", json.dumps(res["attacks"]))
    return 0


def cmd_bench(argv: list[str]) -> int:
    """Benchmarks live in the project's benchmarks/ folder (one home for speed and memory numbers)."""
    import runpy

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"
    if not script.is_file():
        print(f"rpat bench: error: {script} not found: benchmarks run from a clone of the project "
              "(pip install -e .), not from an installed wheel", file=sys.stderr)
        return 2
    sys.argv = [str(script), *argv]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def _export(job) -> None:
    """`rpat export`: a leaderboard submission's files and the model-info fields it cannot derive."""
    x = job("export", cmd_export, "a finished cell's checkpoint and model-info JSON for a RobustBench leaderboard "
            "submission (docs/robustbench.md)", cell=False)
    x.add_argument("--cell", required=True, help="dataset/model/norm/method[+rpat]/seedN")
    x.add_argument("--checkpoint", choices=["best", "last"], default="best", help="one the cell's evaluation measured")
    x.add_argument("--out", required=True, help="directory for <name>.pt and <name>.json")
    x.add_argument("--name", help="file name without extension (default: from the cell id)")
    x.add_argument("--title", help="the model info's name: the paper's title (default: the cell id)")
    x.add_argument("--link", help="URL of the paper")
    x.add_argument("--authors")
    x.add_argument("--venue")
    x.add_argument("--reported", type=float, help="robust accuracy (%%) the paper reports (default: the AA measured)")
    x.add_argument("--footnote")
    x.add_argument("--architecture", help="leaderboard architecture string (default: from the cell's model)")
    x.add_argument("--additional-data", action="store_true", help="the model was trained with extra data")
    x.add_argument("--forward-passes", type=int, default=1, help="number_forward_passes (default 1)")


def _tools(sub, job) -> None:
    """The commands around the jobs: status, config-docs, bench, info."""
    st = job("status", cmd_status, "each cell of the grid: planned, training (epoch, validation accuracies, time "
             "left), evaluating, done or failed (with its log), read from the result files", cell=False)
    st.add_argument("--watch", nargs="?", type=float, const=10.0, metavar="SECONDS",
                    help="refresh every SECONDS (default 10) until every cell is done or failed")
    cd = sub.add_parser("config-docs", help="write config/README.md (every config key) from the schema and defaults")
    cd.add_argument("--out", default="config/README.md", help="the file to write (default config/README.md)")
    cd.add_argument("--check", action="store_true", help="only check that the file is up to date (exit 1 if not)")
    cd.set_defaults(fn=cmd_config_docs)
    sub.add_parser("bench", help="speed and memory benchmarks (rpat bench --help)")
    i = sub.add_parser("info", help="registered datasets, models, objectives, measurements")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_info)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rpat", description="RPAT experiment pipeline")
    sub = p.add_subparsers(dest="command", required=True)

    def job(name, fn, helptext, cell=True):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--config", nargs="+", default=["config/config.yaml"],
                       help="config file(s); later files override earlier ones")
        if cell:
            s.add_argument("--cell", required=True, help="dataset/model/norm/method[+rpat]/seedN")
            s.add_argument("--threads", type=int, help="CPU threads for torch")
        s.set_defaults(fn=fn)
        return s

    t = job("train", cmd_train, "train one grid cell")
    t.add_argument("--out", help="run directory (default: the cell's directory under results_dir)")
    t.add_argument("--processes", type=int, help="data-parallel processes, one per GPU (default: the cell's "
                   "resources.processes); the result does not depend on it (docs/distributed.md); --threads is then "
                   "shared by each machine's processes")
    t.add_argument("--nodes", type=int, help="machines the processes spread over, inside a Slurm job (default: the "
                   "cell's resources.nodes)")
    e = job("evaluate", cmd_evaluate, "evaluate one trained cell: every registered measurement")
    e.add_argument("--record", help="the cell's train.json (default: the one in its run directory)")
    e.add_argument("--which", choices=["best", "last"],
                   help="which checkpoint (default: the first of eval.checkpoints); names eval.json's 'checkpoint'")
    e.add_argument("--checkpoint", help="checkpoint file (default: the one train.json lists for --which)")
    e.add_argument("--out", help="result to write (default beside train.json: eval.json for the first of "
                   "eval.checkpoints, eval-<which>.json for another)")
    e.add_argument("--outcomes", help="per-example outcomes to write (default: eval*.json -> outcomes*.npz)")
    e.add_argument("--shard", type=_shard, metavar="I/N", help="evaluate only shard I of N (blocks I-1, I-1+N, ...) "
                   "into a shard result for --merge")
    e.add_argument("--merge", nargs="+", metavar="SHARD_JSON", help="combine these shard results into --out instead "
                   "of evaluating")
    c = job("curve", cmd_curve, "robustness curve of one trained cell: accuracy at every point of eval.eps_grid")
    c.add_argument("--record", help="the cell's train.json (default: the one in its run directory)")
    c.add_argument("--checkpoint", help="checkpoint file (default: the first of eval.checkpoints in train.json)")
    c.add_argument("--out", help="curve.json to write (default beside train.json)")
    c.add_argument("--outcomes", help="per-example outcomes to write (default: curve.npz beside --out)")
    pc = job("perceive", cmd_perceive, "perception analysis of one trained cell: logit MSE under noise and PGD-20, "
             "and along the path to PGD-20's example")
    pc.add_argument("--record", help="the cell's train.json (default: the one in its run directory)")
    pc.add_argument("--checkpoint", help="checkpoint to analyse (default: the primary one eval names in train.json)")
    pc.add_argument("--out", help="perception.json to write, perception.npz beside it (default beside train.json)")
    r = job("report", cmd_report, "tables and plots from eval.json files", cell=False)
    r.add_argument("--inputs", nargs="*", help="eval.json files (default: those of the config's grid)")
    r.add_argument("--out", help="output directory (default <results_dir>)")
    d = job("prepare-data", cmd_prepare_data, "download / lay out / cache a dataset once", cell=False)
    d.add_argument("--dataset", required=True)
    d.add_argument("--out", help="write a summary JSON here (the workflow's marker)")
    _export(job)
    job("sync-tracking", cmd_sync_tracking, "add to MLflow whatever the JSON results hold and it lacks", cell=False)
    _tools(sub, job)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own parser, so `rpat bench --help` shows its options
        return cmd_bench(argv[1:])
    args = _parser().parse_args(argv)
    from rpat.errors import UserError
    from rpat.preemption import Preempted

    from rpat.processes import world_from_env

    say = world_from_env().main  # of several ranks, one says why they stopped
    try:
        return args.fn(args)
    except Preempted as e:
        if say:
            print(f"rpat {args.command}: {e}", file=sys.stderr)
        return Preempted.exit_code
    except (UserError, FileNotFoundError) as e:  # anything else is a bug: keep its traceback
        if say:
            print(f"rpat {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
