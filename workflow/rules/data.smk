# The embedded demo dataset, one rule per split. Its outputs are the files `segpipe synth`
# writes, not their folder: the rasterise rule depends on each, so editing one is noticed.
for _split in ("train", "test"):

    rule:
        """The embedded demo dataset: synthetic photographs with LabelMe annotations."""
        name:
            f"synthesise_demo_{_split}"
        output:
            demo_files(f"{DEMO_DATA}/{_split}", config["data"]["synthetic"][f"{_split}_count"]),
        params:
            folder=lambda wc, output: os.path.dirname(output[0]),
            images=config["data"]["synthetic"][f"{_split}_count"],
            # Different seeds, so no test image repeats a training image.
            seed=config["data"]["synthetic"]["seed"] * 2 + (_split == "test"),
            size=shlex.join(map(str, config["data"]["synthetic"]["size"])),
            cracks="--cracks" if config["data"]["synthetic"]["cracks"] else "",
        log:
            f"{LOGS}/synthesise_demo_data/{_split}.log",
        conda:
            ENV
        shell:
            "python -m segpipe synth --output {params.folder} --count {params.images}"
            " --seed {params.seed} --size {params.size} {params.cracks} > {log} 2>&1"


rule rasterise:
    """LabelMe folder -> HDF5 cache of images and masks at the training size (+ val split);
    the test folder against the training cache, which holds none of its images."""
    input:
        labelme=labelme_input,
        train_cache=train_cache_input,
    output:
        CACHE,
    params:
        folder=lambda wc: config["data"][f"{wc.split}_dir"],
        args=rasterise_args,
    log:
        f"{LOGS}/rasterise/{{split}}.log",
    threads: config["resources"]["rasterise_threads"]
    conda:
        ENV
    shell:
        "python -m segpipe rasterise --input {params.folder:q} --output {output} {params.args}"
        " --workers {threads} > {log} 2>&1"
