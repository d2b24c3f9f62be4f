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
    shell:
        "{params.rpat} report --config {params.configs} --inputs {input} > {log} 2>&1"
