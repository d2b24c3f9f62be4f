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
        cell=cell_id,
        checkpoint=checkpoint_to_evaluate,
        settings=eval_fingerprint,
    threads: threads_of
    resources:
        gpu=gpus_of,
        mem_mb=mem_mb_of,
        runtime=runtime_of,
    log:
        f"{LOGS}/evaluate/{CELL_LOG}",
    conda:
        "../../environment.yml"
    shell:
        "{params.rpat} evaluate --config {params.configs} --cell {params.cell} --record {input.record}"
        " --checkpoint {params.checkpoint} --out {output} --threads {threads} > {log} 2>&1"
