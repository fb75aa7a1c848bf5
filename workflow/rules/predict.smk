if PREDICT_IMAGES:

    rule predict:
        """The images of predict.input_dir by the ensemble of the experiment's reference group
        (every seed and fold): PNG masks, LabelMe files to correct, uncertainty.csv."""
        input:
            reference=f"{RESULTS}/experiments/{config['predict']['experiment']}/{REFERENCE_RUNS}",
            images=PREDICT_IMAGES,
        output:
            **prediction_outputs(),
        params:
            input_dir=lambda wc, input: os.path.dirname(input.images[0]),
            dir=lambda wc, output: os.path.dirname(output.uncertainty),
            threshold=config["evaluate"]["threshold"],
            tolerance=config["predict"]["tolerance"],
            min_area=config["predict"]["min_area"],
            flags=" ".join(f"--{flag.replace('_', '-')}" for flag in ("tta", "embed_image")
                           if config["predict"][flag]),
        log:
            f"{LOGS}/predict.log",
        benchmark:
            f"{BENCHMARKS}/predict.tsv"
        threads: config["resources"]["train_threads"]
        resources:
            gpu=config["resources"]["train_gpus"],
            device=config["resources"]["device"],
        conda:
            ENV
        shell:
            "OMP_NUM_THREADS={threads} python -m segpipe predict --checkpoint @{input.reference:q}"
            " --input {params.input_dir:q} --output {params.dir:q} --format png labelme"
            " --threshold {params.threshold} --tolerance {params.tolerance}"
            " --min-area {params.min_area} {params.flags} --device {resources.device} > {log} 2>&1"
