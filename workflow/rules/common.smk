"""The run table: experiments in config.yaml expanded into runs, and helpers for the rules."""

import itertools
import re
import json
import os
import shlex
import shutil
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger

from segpipe import SegpipeError
from segpipe.data.groups import check_group_count, group_keys, merge_identical
from segpipe.data.identity import same_photos, seen_in
from segpipe.data.index import FileIndex, found_labels, labelme_index
from segpipe.files import (DEMO_NAME, UNCERTAINTY_CSV, demo_files, image_files, labelme_files,
                           prediction_paths)
# (Snakemake puts the Snakefile's folder, the repository root, first on sys.path.)
from segpipe import rundir
from segpipe.columns import AXES, DEFINITIONS, REFERENCE_RUNS
from segpipe.figures import FIGURES, figures_for
from segpipe.labels import Labels
from segpipe.spec import (encoder_defaults, input_size, loss_errors, model_errors, patch_errors,
                          schema)
from segpipe.weights import (IMAGENET_URLS, how_to_supply, hub_checkpoints, imagenet_file,
                             unreachable)

# A definition or experiment name: the schema's pattern, without its anchors ^...$.
NAME = schema()["$defs"]["name"]["pattern"].removeprefix("^").removesuffix("$")
# "{architecture}__{backbone}__{loss}__{augmentation}__s{seed}"
RUN = "__".join([*(f"{{{axis}}}" for axis in AXES), "s{seed}"])
RESULTS = config["results"]  # every output lies below it
RUN_DIR = f"{RESULTS}/runs/{RUN}"
FOLDS = config["data"]["folds"]  # None: the fixed test folder
# What one train and one evaluate job make: a run, or in cross-validation one fold of a run.
JOB = f"{RUN}/fold{{fold}}" if FOLDS else RUN
JOB_DIR = f"{RESULTS}/runs/{JOB}"
LOGS, BENCHMARKS = f"{RESULTS}/logs", f"{RESULTS}/benchmarks"
CACHE = f"{RESULTS}/data/{{split}}.h5"
TRAIN_CACHE = CACHE.format(split="train")
# The cache holding the test images: a fold's are in the training cache (its `fold`).
TEST_CACHE = TRAIN_CACHE if FOLDS else CACHE.format(split="test")
EXPERIMENT_DIR = f"{RESULTS}/experiments/{{experiment}}"
SUMMARY = f"{RESULTS}/summary.md"
DEMO_DATA = f"{RESULTS}/demo_data"
ENV = "../../envs/segpipe.yaml"

# Every job runs the segpipe code of this checkout (`python -m segpipe`), also inside a conda
# env or on a cluster node, whatever the working directory.
shell.prefix(  # (the prefix is formatted like the command: {{ }} stand for braces)
    "set -euo pipefail; export PYTHONPATH="
    + shlex.quote(str(Path(workflow.basedir).resolve()))
    + "${{PYTHONPATH:+:$PYTHONPATH}}; "
)


wildcard_constraints:
    **dict.fromkeys(AXES, NAME),
    seed=r"\d+",
    fold=r"\d+",
    split="train|test",
    experiment=NAME,


def _check_name(where, axis, name):
    if name not in config[DEFINITIONS[axis]]:
        known = ", ".join(config[DEFINITIONS[axis]])
        raise WorkflowError(
            f"config: {where} names {axis} '{name}', which is not defined under "
            f"'{DEFINITIONS[axis]}:' (defined: {known})"
        )


def _expand_experiment(name, exp):
    """The runs of one experiment: the grid of its varied axes, the rest fixed, times seeds."""
    fixed = {**config["defaults"], **exp.get("set", {})}
    for axis, value in exp.get("set", {}).items():
        _check_name(f"experiments.{name}.set", axis, value)
        if axis in exp["vary"]:
            raise WorkflowError(
                f"config: experiments.{name}.set.{axis}: the experiment also varies {axis} "
                f"(vary.{axis}); an axis is either varied or set: remove one"
            )
    for axis, values in exp["vary"].items():
        for value in values:
            _check_name(f"experiments.{name}.vary", axis, value)
    choices = [exp["vary"].get(axis, [fixed[axis]]) for axis in AXES]
    seeds = exp.get("seeds", config["defaults"]["seeds"])
    return [
        dict(zip(AXES, combo), seed=seed)
        for combo in itertools.product(*choices)
        for seed in seeds
    ]


def _sweep(name, exp):
    """{axis, param, values} for an experiment with `sweep:`, else None."""
    param = exp.get("sweep")
    if param is None:
        return None
    if len(exp["vary"]) != 1:
        raise WorkflowError(f"config: experiments.{name}.sweep needs exactly one varied axis")
    (axis, names), = exp["vary"].items()
    values = {}
    for n in names:
        value = config[DEFINITIONS[axis]][n].get(param)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise WorkflowError(
                f"config: experiments.{name}.sweep is '{param}', but {DEFINITIONS[axis]}.{n}.{param} "
                f"is {value!r}, not a number"
            )
        values[n] = value
    return {"axis": axis, "param": param, "values": values}


for _axis in AXES:
    _check_name("defaults", _axis, config["defaults"][_axis])

EXPERIMENTS = {name: _expand_experiment(name, exp) for name, exp in config["experiments"].items()}
SWEEPS = {name: _sweep(name, exp) for name, exp in config["experiments"].items()}
# Every distinct run once, in config order: runs shared by experiments are trained once.
RUNS = list({RUN.format(**r): r for runs in EXPERIMENTS.values() for r in runs}.values())


# Start checks beyond the schema's types, on every invocation (a dry run too): an error here
# stops Snakemake before it plans a job, so before it deletes the outputs of a run to redo.
# Not in a job that a cluster executor runs (Snakemake parses the workflow again inside each):
# the Snakemake that submitted it checked. What they learn of each data file is kept in
# FILE_INDEX (segpipe.data.index), beside Snakemake's own records of the working directory, so
# a parse reads only the files that changed since.
CLUSTER_JOB = workflow.remote_exec
FILE_INDEX = ".snakemake/segpipe/labelme_index.json"


def _check_split():
    """data.test_dir is given exactly without data.folds (data.group: _check_images)."""
    data = config["data"]
    if FOLDS and data["test_dir"] is not None:
        raise WorkflowError(
            "config: data.test_dir: must be absent (or null) with data.folds: in "
            "cross-validation every image of data.train_dir is tested once, by its fold"
        )
    if not FOLDS and data["test_dir"] is None:
        raise WorkflowError("config: data.test_dir: required unless data.folds is set")
    if FOLDS and data["drop_test_duplicates"]:
        raise WorkflowError(
            "config: data.drop_test_duplicates: applies to data.test_dir, which cross-validation "
            "has none of (the images of one photo are one group, so in one fold)"
        )


def _check_models():
    """Every architecture × backbone of a run makes a model that trains at data.size, or at
    data.scale on train.patch patches; a backbone's weights file exists."""
    native = config["data"].get("scale") is not None
    errors = patch_errors(config["train"]["patch"], native, "train.patch")
    if errors:
        raise WorkflowError("\n".join(f"config: {e}" for e in errors))
    size = input_size(config["train"]["patch"], config["data"].get("size"))
    for arch, backbone in dict.fromkeys((r["architecture"], r["backbone"]) for r in RUNS):
        where = (f"architectures.{arch}", f"backbones.{backbone}")
        definitions = config["architectures"][arch], config["backbones"][backbone]
        errors = model_errors(*definitions, size, where)
        if errors:
            raise WorkflowError("\n".join(f"config: {e}" for e in errors))
    for name in dict.fromkeys(r["backbone"] for r in RUNS):
        weights = config["backbones"][name].get("weights", "none")
        if weights not in ("imagenet", "none") and not Path(weights).is_file():
            raise WorkflowError(f"config: backbones.{name}.weights: {weights}: no such file")


def _imagenet_weights():
    """{backbone: file} of the runs' backbones with `weights: imagenet` (segpipe.weights): the
    fetch_weights step places each file there, where training reads it."""
    backbones = dict.fromkeys(r["backbone"] for r in RUNS)
    return {name: str(imagenet_file(config["backbones"][name]["encoder"])) for name in backbones
            if config["backbones"][name].get("weights") == "imagenet"}


# The file name of each encoder's ImageNet weights (rule fetch_weights) -> the encoder.
WEIGHTS_ENCODERS = {imagenet_file(encoder).name: encoder for encoder in IMAGENET_URLS}


def _check_weights():
    """Each ImageNet weights file is there, or this machine, where the fetch_weights step runs
    (before any training job), reaches its URL."""
    for name, path in IMAGENET_WEIGHTS.items():
        encoder = config["backbones"][name]["encoder"]
        reason = None if Path(path).is_file() else unreachable(IMAGENET_URLS[encoder])
        if reason is not None:
            raise WorkflowError(
                f"config: backbones.{name}.weights: imagenet: {path} not found, and this machine "
                f"cannot reach {IMAGENET_URLS[encoder]} to fetch it ({reason}): "
                f"{how_to_supply(encoder)}")


def _study_labels():
    """The classes of the study (segpipe.labels.Labels), checked."""
    data = config["data"]
    try:
        return Labels.from_config(data["classes"], data["foreground"], data["background"],
                                  data["ignore"])
    except SegpipeError as exc:
        raise WorkflowError(f"config: {exc}")


def _check_losses():
    """A loss's class_weights give one weight per class (segpipe.spec.loss_errors)."""
    for name in dict.fromkeys(r["loss"] for r in RUNS):
        errors = loss_errors(config["losses"][name], LABELS, f"losses.{name}")
        if errors:
            raise WorkflowError("\n".join(f"config: {e}" for e in errors))


def _demo_to_write(split):
    """Whether the data of ``split`` is the demo data and not all written yet: its rule writes
    it, so nothing can be read at start. Once written, it is checked like the user's: a file
    edited since would else be found bad by rasterise only after Snakemake deleted the cache."""
    folder = config["data"][f"{split}_dir"]
    count = config["data"]["synthetic"][f"{split}_count"]
    return (Path(folder) == Path(DEMO_DATA, split)
            and not all(Path(f).is_file() for f in demo_files(folder, count)))


def _check_data():
    """The LabelMe files of each data folder ({split: [paths]}): the folders exist and hold
    LabelMe files (the demo data, until its rule has written it, is not read)."""
    data = config["data"]
    splits = ("train",) if FOLDS else ("train", "test")  # with folds, no test folder
    files = {}
    for split in splits:
        if not _demo_to_write(split):
            try:
                files[split] = labelme_files(data[f"{split}_dir"])
            except SegpipeError as exc:
                raise WorkflowError(f"config: data.{split}_dir: {exc}")
    return files


def _index_images(files):
    """{split: [segpipe.data.index.LabelmeEntry]} of the user's LabelMe files ({split:
    [paths]}), read as far as their images: only the files that changed since FILE_INDEX was
    written (which a cluster job leaves as it is)."""
    index, found = {}, FileIndex(FILE_INDEX)
    try:
        for split, paths in files.items():
            try:
                index[split] = labelme_index(paths, found)
            except SegpipeError as exc:
                raise WorkflowError(f"config: data.{split}_dir: {exc}")
    finally:
        if not CLUSTER_JOB:
            found.save()
    if index:
        logger.info(f"segpipe: {found.read + found.reused} data files, {found.read} read, "
                    f"{found.reused} unchanged since {FILE_INDEX}")
    return index


def _check_images(index):
    """The user's LabelMe files ({split: [segpipe.data.index.LabelmeEntry]}) checked as
    rasterise checks them before its first image: every file is valid JSON with a 'shapes'
    list, its image decodes and has its declared size (_index_images); each folder keeps the
    label rule (segpipe.labels.Labels.folder_errors); data.group matches a training image;
    the training images' groups (the images of one photo are one) suffice for data.folds or
    the validation split; no test image is a training photo (segpipe.data.identity), unless
    data.drop_test_duplicates. The demo data, written by a rule, is known by its names."""
    data = config["data"]
    for split, entries in index.items():
        found = found_labels(entries)
        errors = LABELS.folder_errors(found, data[f"{split}_dir"], training=split == "train")
        if errors:
            raise WorkflowError("\n".join(f"config: {e}" for e in errors))
        for note in LABELS.folder_notes(found, data[f"{split}_dir"]):
            logger.info(f"config: {note}")
    if "train" in index:
        names = [entry.path.stem for entry in index["train"]]
        same = same_photos([entry.photo for entry in index["train"]])
    else:  # distinct synthetic images
        names, same = [DEMO_NAME.format(i) for i in range(data["synthetic"]["train_count"])], []
    where = (f"{data['train_dir']}: {len(names)} images; the images of one photo and "
             "data.group join groups")
    try:
        keys = group_keys(names, data["group"])
    except SegpipeError as exc:
        raise WorkflowError(f"config: {exc} in {data['train_dir']}")
    try:
        check_group_count(len(set(merge_identical(keys, same))), FOLDS, data["val_fraction"])
    except SegpipeError as exc:
        key = "folds" if FOLDS else "val_fraction"
        raise WorkflowError(f"config: data.{key}: {exc} ({where})")
    if "train" in index and "test" in index and not data["drop_test_duplicates"]:
        train, test = index["train"], index["test"]
        seen = seen_in([entry.photo for entry in test], [entry.photo for entry in train])
        repeated = [f"  {entry.path} = {train[j].path}" for entry, j in zip(test, seen)
                    if j is not None]
        if repeated:
            raise WorkflowError("\n".join([
                f"config: data.test_dir: {len(repeated)} test image(s) are training photos "
                "(segpipe.data.identity: however stored), and would be scored as unseen:",
                *repeated, "remove them from one folder, or set data.drop_test_duplicates: "
                "true to leave them out of the test cache"]))


LABELS = _study_labels()
IMAGENET_WEIGHTS = _imagenet_weights()
if CLUSTER_JOB:
    logger.info("segpipe: start checks skipped in this cluster job (the submitting Snakemake "
                "made them)")
else:
    _check_split()
    _check_models()
    _check_weights()
    _check_losses()
LABELME_INDEX = _index_images(_check_data())
if not CLUSTER_JOB:
    _check_images(LABELME_INDEX)


def _check_predict():
    """The images predict.input_dir holds (none without it): its experiment is one of the
    config's; the folder holds images (the demo data's test folder, written by a rule, is
    known by its names)."""
    predict = config["predict"]
    if "input_dir" not in predict:
        return []
    if predict["experiment"] not in config["experiments"]:
        raise WorkflowError(
            f"config: predict.experiment: '{predict['experiment']}' is not an experiment "
            f"(experiments: {', '.join(config['experiments'])})")
    folder = Path(predict["input_dir"])
    for split in ("train", "test"):
        if folder == Path(DEMO_DATA, split) and split not in LABELME_INDEX:
            count = config["data"]["synthetic"][f"{split}_count"]
            return [Path(f) for f in demo_files(folder, count) if f.endswith(".jpg")]
    try:
        return image_files(folder)
    except SegpipeError as exc:
        raise WorkflowError(f"config: predict.input_dir: {exc}")


PREDICT_IMAGES = _check_predict()
PREDICT_DIR = f"{RESULTS}/predictions/{config['predict'].get('experiment')}"


def run_dir(run):
    return RUN_DIR.format(**run)


def job_dirs(run):
    """The folders of a run's train and evaluate jobs: the run's folder, or one per fold."""
    return [JOB_DIR.format(**run, fold=fold) for fold in (range(FOLDS) if FOLDS else [None])]


def run_spec(wildcards):
    """The JSON run specification `segpipe train` receives (docs/formats.md)."""
    names = {axis: wildcards[axis] for axis in AXES}
    fold = {"fold": int(wildcards.fold)} if FOLDS else {}
    definitions = {axis: config[DEFINITIONS[axis]][name] for axis, name in names.items()}
    definitions["architecture"] = {  # written out: a changed default is a changed run
        **definitions["architecture"],
        **encoder_defaults(definitions["architecture"], definitions["backbone"])}
    return json.dumps(
        {
            "run": JOB.format(**names, seed=wildcards.seed, **fold),
            "seed": int(wildcards.seed),
            **fold,
            "names": names,
            **definitions,
            "train": config["train"],
        },
        sort_keys=True,
    )


def experiment_spec(wildcards):
    """The JSON experiment specification `segpipe aggregate` receives (docs/formats.md)."""
    name = wildcards.experiment
    runs = []
    for r in EXPERIMENTS[name]:
        folds = {"folds": job_dirs(r)} if FOLDS else {}  # the run's evaluation folders
        runs.append({"run": RUN.format(**r), "dir": run_dir(r), **r, **folds})
    axes = list(config["experiments"][name]["vary"])
    return json.dumps(
        {
            "name": name,
            "axes": axes,
            "sweep": SWEEPS[name],
            "baseline": {axis: config["defaults"][axis] for axis in axes},
            "runs": runs,
        },
        sort_keys=True,
    )


def _predictions():
    """{format: [file per image]} of the predict rule: a PNG mask and a LabelMe file each."""
    paths = [prediction_paths(PREDICT_DIR, image.stem, ["png", "labelme"])
             for image in PREDICT_IMAGES]
    return {fmt: [str(p[fmt]) for p in paths] for fmt in ("png", "labelme")}


def prediction_outputs():
    """The outputs of the predict rule, all update(): Snakemake deletes none of them, before
    the job or after a failed one, so `segpipe predict` sees the set it would replace and
    refuses, naming it, when a file of it is one an annotator corrected or the user's own (a
    mask, a LabelMe file, uncertainty.csv); it replaces the set as a whole, the predictions
    of images no longer in predict.input_dir removed."""
    files = _predictions()
    return {"masks": update(files["png"]), "labelme": update(files["labelme"]),
            "uncertainty": update(f"{PREDICT_DIR}/{UNCERTAINTY_CSV}")}


def prediction_files():
    """Every file of the predict rule (none without predict.input_dir)."""
    if not PREDICT_IMAGES:
        return []
    files = _predictions()
    return [*files["png"], *files["labelme"], f"{PREDICT_DIR}/{UNCERTAINTY_CSV}"]


def experiment_inputs(wildcards):
    files = [rundir.HISTORY, *(name for key, name in rundir.evaluation_files(LABELS.binary).items()
                               if key != "predictions")]
    runs = EXPERIMENTS[wildcards.experiment]
    return [f"{folder}/{f}" for r in runs for folder in job_dirs(r) for f in files]


def labelme_input(wildcards):
    """The files of a split's LabelMe folder (the user's, or those the demo data rule writes),
    every annotation and image: editing one re-builds the cache."""
    if wildcards.split not in LABELME_INDEX:
        count = config["data"]["synthetic"][f"{wildcards.split}_count"]
        return demo_files(f"{DEMO_DATA}/{wildcards.split}", count)
    entries = LABELME_INDEX[wildcards.split]
    images = [e.image_file for e in entries if e.image_file is not None]
    return list(dict.fromkeys(str(f) for f in [*(e.path for e in entries), *images]))


def weights_input(wildcards):
    """The ImageNet weights file a run's backbone starts from (none without `weights:
    imagenet`); ancient(): a file fetched again later re-trains nothing."""
    path = IMAGENET_WEIGHTS.get(wildcards.backbone)
    return [ancient(path)] if path else []


def train_cache_input(wildcards):
    """The test folder is rasterised against the training cache (an image of it is refused)."""
    return [TRAIN_CACHE] if wildcards.split == "test" else []


def rasterise_args(wildcards):
    d = config["data"]
    args = ["--size", *map(str, d["size"])] if d.get("scale") is None else ["--scale", str(d["scale"])]
    if d["foreground"] is not None:
        args += ["--foreground", *d["foreground"]]
    if d["background"]:
        args += ["--background", *d["background"]]
    if d["classes"] is not None:
        args += ["--classes", json.dumps(d["classes"])]
    if d["ignore"]:
        args += ["--ignore", *d["ignore"]]
    if wildcards.split == "train":
        split = ["--folds", str(FOLDS)] if FOLDS else ["--val-fraction", str(d["val_fraction"])]
        args += [*split, "--split-seed", str(d["split_seed"])]
        if d["group"] is not None:
            args += ["--group", d["group"]]
    else:
        args += ["--train-cache", TRAIN_CACHE]
        if d["drop_test_duplicates"]:
            args += ["--drop-duplicates"]
    return shlex.join(args)


def sweep_experiments():
    return [name for name, sweep in SWEEPS.items() if sweep is not None]


def figure(name, title):
    return report(
        f"{EXPERIMENT_DIR}/{name}.png",
        caption=f"../report/{name}.rst",
        category="{experiment}",
        labels={"experiment": "{experiment}", "figure": title},
    )


def experiment_outputs(sweep=False):
    """The outputs of an experiment's aggregation, by name: summary.csv and the figures
    (segpipe.figures.FIGURES, with their titles in the report)."""
    return {
        "summary": f"{EXPERIMENT_DIR}/summary.csv",
        "reference_runs": f"{EXPERIMENT_DIR}/{REFERENCE_RUNS}",
        **{name: figure(name, FIGURES[name].title)
           for name in figures_for(sweep, LABELS.binary)},
    }


def experiment_files(name):
    """The files the aggregation of experiment `name` writes."""
    outputs = experiment_outputs(sweep=SWEEPS[name] is not None)
    return [str(path).format(experiment=name) for path in outputs.values()]


def names_regex(names):
    return "|".join(re.escape(n) for n in names) or "(?!)"  # (?!) matches nothing


def clear_stale_backups():
    """Remove Snakemake's backups (.snakemake/backups) of the outputs this Snakemake is about to
    make. Snakemake copies an update() output there before its job and deletes the copy after
    it, or restores it when the job fails; a Snakemake killed meanwhile leaves the copy, and a
    stale copy of a folder (a run's snapshots/) makes every later backup of it fail. Run at
    start (onstart): this Snakemake holds the locks of these outputs, so no other one is making
    them, and their jobs make them anew (or keep a complete run), so a copy has nothing to give
    back: restoring it would put an older run over what an orphaned job wrote since."""
    backups = Path(workflow.persistence.path, "backups")
    if not workflow.is_main_process or not backups.is_dir():
        return
    for output in map(Path, workflow.persistence.all_outputfiles()):
        backup = backups / (output.relative_to(output.anchor) if output.is_absolute() else output)
        if backup.is_dir() and not backup.is_symlink():
            shutil.rmtree(backup)
        elif backup.exists() or backup.is_symlink():
            backup.unlink()
        else:
            continue
        logger.info(f"removed {backup}: Snakemake's backup of {output}, left by a Snakemake "
                    "that was killed while its job ran")
