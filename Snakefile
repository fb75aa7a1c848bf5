"""segpipe: compare U-Net variants for segmentation of LabelMe-annotated images.

    snakemake --cores N                          # the study in config.yaml
    snakemake --cores N --configfile my.yaml     # another study (replaces config.yaml)
    snakemake --report report.html               # figures and captions as one HTML report
"""

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version

from segpipe import SegpipeError  # this checkout's package: the Snakefile's folder is on sys.path
from segpipe.spec import validate_config

min_version("9.0")


# A config file given on the command line replaces config.yaml instead of being merged into it,
# so a study never inherits the demo's experiments.
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


# The schema (workflow/schemas/config.schema.yaml) types every key; a bad edit stops here, before any job
# is planned and so before Snakemake deletes the outputs of the runs whose params it changed.
try:
    validate_config(config)
except SegpipeError as error:
    raise WorkflowError(str(error)) from None


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/predict.smk"


onstart:
    clear_stale_backups()  # a killed Snakemake's: they would stop the jobs that need a backup


rule all:
    input:
        # Every output of every run is a target: a deleted run, or one file of it, is re-created.
        [expand([*rules.train.output, *rules.evaluate.output], **run, fold=range(FOLDS or 1))
         for run in RUNS],
        SUMMARY,
        [path for name in config["experiments"] for path in experiment_files(name)],
        prediction_files(),  # with a predict section: its folder's predictions
    default_target: True
