rule report:
    input:
        cell_paths("eval.json"),
    output:
        REPORT_OUTPUTS,
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
        "{params.rpat} report --config {params.configs} --inputs {input} > {log} 2>&1"
        " && {params.rpat} sync-tracking --config {params.configs} >> {log} 2>&1"
