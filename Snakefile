"""segpipe: compare U-Net variants for binary segmentation of LabelMe-annotated images.

    snakemake --cores N                          # the study in config.yaml
    snakemake --cores N --configfile my.yaml     # another study (replaces config.yaml)
    snakemake --report report.html               # figures and captions as one HTML report
"""

from snakemake.utils import min_version, validate

min_version("9.0")


# A config file given on the command line replaces config.yaml instead of being merged into it,
# so a study never inherits the demo's experiments.
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        # Every run's evaluation is a target too, so a deleted run is re-created.
        [f"{folder}/metrics.csv" for run in RUNS for folder in job_dirs(run)],
        "results/summary.md",
        [path for name in config["experiments"] for path in experiment_files(name)],
    default_target: True
