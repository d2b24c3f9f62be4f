# The paper's perception analysis of each cell's primary checkpoint, beside its evaluation (rpat/jobs/perceive.py).

rule perceive:
    input:
        record=str(CELL.train_record),
        checkpoint=primary_checkpoint,
    output:
        json=str(CELL.perception),
        npz=str(CELL.perception_values),
    params:
        **CELL_JOB_PARAMS,
        settings=perception_fingerprint,
    threads: threads_of
    resources:
        **cell_resources(),
    log:
        str(CELL.log("perceive")),
    conda:
        "../../environment.yml"
    shell:
        "{params.rpat} perceive --config {params.configs} --cell {params.cell} --record {input.record}"
        " --checkpoint {input.checkpoint} --out {output.json} --threads {threads} > {log} 2>&1"
