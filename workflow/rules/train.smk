rule train:
    input:
        prepared_data,
    output:
        record=str(CELL.train_record),
        best=str(CELL.checkpoint("best")),
        last=str(CELL.checkpoint("last")),
    params:
        **CELL_JOB_PARAMS,
        out=run_dir_of,
        settings=train_fingerprint,
    threads: threads_of
    resources:
        gpu=gpus_of,
        mem_mb=mem_mb_of,
        runtime=runtime_of,
    log:
        str(CELL.log("train")),
    conda:
        "../../environment.yml"
    shell:
        "{params.rpat} train --config {params.configs} --cell {params.cell} --out {params.out}"
        " --threads {threads} > {log} 2>&1"
