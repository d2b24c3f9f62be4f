# Config loading and validation, grid -> cells, paths. Helpers only: no rules in this file.
import functools
import os
import shlex
import sys

from rpat import config as rpat_config
from rpat.catalog import catalog
from rpat.cells import PATTERN, Cell
from rpat.report import outputs as report_outputs
from rpat.report import training as training_curves
from rpat.processes import job_request
from rpat.settings import fingerprint
from rpat.tracking import init_store, runs_url, tracking_uri

# The default config applies only when no --configfile is given, so a second config replaces the
# demo instead of being merged into it.
if not workflow.overwrite_configfiles:
    workflow.configfile("config/config.yaml")

CONFIG_FILES = [os.path.relpath(p) if not os.path.relpath(p).startswith("..") else os.path.abspath(p)
                for p in workflow.configfiles]
try:
    CFG = rpat_config.load(CONFIG_FILES)
except rpat_config.ConfigError as err:
    raise WorkflowError(str(err)) from None
if rpat_config.parse_numbers(dict(config)) != CFG.raw:
    raise WorkflowError("--config overrides on the command line are not passed on to the jobs; "
                        "write the settings into a config file and give it with --configfile")

RESULTS = CFG.results_dir
RUNS = f"{RESULTS}/runs"
LOGS = f"{RESULTS}/logs"
CELL_DIR = f"{RUNS}/{PATTERN}"  # the one definition of a cell's directory (rpat/cells.py)
CELL_LOG = f"{PATTERN}.log"
CELLS = CFG.cells()
RPAT = f"{shlex.quote(sys.executable)} -m rpat"
CONFIG_ARG = " ".join(shlex.quote(p) for p in CONFIG_FILES)
DATASETS_ON_DISK = set(catalog()["datasets_on_disk"])
REPORT_OUTPUTS = [str(p) for p in report_outputs(CFG)]

wildcard_constraints:
    dataset="[^/]+",
    model="[^/]+",
    norm="[^/]+",
    method="[^/]+",
    seed="[0-9]+",
    tag="(-best|-last)?",
    which="best|last",
    shard="[0-9]+",
    shards="[0-9]+",


def cell_of(wildcards):
    return Cell.from_wildcards(wildcards)


@functools.cache
def _settings(cell):
    return CFG.settings(cell)


def settings_of(wildcards):
    """A cell's typed settings, resolved once per cell (every rule asks for several parts of them)."""
    return _settings(cell_of(wildcards))


def cell_id(wildcards):
    return cell_of(wildcards).id


def cell_paths(filename):
    return [f"{RUNS}/{cell.id}/{filename}" for cell in CELLS]


def train_fingerprint(wildcards):
    return settings_of(wildcards).train_fingerprint


def eval_fingerprint(wildcards):
    return settings_of(wildcards).eval_fingerprint


def curve_fingerprint(wildcards):
    return settings_of(wildcards).curve_fingerprint


def cell_curves():
    """curve.json of every cell with an eval.eps_grid (none by default)."""
    return [f"{RUNS}/{cell.id}/curve.json" for cell in CELLS if _settings(cell).eval.eps_grid]


def perception_fingerprint(wildcards):
    """What `rpat perceive` depends on: the cell's training and the eval keys it reads (not AutoAttack's, CW's or
    the robustness curve's)."""
    s = settings_of(wildcards)
    used = {k: v for k, v in s.resolved["eval"].items() if k not in ("autoattack", "cw_steps", "eps_grid")}
    return fingerprint({"eval": used, "train": s.train_fingerprint})


def primary_checkpoint(wildcards):
    """The checkpoint file perception analyses: the first of eval.checkpoints."""
    return f"{CELL_DIR.format(**wildcards)}/checkpoint-{settings_of(wildcards).eval.checkpoints[0]}.pt"


def run_dir_of(wildcards, output):
    return os.path.dirname(output.record)


def checkpoint_of_tag(wildcards):
    """eval.json is the first of eval.checkpoints; eval-<c>.json is checkpoint c."""
    return wildcards.tag[1:] if wildcards.tag else settings_of(wildcards).eval.checkpoints[0]


def evaluation_tag(settings, which):
    return "" if which == settings.eval.checkpoints[0] else f"-{which}"


def cell_evaluations():
    """Every cell's eval*.json, one per checkpoint of eval.checkpoints."""
    return [f"{RUNS}/{cell.id}/eval{evaluation_tag(_settings(cell), c)}.json"
            for cell in CELLS for c in _settings(cell).eval.checkpoints]


def other_evaluations():
    """Every cell's eval-<c>.json for the checkpoints after the first of eval.checkpoints (the report reads them)."""
    return [f"{RUNS}/{cell.id}/eval-{c}.json" for cell in CELLS for c in _settings(cell).eval.checkpoints[1:]]


def evaluation_inputs(wildcards):
    """Unsharded: train.json and the checkpoint; sharded: the shard jobs' results."""
    which, shards = checkpoint_of_tag(wildcards), settings_of(wildcards).eval.shards
    cell_dir = CELL_DIR.format(**wildcards)
    if shards == 1:
        return {"record": f"{cell_dir}/train.json", "checkpoint": f"{cell_dir}/checkpoint-{which}.pt"}
    stem = f"{cell_dir}/eval-shards/{which}"
    return {"shards": [f"{stem}-{i}of{shards}.json" for i in range(1, shards + 1)],
            "shard_outcomes": [f"{stem}-{i}of{shards}.npz" for i in range(1, shards + 1)]}


def evaluation_source(wildcards, input):
    """The evaluate command's inputs: evaluate the checkpoint, or merge the shard results."""
    if "shards" in input.keys():
        return "--merge " + " ".join(shlex.quote(p) for p in input.shards)
    return f"--record {shlex.quote(input.record)} --checkpoint {shlex.quote(input.checkpoint)}"


def evaluation_gpus(wildcards):
    """A merge needs no GPU."""
    return gpus_of(wildcards) if settings_of(wildcards).eval.shards == 1 else 0


def data_options_of(wildcards):
    cells = [c for c in CELLS if c.dataset == wildcards.dataset]
    return fingerprint(_settings(cells[0]).data.options())


def prepared_data(wildcards):
    """The prepare_data marker, for data sets on disk (none for bundled ones)."""
    if wildcards.dataset in DATASETS_ON_DISK:
        return [f"{RESULTS}/data/{wildcards.dataset}.json"]
    return []


def threads_of(wildcards):
    return settings_of(wildcards).resources["cpus"]


def training_request(wildcards):
    """What a training job asks for: its cell's resources, with several processes as Slurm tasks (rpat/launch.py)."""
    return job_request(settings_of(wildcards).resources)


def training(key):
    return lambda wildcards: training_request(wildcards)[key]


def gpus_of(wildcards):
    return settings_of(wildcards).resources["gpu"]


def mem_mb_of(wildcards, attempt):
    return settings_of(wildcards).resources["mem_mb"] * attempt


def runtime_of(wildcards, attempt):
    return settings_of(wildcards).resources["runtime"] * attempt


# Snakemake's HTML report (snakemake --report): captions are relative to workflow/rules/report.smk.
CAPTIONS = "../report"
TABLES, FIGURES = "Tables", "Figures"
FIGURE_GROUPS = {"tradeoff": "trade-off", "curves": "robustness curves", "perception": "perception",
                 "path": "perception"}


def report_entry(path):
    """``path`` flagged for Snakemake's HTML report (caption, category, subcategory, labels), or as it is
    (the Markdown and LaTeX tables and the PDF twins of the figures are outputs, not report pages: the report
    shows each table set's HTML page and offers its CSV)."""
    name, ext = os.path.splitext(os.path.basename(path))
    if path in TRAINING_CURVES:
        cell = TRAINING_CURVES[path]
        return report(path, caption=f"{CAPTIONS}/training.rst",
                      category=f"Training curves: {cell.dataset} / {cell.model}", subcategory=cell.norm,
                      labels={"method": cell.method_label, "seed": str(cell.seed)})
    if ext in (".md", ".tex", ".pdf"):
        return path
    if name == "comparison":
        return report(path, caption=f"{CAPTIONS}/comparison.rst", category=TABLES, subcategory="comparison",
                      labels={"format": ext[1:]})
    if os.path.basename(os.path.dirname(path)) == "tables":
        return report(path, caption=f"{CAPTIONS}/summary.rst", category=TABLES, subcategory=name,
                      labels={"format": ext[1:]})
    return report(path, caption=f"{CAPTIONS}/{name}.rst", category=FIGURES, subcategory=FIGURE_GROUPS[name],
                  labels={"figure": name})


TRAINING_CURVES = {str(training_curves.figure_path(RESULTS, c.id)): c for c in CELLS}


onstart:
    # Create the MLflow schema and experiment once, before the jobs fan out.
    if CFG.tracking["enabled"]:
        experiment_id = init_store(tracking_uri(CFG.tracking["uri"]), CFG.experiment)
        if experiment_id is not None:
            print(f"MLflow: the runs of {CFG.experiment!r} at {runs_url(experiment_id)} (start `mlflow ui` first: "
                  "README, Browsing runs in MLflow)")
