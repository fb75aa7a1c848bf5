rule evaluate:
    """Score the best model and every snapshot of a run on the test cache."""
    input:
        model=f"{RUN_DIR}/model.pt",
        snapshots=f"{RUN_DIR}/snapshots",
        cache="results/data/test.h5",
    output:
        metrics=f"{RUN_DIR}/metrics.csv",
        per_image=f"{RUN_DIR}/per_image.csv",
        by_epoch=f"{RUN_DIR}/metrics_by_epoch.csv",
        evolution=f"{RUN_DIR}/evolution.npz",
        predictions=f"{RUN_DIR}/predictions.png",
    params:
        dir=lambda wc, input: os.path.dirname(input.model),
        threshold=config["evaluate"]["threshold"],
        examples=config["evaluate"]["examples"],
    log:
        f"results/logs/evaluate/{RUN}.log",
    benchmark:
        f"results/benchmarks/evaluate/{RUN}.tsv"
    threads: 1
    resources:
        gpu=config["resources"]["train_gpus"],
    conda:
        ENV
    shell:
        "OMP_NUM_THREADS={threads} python -m segpipe evaluate --run-dir {params.dir} --cache {input.cache}"
        " --threshold {params.threshold} --examples {params.examples} --device {config[resources][device]}"
        " > {log} 2>&1"
