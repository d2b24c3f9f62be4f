# Config loading and validation, grid -> cells, paths. Helpers only: no rules in this file.
import os
import shlex
import sys

from rpat import config as rpat_config
from rpat.catalog import catalog
from rpat.cells import PATTERN, Cell, CellFiles
from rpat.processes import job_request
from rpat.report import outputs as report_outputs
from rpat.report.pages import report_pages
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
LOGS = f"{RESULTS}/logs"
CELL = CellFiles.pattern(RESULTS)  # every file of a cell, as patterns of PATTERN's wildcards (rpat/cells.py)
CELLS = CFG.cells()
RPAT = f"{shlex.quote(sys.executable)} -m rpat"
CONFIG_ARG = " ".join(shlex.quote(p) for p in CONFIG_FILES)
DATASETS_ON_DISK = set(catalog()["datasets_on_disk"])
REPORT_OUTPUTS = [str(p) for p in report_outputs(CFG)]
REPORT_PAGES = {str(p): page for p, page in report_pages(CFG).items()}

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


def settings_of(wildcards):
    """A cell's typed settings (the config resolves them once per cell; every rule asks for several parts)."""
    return CFG.settings(cell_of(wildcards))


def files_of(wildcards):
    return CFG.files(cell_of(wildcards))


def primary_of(cell):
    return CFG.settings(cell).eval.checkpoints[0]


def cell_id(wildcards):
    return cell_of(wildcards).id


# What a rule of one cell's job passes to the `rpat` CLI and asks of the scheduler (its fingerprint param makes
# Snakemake rerun the job when the settings it depends on change).
CELL_JOB_PARAMS = {"rpat": RPAT, "configs": CONFIG_ARG, "cell": cell_id}


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


def cell_resources(gpu=gpus_of):
    return {"gpu": gpu, "mem_mb": mem_mb_of, "runtime": runtime_of}


def train_fingerprint(wildcards):
    return settings_of(wildcards).train_fingerprint


def eval_fingerprint(wildcards):
    return settings_of(wildcards).eval_fingerprint


def curve_fingerprint(wildcards):
    return settings_of(wildcards).curve_fingerprint


def perception_fingerprint(wildcards):
    return settings_of(wildcards).perception_fingerprint


def primary_checkpoint(wildcards):
    """The checkpoint file perception and the robustness curve analyse: the first of eval.checkpoints."""
    return str(files_of(wildcards).checkpoint(settings_of(wildcards).eval.checkpoints[0]))


def run_dir_of(wildcards, output):
    return str(CellFiles.beside(output.record).run)


def checkpoint_of_tag(wildcards):
    """Which checkpoint an evaluation's file tag names (rpat/cells.py, CellFiles)."""
    return CellFiles.checkpoint_of_tag(wildcards.tag, settings_of(wildcards).eval.checkpoints[0])


def cell_paths(what):
    """``what(files, cell)`` of every cell, e.g. its training record."""
    return [str(what(CFG.files(cell), cell)) for cell in CELLS]


def cell_evaluations():
    """Every cell's evaluation of each checkpoint of eval.checkpoints."""
    return [str(CFG.files(cell).evaluation(c, primary_of(cell)))
            for cell in CELLS for c in CFG.settings(cell).eval.checkpoints]


def other_evaluations():
    """Every cell's evaluation of the checkpoints after the first of eval.checkpoints (the report reads them)."""
    return [str(CFG.files(cell).evaluation(c, primary_of(cell)))
            for cell in CELLS for c in CFG.settings(cell).eval.checkpoints[1:]]


def cell_curves():
    """The robustness curve of every cell with an eval.eps_grid (none by default)."""
    return [str(CFG.files(cell).curve) for cell in CELLS if CFG.settings(cell).eval.eps_grid]


def evaluation_inputs(wildcards):
    """Unsharded: the training record and the checkpoint; sharded: the shard jobs' results."""
    which, shards = checkpoint_of_tag(wildcards), settings_of(wildcards).eval.shards
    files = files_of(wildcards)
    if shards == 1:
        return {"record": str(files.train_record), "checkpoint": str(files.checkpoint(which))}
    return {"shards": [str(files.shard_result(which, i, shards)) for i in range(1, shards + 1)],
            "shard_outcomes": [str(files.shard_outcomes(which, i, shards)) for i in range(1, shards + 1)]}


def evaluation_source(wildcards, input):
    """The evaluate command's inputs: evaluate the checkpoint, or merge the shard results."""
    if "shards" in input.keys():
        return "--merge " + " ".join(shlex.quote(p) for p in input.shards)
    return f"--record {shlex.quote(input.record)} --checkpoint {shlex.quote(input.checkpoint)}"


def evaluation_gpus(wildcards):
    """A merge needs no GPU."""
    return gpus_of(wildcards) if settings_of(wildcards).eval.shards == 1 else 0


def data_options_of(wildcards):
    return fingerprint(CFG.data_options(wildcards.dataset))


def prepared_data(wildcards):
    """The prepare_data marker, for data sets on disk (none for bundled ones)."""
    if wildcards.dataset in DATASETS_ON_DISK:
        return [f"{RESULTS}/data/{wildcards.dataset}.json"]
    return []


# Snakemake's HTML report (snakemake --report): captions are relative to workflow/rules/report.smk.
CAPTIONS = "../report"


def report_entry(path):
    """``path`` flagged for Snakemake's HTML report as rpat/report/pages.py files it, or as it is (an output
    that is not a page of the report)."""
    page = REPORT_PAGES.get(path)
    if page is None:
        return path
    return report(path, caption=f"{CAPTIONS}/{page.caption}.rst", category=page.category,
                  subcategory=page.subcategory, labels=page.labels)


onstart:
    # Create the MLflow schema and experiment once, before the jobs fan out.
    if CFG.tracking["enabled"]:
        experiment_id = init_store(tracking_uri(CFG.tracking["uri"]), CFG.experiment)
        if experiment_id is not None:
            print(f"MLflow: the runs of {CFG.experiment!r} at {runs_url(experiment_id)} (start `mlflow ui` first: "
                  "README, Browsing runs in MLflow)")
