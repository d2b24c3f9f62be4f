# rpat: expand a config's grid into training and evaluation jobs, then the paper-style report.
#   snakemake --cores 2                                   the demo grid (config/config.yaml)
#   snakemake --cores 2 --configfile config/paper.yaml    another config (replaces the default)
#   snakemake --profile profiles/slurm ...                on a Slurm cluster
# Every rule is one call of the `rpat` CLI; run `snakemake -n -p` to see the commands.
#   snakemake --report results/report.html                the tables, figures and training curves in one page

from snakemake.utils import min_version

# The oldest Snakemake the project installs and tests (pyproject.toml): executor plugins (profiles/slurm),
# `localrule:` and report() labels all exist there.
min_version("9.19")

report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/perceive.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        REPORT_OUTPUTS,
        cell_evaluations(),
    default_target: True
