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
    threads: training("threads")
    resources:
        **cell_resources(gpu=training("gpu")),
        # several processes (resources.processes > 1): one Slurm task each; unset (None) for one process
        tasks=training("tasks"),
        nodes=training("nodes"),
        mpi=training("mpi"),
        tasks_per_gpu=training("tasks_per_gpu"),
        cpus_per_task=training("cpus_per_task"),
    log:
        str(CELL.log("train")),
    conda:
        "../../environment.yml"
    shell:
        # `rpat train` starts resources.processes ranks itself (locally, or with srun inside a Slurm job)
        "{params.rpat} train --config {params.configs} --cell {params.cell} --out {params.out}"
        " --threads {threads} > {log} 2>&1"
