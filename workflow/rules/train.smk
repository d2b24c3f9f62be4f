rule train:
    input:
        prepared_data,
    output:
        record=f"{CELL_DIR}/train.json",
        best=f"{CELL_DIR}/checkpoint-best.pt",
        last=f"{CELL_DIR}/checkpoint-last.pt",
    params:
        rpat=RPAT,
        configs=CONFIG_ARG,
        cell=cell_id,
        out=run_dir_of,
        settings=train_fingerprint,
    threads: threads_of
    resources:
        gpu=gpus_of,
        mem_mb=mem_mb_of,
        runtime=runtime_of,
    log:
        f"{LOGS}/train/{CELL_LOG}",
    conda:
        "../../environment.yml"
    shell:
        "{params.rpat} train --config {params.configs} --cell {params.cell} --out {params.out}"
        " --threads {threads} > {log} 2>&1"
