rule evaluate:
    input:
        record=f"{CELL_DIR}/train.json",
        best=f"{CELL_DIR}/checkpoint-best.pt",
        last=f"{CELL_DIR}/checkpoint-last.pt",
    output:
        f"{CELL_DIR}/eval.json",
    params:
        rpat=RPAT,
        configs=CONFIG_ARG,
        cell=lambda w: cell_of(w).id,
        settings=eval_fingerprint,
    threads: threads_of
    resources:
        gpu=gpus_of,
        mem_mb=mem_mb_of,
        runtime=runtime_of,
    log:
        f"{LOGS}/evaluate/{{dataset}}/{{model}}/{{norm}}/{{method}}/seed{{seed}}.log",
    conda:
        "../../environment.yml"
    shell:
        "{params.rpat} evaluate --config {params.configs} --cell {params.cell} --threads {threads} > {log} 2>&1"
