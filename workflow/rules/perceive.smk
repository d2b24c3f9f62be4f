# The paper's perception analysis of each cell's primary checkpoint, beside its evaluation (rpat/perceive.py).

rule perceive:
    input:
        record=f"{CELL_DIR}/train.json",
        checkpoint=primary_checkpoint,
    output:
        json=f"{CELL_DIR}/perception.json",
        npz=f"{CELL_DIR}/perception.npz",
    params:
        rpat=RPAT,
        configs=CONFIG_ARG,
        cell=cell_id,
        settings=perception_fingerprint,
    threads: threads_of
    resources:
        gpu=gpus_of,
        mem_mb=mem_mb_of,
        runtime=runtime_of,
    log:
        f"{LOGS}/perceive/{CELL_LOG}",
    conda:
        "../../environment.yml"
    shell:
        "{params.rpat} perceive --config {params.configs} --cell {params.cell} --record {input.record}"
        " --checkpoint {input.checkpoint} --out {output.json} --threads {threads} > {log} 2>&1"
