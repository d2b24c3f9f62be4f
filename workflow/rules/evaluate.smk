# One job per cell and checkpoint (eval.checkpoints; the first writes eval.json + outcomes.npz, another c writes
# eval-c.json + outcomes-c.npz). With eval.shards: N > 1, N `evaluate_shard` jobs evaluate disjoint blocks of the
# examples and `evaluate` merges their results instead of evaluating (docs/evaluation.md). A cell with an
# eval.eps_grid also gets a `curve` job on its primary checkpoint (curve.json + curve.npz, rpat/curve.py).

rule evaluate_shard:
    input:
        record=f"{CELL_DIR}/train.json",
        checkpoint=f"{CELL_DIR}/checkpoint-{{which}}.pt",
    output:
        result=f"{CELL_DIR}/eval-shards/{{which}}-{{shard}}of{{shards}}.json",
        outcomes=f"{CELL_DIR}/eval-shards/{{which}}-{{shard}}of{{shards}}.npz",
    params:
        rpat=RPAT,
        configs=CONFIG_ARG,
        cell=cell_id,
        settings=eval_fingerprint,
    threads: threads_of
    resources:
        gpu=gpus_of,
        mem_mb=mem_mb_of,
        runtime=runtime_of,
    log:
        f"{LOGS}/evaluate/{PATTERN}-{{which}}-{{shard}}of{{shards}}.log",
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
        result=f"{CELL_DIR}/eval{{tag}}.json",
        outcomes=f"{CELL_DIR}/outcomes{{tag}}.npz",
    params:
        rpat=RPAT,
        configs=CONFIG_ARG,
        cell=cell_id,
        which=checkpoint_of_tag,
        source=evaluation_source,
        settings=eval_fingerprint,
    threads: threads_of
    resources:
        gpu=evaluation_gpus,
        mem_mb=mem_mb_of,
        runtime=runtime_of,
    log:
        f"{LOGS}/evaluate/{PATTERN}{{tag}}.log",
    conda:
        "../../environment.yml"
    shell:
        "{params.rpat} evaluate --config {params.configs} --cell {params.cell} --which {params.which}"
        " {params.source} --out {output.result} --outcomes {output.outcomes} --threads {threads} > {log} 2>&1"


rule curve:
    input:
        record=f"{CELL_DIR}/train.json",
        checkpoint=primary_checkpoint,
    output:
        result=f"{CELL_DIR}/curve.json",
        outcomes=f"{CELL_DIR}/curve.npz",
    params:
        rpat=RPAT,
        configs=CONFIG_ARG,
        cell=cell_id,
        settings=curve_fingerprint,
    threads: threads_of
    resources:
        gpu=gpus_of,
        mem_mb=mem_mb_of,
        runtime=runtime_of,
    log:
        f"{LOGS}/curve/{PATTERN}.log",
    conda:
        "../../environment.yml"
    shell:
        "{params.rpat} curve --config {params.configs} --cell {params.cell} --record {input.record}"
        " --checkpoint {input.checkpoint} --out {output.result} --outcomes {output.outcomes} --threads {threads}"
        " > {log} 2>&1"
