# Config loading and validation, grid -> cells, paths. Helpers only: no rules in this file.
import functools
import os
import shlex
import sys

from rpat import config as rpat_config
from rpat.catalog import catalog
from rpat.tracking import init_store, tracking_uri

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
CELL_DIR = f"{RUNS}/{{dataset}}/{{model}}/{{norm}}/{{method}}/seed{{seed}}"
CELLS = CFG.cells()
RPAT = f"{shlex.quote(sys.executable)} -m rpat"
CONFIG_ARG = " ".join(shlex.quote(p) for p in CONFIG_FILES)
DATASETS_ON_DISK = set(catalog()["datasets_on_disk"])

wildcard_constraints:
    dataset="[^/]+",
    model="[^/]+",
    norm="[^/]+",
    method="[^/]+",
    seed="[0-9]+",


@functools.cache
def resolved_cell(cell):
    """A cell's resolved settings, computed once per cell (every rule asks for several parts of them)."""
    return CFG.resolve(cell)


def cell_of(wildcards):
    return rpat_config.Cell.parse(
        f"{wildcards.dataset}/{wildcards.model}/{wildcards.norm}/{wildcards.method}/seed{wildcards.seed}"
    )


def cell_paths(filename):
    return [f"{RUNS}/{cell.id}/{filename}" for cell in CELLS]


def train_fingerprint(wildcards):
    return rpat_config.fingerprint(rpat_config.train_settings(resolved_cell(cell_of(wildcards))))


def eval_fingerprint(wildcards):
    resolved = resolved_cell(cell_of(wildcards))
    return rpat_config.fingerprint({"eval": resolved["eval"], "train": train_fingerprint(wildcards)})


def cell_resources(wildcards):
    return rpat_config.resources_for(resolved_cell(cell_of(wildcards)))


def data_options_of(wildcards):
    cells = [c for c in CELLS if c.dataset == wildcards.dataset]
    return rpat_config.fingerprint(resolved_cell(cells[0])["data"])


def prepared_data(wildcards):
    """The prepare_data marker, for data sets on disk (none for bundled ones)."""
    if wildcards.dataset in DATASETS_ON_DISK:
        return [f"{RESULTS}/data/{wildcards.dataset}.json"]
    return []


def threads_of(wildcards):
    return cell_resources(wildcards)["cpus"]


def gpus_of(wildcards):
    return cell_resources(wildcards)["gpu"]


def mem_mb_of(wildcards, attempt):
    return cell_resources(wildcards)["mem_mb"] * attempt


def runtime_of(wildcards, attempt):
    return cell_resources(wildcards)["runtime"] * attempt


# One table set for the whole grid, and one per named block when there are several (the paper's tables).
TABLE_STEMS = ["summary"]
if sum(1 for block in CFG.blocks() if block.get("name")) > 1:
    TABLE_STEMS += [block["name"] for block in CFG.blocks() if block.get("name")]
REPORT_OUTPUTS = [f"{RESULTS}/tables/{stem}.{ext}" for stem in TABLE_STEMS for ext in ("csv", "md", "tex")]
REPORT_OUTPUTS += [f"{RESULTS}/plots/tradeoff.png", f"{RESULTS}/plots/tradeoff.pdf"]


onstart:
    # Create the MLflow schema and experiment once, before the jobs fan out.
    if CFG.tracking["enabled"]:
        init_store(tracking_uri(CFG.tracking["uri"]), CFG.experiment)
