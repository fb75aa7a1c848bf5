rule evaluate:
    """Score the best model and every snapshot of a run on the test cache (in cross-validation,
    of a fold on that fold's images)."""
    input:
        model=f"{JOB_DIR}/model.pt",
        snapshots=f"{JOB_DIR}/snapshots",
        cache=TEST_CACHE,
    output:
        metrics=f"{JOB_DIR}/metrics.csv",
        per_image=f"{JOB_DIR}/per_image.csv",
        by_epoch=f"{JOB_DIR}/metrics_by_epoch.csv",
        evolution=f"{JOB_DIR}/evolution.npz",
        predictions=f"{JOB_DIR}/predictions.png",
        **({} if LABELS.binary else {"confusion": f"{JOB_DIR}/{CONFUSION_CSV}"}),
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
