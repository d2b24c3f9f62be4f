# The tables and figures of the whole grid (rpat/report/__init__.py `outputs` lists every file the report
# writes; this rule declares exactly these). `snakemake --report results/report.html` bundles the ones
# report_entry (common.smk) wraps in report(), with the captions in workflow/report/.
rule report:
    input:
        evals=cell_paths(lambda files, cell: files.evaluation(primary_of(cell), primary_of(cell))),
        # the other checkpoints' (eval.checkpoints: [best, last]): their paper metrics beside the primary's
        others=other_evaluations(),
        # read beside each eval.json (with outcomes.npz) by the report
        perception=cell_paths(lambda files, cell: files.perception),
        records=cell_paths(lambda files, cell: files.train_record),  # the training curves
        # robustness curves (cells with an eval.eps_grid), read beside each eval.json too
        curves=cell_curves(),
    output:
        [report_entry(p) for p in REPORT_OUTPUTS],
    params:
        rpat=RPAT,
        configs=CONFIG_ARG,
    log:
        f"{LOGS}/report.log",
    localrule: True
    conda:
        "../../environment.yml"
    # After the tables, MLflow is reconciled with the JSON results (idempotent; never fails the rule).
    shell:
        "{params.rpat} report --config {params.configs} --inputs {input.evals} > {log} 2>&1"
        " && {params.rpat} sync-tracking --config {params.configs} >> {log} 2>&1"
