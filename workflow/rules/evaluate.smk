rule evaluate:
    """Score the best model and every snapshot of a run on the test cache (in cross-validation,
    of a fold on that fold's images)."""
    input:
        model=f"{JOB_DIR}/{rundir.MODEL}",
        snapshots=f"{JOB_DIR}/{rundir.SNAPSHOTS}",
        cache=TEST_CACHE,
    output:
        **{key: f"{JOB_DIR}/{name}"
           for key, name in rundir.evaluation_files(LABELS.binary).items()},
    params:
        dir=lambda wc, input: os.path.dirname(input.model),
        threshold=config["evaluate"]["threshold"],
        examples=config["evaluate"]["examples"],
    log:
        f"{LOGS}/evaluate/{JOB}.log",
    benchmark:
        f"{BENCHMARKS}/evaluate/{JOB}.tsv"
    threads: 1
    resources:
        gpu=config["resources"]["train_gpus"],
        device=config["resources"]["device"],  # as train's: changing it re-runs nothing
    conda:
        ENV
    shell:
        "OMP_NUM_THREADS={threads} python -m segpipe evaluate --run-dir {params.dir} --cache {input.cache}"
        " --threshold {params.threshold} --examples {params.examples} --device {resources.device}"
        " > {log} 2>&1"
