localrules:
    fetch_weights,


rule fetch_weights:
    """torchvision's ImageNet weights of a ResNet, downloaded once into the torch hub cache,
    where training reads them, by the Snakemake that submits the jobs (localrules: compute
    nodes often have no internet)."""
    output:
        os.path.join(hub_checkpoints(), "{weights_file}"),
    wildcard_constraints:
        weights_file=names_regex(WEIGHTS_ENCODERS),
    params:
        encoder=lambda wc: WEIGHTS_ENCODERS[wc.weights_file],
    log:
        f"{LOGS}/fetch_weights/{{weights_file}}.log",
    conda:
        ENV
    shell:
        "python -m segpipe fetch-weights --encoder {params.encoder} > {log} 2>&1"


rule train:
    """One training run (in cross-validation, one fold of it): best-on-validation model,
    per-epoch history, snapshots."""
    input:
        cache=TRAIN_CACHE,
        weights=weights_input,
    # update(): Snakemake neither deletes the outputs before the job nor after a failed one (it
    # restores them), so a job re-run only because the cache was rebuilt with the same content
    # finds its run complete and keeps it (segpipe.train.train_run).
    output:
        model=update(f"{JOB_DIR}/{rundir.MODEL}"),
        history=update(f"{JOB_DIR}/{rundir.HISTORY}"),
        snapshots=update(directory(f"{JOB_DIR}/{rundir.SNAPSHOTS}")),
    params:
        # The whole run definition: editing it re-runs exactly the runs that use it.
        spec=run_spec,
        dir=lambda wc, output: os.path.dirname(output.model),
    log:
        f"{LOGS}/train/{JOB}.log",
    benchmark:
        f"{BENCHMARKS}/train/{JOB}.tsv"
    threads: config["resources"]["train_threads"]
    resources:
        gpu=config["resources"]["train_gpus"],
        mem_mb=config["resources"]["train_mem_mb"],
        runtime=config["resources"]["train_runtime_min"],
        # Execution settings as resources, not params: changing them re-runs nothing.
        device=config["resources"]["device"],
        num_workers=config["resources"]["num_workers"],
    conda:
        ENV
    shell:
        "OMP_NUM_THREADS={threads} python -m segpipe train --cache {input.cache}"
        " --spec {params.spec:q} --output-dir {params.dir} --device {resources.device}"
        " --num-workers {resources.num_workers} > {log} 2>&1"
