# One job per cell and checkpoint (eval.checkpoints; the first writes eval.json + outcomes.npz, another c writes
# eval-c.json + outcomes-c.npz). With eval.shards: N > 1, N `evaluate_shard` jobs evaluate disjoint blocks of the
# examples and `evaluate` merges their results instead of evaluating (docs/evaluation.md). A cell with an
# eval.eps_grid also gets a `curve` job on its primary checkpoint (curve.json + curve.npz, rpat/jobs/curve.py). The file
# names are rpat/cells.py's (CellFiles).

rule evaluate_shard:
    input:
        record=str(CELL.train_record),
        checkpoint=str(CELL.checkpoint("{which}")),
    output:
        result=str(CELL.shard_result("{which}", "{shard}", "{shards}")),
        outcomes=str(CELL.shard_outcomes("{which}", "{shard}", "{shards}")),
    params:
        **CELL_JOB_PARAMS,
        settings=eval_fingerprint,
    threads: threads_of
    resources:
        **cell_resources(),
    log:
        str(CELL.log("evaluate", "-{which}-{shard}of{shards}")),
    conda:
        "../../environment.yml"
    shell:
        "{params.rpat} evaluate --config {params.configs} --cell {params.cell} --record {input.record}"
        " --which {wildcards.which} --checkpoint {input.checkpoint} --shard {wildcards.shard}/{wildcards.shards}"
        " --out {output.result} --outcomes {output.outcomes} --threads {threads} > {log} 2>&1"


rule evaluate:
    input:
        unpack(evaluation_inputs),
    output:
        result=str(CELL.tagged_evaluation("{tag}")),
        outcomes=str(CELL.tagged_outcomes("{tag}")),
    params:
        **CELL_JOB_PARAMS,
        which=checkpoint_of_tag,
        source=evaluation_source,
        settings=eval_fingerprint,
    threads: threads_of
    resources:
        **cell_resources(gpu=evaluation_gpus),
    log:
        str(CELL.log("evaluate", "{tag}")),
    conda:
        "../../environment.yml"
    shell:
        "{params.rpat} evaluate --config {params.configs} --cell {params.cell} --which {params.which}"
        " {params.source} --out {output.result} --outcomes {output.outcomes} --threads {threads} > {log} 2>&1"


rule curve:
    input:
        record=str(CELL.train_record),
        checkpoint=primary_checkpoint,
    output:
        result=str(CELL.curve),
        outcomes=str(CELL.curve_outcomes),
    params:
        **CELL_JOB_PARAMS,
        settings=curve_fingerprint,
    threads: threads_of
    resources:
        **cell_resources(),
    log:
        str(CELL.log("curve")),
    conda:
        "../../environment.yml"
    shell:
        "{params.rpat} curve --config {params.configs} --cell {params.cell} --record {input.record}"
        " --checkpoint {input.checkpoint} --out {output.result} --outcomes {output.outcomes} --threads {threads}"
        " > {log} 2>&1"
