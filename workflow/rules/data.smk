rule synthesise_demo_data:
    """The embedded demo dataset: synthetic photographs with LabelMe annotations."""
    output:
        directory(f"{DEMO_DATA}/{{split}}"),
    params:
        images=lambda wc: config["data"]["synthetic"][f"{wc.split}_count"],
        # Different seeds, so no test image repeats a training image.
        seed=lambda wc: config["data"]["synthetic"]["seed"] * 2 + (wc.split == "test"),
        size=shlex.join(map(str, config["data"]["synthetic"]["size"])),
    log:
        f"{LOGS}/synthesise_demo_data/{{split}}.log",
    conda:
        ENV
    shell:
        "python -m segpipe synth --output {output} --count {params.images} --seed {params.seed}"
        " --size {params.size} > {log} 2>&1"


rule rasterise:
    """LabelMe folder -> HDF5 cache of images and masks at the training size (+ val split)."""
    input:
        labelme_input,
    output:
        CACHE,
    params:
        folder=lambda wc: config["data"][f"{wc.split}_dir"],
        args=rasterise_args,
    log:
        f"{LOGS}/rasterise/{{split}}.log",
    conda:
        ENV
    shell:
        "python -m segpipe rasterise --input {params.folder:q} --output {output} {params.args}"
        " > {log} 2>&1"
