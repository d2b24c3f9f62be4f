# Data sets on disk are downloaded (data.download: true), laid out (Tiny-ImageNet's val split) and decoded
# into a tensor cache once, on the submit host (which has the internet access compute nodes often lack),
# before the jobs that read them fan out.
rule prepare_data:
    output:
        f"{RESULTS}/data/{{dataset}}.json",
    params:
        rpat=RPAT,
        configs=CONFIG_ARG,
        options=data_options_of,
    log:
        f"{LOGS}/prepare_data/{{dataset}}.log",
    localrule: True
    conda:
        "../../environment.yml"
    shell:
        "{params.rpat} prepare-data --config {params.configs} --dataset {wildcards.dataset} --out {output} > {log} 2>&1"
