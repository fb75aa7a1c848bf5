"""Real Snakemake runs of the whole workflow on a tiny study (tests/configs/tiny.yaml).

The study has two experiments sharing one run (unet with the default loss), one of them a numeric
sweep, so a complete run has 4 training jobs. Its cross-validation variant (tiny_cv.yaml) has
2 runs in 3 folds. The incremental cases are checked with dry runs against a finished copy of
the workflow's results and metadata.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import PIL.Image
import pytest
import torch
import yaml

from cachefile import open_stacked
from segpipe.figures import FIGURES
from segpipe.labels import IGNORE

CLASS_FIGURES = ("classes", "confusion")

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny.yaml"
TINY_CV = REPO / "tests" / "configs" / "tiny_cv.yaml"
TINY_CLASSES = REPO / "tests" / "configs" / "tiny_classes.yaml"
# The last commit before several classes: a binary study must write what it wrote.
BEFORE_CLASSES = "f5273774f8cd4c8bbb4633341a288a8ff326016d"
# Columns and checkpoint entries that measure time or memory, which no two runs share.
TIMING = {"seconds", "train_seconds", "peak_memory_mb", "train_seconds_mean"}
# What a binary study's files gained on purpose since: the cache's content digest and the
# checkpoint's fingerprint, which let a rebuilt cache of the same content retrain nothing, and
# the identity of each cached photo (segpipe.data.identity).
ADDED_SINCE = {"content_sha256", "fingerprint", "photos"}
# The train settings of native resolution, at their defaults in a study at data.size.
NATIVE_SETTINGS = ("patch", "patches_per_epoch", "oversample", "tile_overlap", "tile_sigma")
RUNS = {
    "unet__scratch__bcedice_0.5__plain__s0",
    "attention_unet__scratch__bcedice_0.5__plain__s0",
    "unet__scratch__bcedice_0.0__plain__s0",
    "unet__scratch__bcedice_1.0__plain__s0",
}


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run snakemake on the repo's Snakefile in `workdir` with the config there."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
         "--configfile", str(workdir / "config.yaml"), "--cores", "2", *args],
        capture_output=True, text=True, env=env, timeout=900,
    )
    if check and proc.returncode != 0:
        pytest.fail(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def planned(workdir: Path) -> dict[str, set[str]]:
    """Jobs a dry run would execute: rule -> set of its first outputs."""
    out = snakemake(workdir, "--dry-run").stdout
    jobs: dict[str, set[str]] = {}
    for block in re.split(r"^(?=(?:local)?rule \w+:$)", out, flags=re.M)[1:]:
        rule = re.match(r"(?:local)?rule (\w+):", block).group(1)
        output = re.search(r"^    output: ([^,\n]+)", block, re.M)
        jobs.setdefault(rule, set()).update([output.group(1)] if output else [])
    return jobs


def trained_runs(jobs: dict[str, set[str]]) -> set[str]:
    return {Path(p).parent.name for p in jobs.get("train", ())}


def run_study(config: Path, workdir: Path) -> Path:
    """``workdir`` in which the study of ``config`` ran to completion."""
    shutil.copy(config, workdir / "config.yaml")
    snakemake(workdir)
    return workdir


def private_copy(finished: Path, workdir: Path) -> Path:
    """A copy of a finished study (results and Snakemake metadata) that a test may change."""
    shutil.copytree(finished, workdir, symlinks=True)
    return workdir


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A workdir in which the tiny study ran to completion."""
    return run_study(TINY, tmp_path_factory.mktemp("study"))


@pytest.fixture
def study(finished: Path, tmp_path: Path) -> Path:
    return private_copy(finished, tmp_path / "study")


def edit_config(workdir: Path, change) -> None:
    path = workdir / "config.yaml"
    config = yaml.safe_load(path.read_text())
    change(config)
    path.write_text(yaml.safe_dump(config))


def test_study_runs_end_to_end(finished: Path):
    results = finished / "results"
    assert {p.name for p in (results / "runs").iterdir()} == RUNS

    with open_stacked(results / "data" / "train.h5") as f:
        assert f["images"].shape == (12, 32, 32, 3) and f["images"].dtype == "uint8"
        assert f["masks"].shape == (12, 32, 32)
        assert set(f["masks"][:].ravel()) <= {0, 1} and f["masks"][:].any()
        assert int(f["is_val"][:].sum()) == 3  # val_fraction 0.25 of 12
    with open_stacked(results / "data" / "test.h5") as f:
        assert f["images"].shape == (4, 32, 32, 3) and not f["is_val"][:].any()

    for run in RUNS:
        metrics = pd.read_csv(results / "runs" / run / "metrics.csv")
        assert len(metrics) == 1 and 0 <= metrics.loc[0, "dice"] <= 1
        history = pd.read_csv(results / "runs" / run / "history.csv")
        assert list(history["epoch"]) == [1, 2]
        by_epoch = pd.read_csv(results / "runs" / run / "metrics_by_epoch.csv")
        assert list(by_epoch["epoch"]) == [1, 2]
        assert not (results / "runs" / run / "state.pt").exists()  # removed once complete

    arch = pd.read_csv(results / "experiments" / "architecture" / "summary.csv")
    assert list(arch["architecture"]) == ["unet", "attention_unet"]
    sweep = pd.read_csv(results / "experiments" / "dice_weight" / "summary.csv")
    assert list(sweep["loss"]) == ["bcedice_0.0", "bcedice_0.5", "bcedice_1.0"]
    for name in set(FIGURES) - set(CLASS_FIGURES):  # every figure aggregate writes is an output
        for experiment in ("architecture", "dice_weight"):
            if name != "sweep" or experiment == "dice_weight":
                assert (results / "experiments" / experiment / f"{name}.png").stat().st_size > 5000
    assert not (results / "experiments" / "architecture" / "sweep.png").exists()
    for name in CLASS_FIGURES:  # a binary study has no per-class figures
        assert not (results / "experiments" / "architecture" / f"{name}.png").exists()
    summary = (results / "summary.md").read_text()
    assert "architecture" in summary and "dice_weight" in summary
    # 4 test images: the smallest two-sided Wilcoxon p is 2/2⁴, so no difference is detectable
    # in the 1 + 2 comparisons with the references
    assert summary.count(": no detectable difference (ΔDice") == 3

    # Every step logged where it ran (on a cluster, its SLURM job id).
    log = (results / "logs" / "train" / "unet__scratch__bcedice_0.5__plain__s0.log").read_text()
    assert "SLURM_JOB_ID=none" in log


def test_complete_study_reruns_nothing(study: Path):
    assert planned(study) == {}


def test_editing_a_loss_reruns_exactly_its_runs(study: Path):
    edit_config(study, lambda c: c["losses"].update({"bcedice_1.0": {"bce": 0.0, "dice": 1.0,
                                                                      "pos_weight": 2.0}}))
    jobs = planned(study)
    assert trained_runs(jobs) == {"unet__scratch__bcedice_1.0__plain__s0"}
    assert {Path(p).parent.name for p in jobs["evaluate"]} == {"unet__scratch__bcedice_1.0__plain__s0"}
    assert set(jobs) == {"train", "evaluate", "aggregate_sweep", "summary", "all"}


def test_execution_settings_rerun_nothing(study: Path):
    edit_config(study, lambda c: c["resources"].update(num_workers=2, device="auto"))
    assert planned(study) == {}


def test_editing_a_train_setting_retrains_every_run(study: Path):
    edit_config(study, lambda c: c["train"].update(lr=0.02))
    jobs = planned(study)
    assert trained_runs(jobs) == RUNS
    assert set(jobs) == {"train", "evaluate", "aggregate", "aggregate_sweep", "summary", "all"}


def test_adding_a_seed_adds_only_new_runs(study: Path):
    edit_config(study, lambda c: c["defaults"].update(seeds=[0, 1]))
    jobs = planned(study)
    assert trained_runs(jobs) == {run.replace("__s0", "__s1") for run in RUNS}
    assert set(jobs) == {"train", "evaluate", "aggregate", "aggregate_sweep", "summary", "all"}


def test_deleting_a_run_recreates_only_that_run(study: Path):
    shutil.rmtree(study / "results" / "runs" / "attention_unet__scratch__bcedice_0.5__plain__s0")
    jobs = planned(study)
    assert trained_runs(jobs) == {"attention_unet__scratch__bcedice_0.5__plain__s0"}
    assert set(jobs) == {"train", "evaluate", "aggregate", "summary", "all"}


@pytest.mark.parametrize("deleted", ["model.pt", "history.csv", "snapshots"])
def test_a_deleted_file_of_a_run_recreates_only_that_run(study: Path, deleted: str):
    path = study / "results" / "runs" / "unet__scratch__bcedice_0.0__plain__s0" / deleted
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    jobs = planned(study)
    assert trained_runs(jobs) == {"unet__scratch__bcedice_0.0__plain__s0"}
    assert set(jobs) == {"train", "evaluate", "aggregate_sweep", "summary", "all"}
    if deleted == "model.pt":  # and a real run restores it
        snakemake(study, str(path.relative_to(study)))
        assert torch.load(path, weights_only=True)["spec"]["run"] == path.parent.name


def outputs(workdir: Path) -> dict[str, int]:
    """Every file under results/ with its modification time."""
    return {str(p.relative_to(workdir)): p.stat().st_mtime_ns
            for p in (workdir / "results").rglob("*") if p.is_file()}


def user_data(config: dict, workdir: Path) -> None:
    """Point the study at its demo data as if it were the user's own LabelMe folders."""
    config["data"].update(train_dir=str(workdir / "results" / "demo_data" / "train"),
                          test_dir=str(workdir / "results" / "demo_data" / "test"))


# The label rule's message, by Snakemake at start (prefixed "config: ") and by hand.
LABEL_IN_NO_FILE = ("config: data.foreground: no LabelMe file of {w}/results/demo_data/train has "
                    "a shape labelled 'stnoe' (their labels: grass, leaf, stone)")
# Bad edits of the finished tiny study: each must stop `snakemake` at start with the key path
# named, before any job and so before Snakemake deletes the outputs of the runs it would redo.
BAD_EDITS = {
    "unknown model": (lambda c, w: c["architectures"]["attention_unet"].update(
        model="attention_unett"), "config: architectures.attention_unet.model: "
        "'attention_unett' is not one of unet, unetpp, attention_unet, r2unet, "
        "attention_r2unet, atrous_unet"),
    "loss key typo": (lambda c, w: c["losses"]["bcedice_1.0"].update(dcie=1),
                      "config: losses.bcedice_1.0.dcie: unknown key (allowed: bce, dice, "
                      "focal_tversky, pos_weight, class_weights, tversky_alpha, tversky_beta, "
                      "tversky_gamma)"),
    "option typo": (lambda c, w: c["architectures"]["unet"].update(widht=8),
                    "config: architectures.unet.widht: unknown key (allowed: model, width, "
                    "depth, down, up, head)"),
    "option of another family": (lambda c, w: c["architectures"]["unet"].update(t=3),
                                 "config: architectures.unet.t: unknown key"),
    "unknown encoder": (lambda c, w: c["backbones"].update(
        scratch={"encoder": "resnet99", "weights": "imagenet"}),
        "config: backbones.scratch.encoder: 'resnet99' is not one of scratch, resnet18, "
        "resnet34, resnet50"),
    "probability above 1": (lambda c, w: c["augmentations"]["plain"].update(hflip=2),
                            "config: augmentations.plain.hflip: 2 is greater than the maximum "
                            "of 1"),
    "negative loss weight": (lambda c, w: c["losses"]["bcedice_0.5"].update(bce=-0.5),
                             "config: losses.bcedice_0.5.bce: -0.5 is less than the minimum "
                             "of 0"),
    "no positive loss weight": (lambda c, w: c["losses"]["bcedice_1.0"].update(dice=0),
                                "config: losses.bcedice_1.0: needs a term (bce, dice or "
                                "focal_tversky) with a weight > 0"),
    "train setting": (lambda c, w: c["train"].update(epoch=3),
                      "config: train.epoch: unknown key (allowed: epochs, batch_size, "),
    "depth too large": (lambda c, w: c["architectures"]["unet"].update(depth=5),
                        "config: architectures.unet.depth: 5 is too deep for images of 32x32: "
                        "the deepest feature map would be 1x1 pixel, and BatchNorm cannot train "
                        "on one value per channel; use depth <= 4 or larger images"),
    "foreground label in no file": (lambda c, w: (user_data(c, w), c["data"].update(
        foreground=["stnoe"])), LABEL_IN_NO_FILE),
    "label in foreground and background": (lambda c, w: c["data"].update(
        foreground=["stone"], background=["leaf", "stone"]),
        "config: data: label 'stone' is given two roles (foreground and background)"),
    "missing data folder": (lambda c, w: c["data"].update(train_dir="/nonexistent/train"),
                            "config: data.train_dir: /nonexistent/train: not a folder"),
    "undefined name": (lambda c, w: c["experiments"]["architecture"]["vary"].update(
        architecture=["unet", "transunet"]), "config: experiments.architecture.vary names "
        "architecture 'transunet', which is not defined under 'architectures:'"),
    "set on a varied axis": (lambda c, w: c["experiments"]["architecture"].update(
        set={"architecture": "unet"}), "config: experiments.architecture.set.architecture: the "
        "experiment also varies architecture (vary.architecture); an axis is either varied or "
        "set: remove one"),
    "group that is no regular expression": (lambda c, w: c["data"].update(group="(IMG"),
                                            "config: data.group = '(IMG': not a regular "
                                            "expression (missing ), unterminated subpattern"),
    "group matching no file": (lambda c, w: c["data"].update(group=r"^zzz(\d)"),
                               "config: data.group = '^zzz(\\\\d)': matches none of the 12 names "
                               "(e.g. 'synth_0000') in results/demo_data/train"),
    "more folds than images": (lambda c, w: c["data"].update(folds=13, test_dir=None),
                               "config: data.folds: 13 folds need at least 13 groups, got 12 "
                               "(results/demo_data/train: 12 images; the images of one photo "
                               "and data.group join groups)"),
    "group matching no user file": (lambda c, w: (user_data(c, w), c["data"].update(
        group="^IMG_")), "config: data.group = '^IMG_': matches none of the 12 names (e.g. "
        "'synth_0000') in {w}/results/demo_data/train"),
    "predict with an unknown experiment": (lambda c, w: c.update(predict={
        "input_dir": "results/demo_data/test", "experiment": "architecture2"}),
        "config: predict.experiment: 'architecture2' is not an experiment (experiments: "
        "architecture, dice_weight)"),
    "predict folder missing": (lambda c, w: c.update(predict={
        "input_dir": "/nonexistent/new", "experiment": "architecture"}),
        "config: predict.input_dir: /nonexistent/new: input folder not found"),
    "test folder that is the training folder": (lambda c, w: (user_data(c, w), c["data"].update(
        test_dir=c["data"]["train_dir"])), "config: data.test_dir: 12 test image(s) are training "
        "photos (segpipe.data.identity: however stored), and would be scored as unseen:\n  "
        "{w}/results/demo_data/train/synth_0000.json = {w}/results/demo_data/train/"
        "synth_0000.json\n"),
}


@pytest.mark.parametrize("edit, message", BAD_EDITS.values(), ids=BAD_EDITS)
def test_bad_edit_stops_snakemake_at_start_and_deletes_nothing(finished: Path, tmp_path: Path,
                                                              edit, message):
    config = yaml.safe_load((finished / "config.yaml").read_text())
    edit(config, finished)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    before = outputs(finished)
    # A real run, not a dry run: a check that let it through would delete and redo runs.
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(finished),
         "--configfile", str(tmp_path / "config.yaml"), "--cores", "2"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert message.format(w=finished) in proc.stderr, proc.stderr[-2000:]
    assert outputs(finished) == before


def test_start_checks_need_no_torch(tmp_path: Path):
    """The Snakemake process may run without torch (--sdm conda): the checks, the depth rule
    included, run with torch unimportable."""
    shutil.copy(TINY, tmp_path / "config.yaml")
    edit_config(tmp_path, lambda c: c["architectures"]["unet"].update(depth=5))
    no_torch = ("import sys; sys.modules['torch'] = None; from snakemake.cli import main; "
                "main()")
    proc = subprocess.run(
        [sys.executable, "-c", no_torch, "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
         "--configfile", str(tmp_path / "config.yaml"), "--dry-run"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "config: architectures.unet.depth: 5 is too deep" in proc.stdout + proc.stderr


def test_a_dry_run_stops_at_the_same_check(study: Path):
    edit_config(study, lambda c: c["architectures"]["unet"].update(widht=8))
    proc = snakemake(study, "--dry-run", check=False)
    assert proc.returncode == 1
    assert "config: architectures.unet.widht: unknown key" in proc.stdout + proc.stderr
    assert "rule train" not in proc.stdout


def test_imagenet_weights_are_named_at_start_or_read_by_training(tmp_path: Path):
    """Without the file and without network, a dry run stops at start naming the file, where
    to put it and how to fetch it; with the file there, training jobs take it as an input and
    no fetch is planned (the fetch_weights step runs only where a file is missing)."""
    shutil.copy(TINY, tmp_path / "config.yaml")
    edit_config(tmp_path, lambda c: (
        c["backbones"].update(resnet18={"encoder": "resnet18", "weights": "imagenet"}),
        c["experiments"].update(backbone={"vary": {"backbone": ["scratch", "resnet18"]}})))
    offline = dict(os.environ, TORCH_HOME=str(tmp_path / "torch"),
                   https_proxy="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9")
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d",
               str(tmp_path), "--configfile", str(tmp_path / "config.yaml"), "--dry-run"]
    proc = subprocess.run(command, capture_output=True, text=True, env=offline, timeout=300)
    path = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert proc.returncode == 1
    assert (f"config: backbones.resnet18.weights: imagenet: {path} not found, and this machine "
            "cannot reach https://download.pytorch.org/models/resnet18-f37072fd.pth to fetch it "
            "([Errno 111] Connection refused): on a machine with internet run `segpipe "
            "fetch-weights --encoder resnet18`") in proc.stdout + proc.stderr

    path.parent.mkdir(parents=True)
    torch.save({}, path)
    proc = subprocess.run(command, capture_output=True, text=True, env=offline, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert not re.search(r"^(local)?rule fetch_weights:", proc.stdout, re.M)
    inputs = re.findall(r"^    input: (.*)$", proc.stdout, re.M)
    resnet = [line for line in inputs if str(path) in line]
    assert len(resnet) == 1 and resnet[0] == f"results/data/train.h5, {path}"


def checksums(workdir: Path) -> dict[str, str]:
    """Every file under results/ with the SHA-256 of its bytes."""
    return {str(p.relative_to(workdir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((workdir / "results").rglob("*")) if p.is_file()}


def real_run(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return snakemake(workdir, *args, check=False)


def truncated(path: Path) -> str:
    path.write_text('{"shapes": [')
    return "not valid JSON (Expecting value: line 1 column 13 (char 12))"


def long_integer(path: Path) -> str:
    point = "[1, " + "1" * 5000 + "],"
    path.write_text(path.read_text().replace('"points": [', f'"points": [{point}', 1))
    return "not valid JSON (a number of more than 4300 digits)"


@pytest.mark.parametrize("user", [True, False], ids=["user data", "demo data"])
@pytest.mark.parametrize("corrupt", [truncated, long_integer], ids=["truncated", "5000 digits"])
def test_a_corrupt_labelme_file_stops_snakemake_at_start(study: Path, corrupt, user):
    """Before any job: Snakemake would delete the cache before rasterise failed. The demo data,
    once written, is checked as the user's (an edit of it re-runs rasterise)."""
    if user:
        edit_config(study, lambda c: user_data(c, study))
    path = study / "results" / "demo_data" / "train" / "synth_0003.json"
    problem = corrupt(path)
    before = checksums(study)
    proc = real_run(study)
    assert proc.returncode == 1
    named = path if user else path.relative_to(study)
    assert f"config: data.train_dir: {named}: {problem}" in proc.stderr, proc.stderr[-2000:]
    assert checksums(study) == before


def labelme_copy(source: Path, folder: Path, name: str, suffix: str) -> None:
    """A LabelMe file ``name`` in ``folder`` of the photo of ``source`` as LabelMe stores it
    (labelme/label_file.py, LabelFile.load_image_file): saved by Pillow as PNG (``suffix``
    .png: an image file beside the JSON, embedded too), or as JPEG at Pillow's default quality
    (.jpg: embedded only), re-compressed."""
    document = json.loads(source.read_text())
    buffer = io.BytesIO()
    PIL.Image.open(source.with_suffix(".jpg")).save(buffer, "PNG" if suffix == ".png" else "JPEG")
    if suffix == ".png":
        (folder / f"{name}.png").write_bytes(buffer.getvalue())
    (folder / f"{name}.json").write_text(json.dumps({
        **document, "imagePath": f"{name}{suffix}",
        "imageData": base64.b64encode(buffer.getvalue()).decode()}))


def test_test_images_that_are_training_photos(study: Path, tmp_path: Path):
    """Refused at start, naming both files, however LabelMe stored the copy; with
    data.drop_test_duplicates left out of the test cache, with a warning."""
    train = study / "results" / "demo_data" / "train"
    test = shutil.copytree(study / "results" / "demo_data" / "test", tmp_path / "photos")
    labelme_copy(train / "synth_0002.json", test, "field_1", ".jpg")
    labelme_copy(train / "synth_0007.json", test, "field_2", ".png")
    edit_config(study, lambda c: c["data"].update(train_dir=str(train), test_dir=str(test)))
    before = checksums(study)
    proc = real_run(study)
    assert proc.returncode == 1
    assert (f"config: data.test_dir: 2 test image(s) are training photos (segpipe.data."
            f"identity: however stored), and would be scored as unseen:\n  "
            f"{test / 'field_1.json'} = {train / 'synth_0002.json'}\n  {test / 'field_2.json'} = "
            f"{train / 'synth_0007.json'}\nremove them from one folder, or set "
            "data.drop_test_duplicates: true to leave them out of the test cache") in proc.stderr
    assert checksums(study) == before

    edit_config(study, lambda c: c["data"].update(drop_test_duplicates=True))
    snakemake(study, "results/data/test.h5")
    with open_stacked(study / "results" / "data" / "test.h5") as f:
        assert list(f["names"].asstr()[:]) == [f"synth_{i:04d}" for i in range(4)]
    log = (study / "results" / "logs" / "rasterise" / "test.log").read_text()
    for copy, photo in [("field_1", "synth_0002"), ("field_2", "synth_0007")]:
        assert (f"{test / copy}.json: the same photo as '{photo}' of the training cache "
                "results/data/train.h5: left out of this cache") in log


def test_a_dry_run_reads_only_the_files_that_changed(study: Path):
    """The start checks keep what they learnt of each file (.snakemake/segpipe): a second dry
    run reads none, an edited file is read again and checked as strictly as the first time."""
    edit_config(study, lambda c: user_data(c, study))
    files = sorted((study / "results" / "demo_data").rglob("synth_*"))
    for path in files:  # an hour old (a file changed within 2 s of a check is read again)
        mtime = path.stat().st_mtime_ns - 3600 * 10**9
        os.utime(path, ns=(mtime, mtime))
    count = len(files)  # 16 JSON files and their images
    assert f"segpipe: {count} data files, {count} read, 0 unchanged" in dry_run(study)
    assert f"segpipe: {count} data files, 0 read, {count} unchanged" in dry_run(study)

    path = study / "results" / "demo_data" / "train" / "synth_0003.json"
    document = json.loads(path.read_text())
    path.write_text(json.dumps({**document, "flags": {"checked": True}}))
    out = dry_run(study)
    assert f"segpipe: {count} data files, 1 read, {count - 1} unchanged" in out
    assert re.search(r"^rasterise\s+2$", out, re.M)  # the edit is noticed: the cache is rebuilt
    path.write_text(json.dumps({**document, "shapes": "none"}))
    proc = snakemake(study, "--dry-run", check=False)
    assert proc.returncode == 1
    assert (f"config: data.train_dir: {path}: not a LabelMe file (no 'shapes' list)"
            in proc.stdout + proc.stderr)


def dry_run(workdir: Path) -> str:
    proc = snakemake(workdir, "--dry-run")
    return proc.stdout + proc.stderr


def test_a_cache_rebuilt_with_the_same_content_retrains_nothing(study: Path):
    """An edit of a demo annotation is noticed (the cache is rebuilt), and one that changes no
    pixel of the cache (a LabelMe flag) leaves every run as it was."""
    path = study / "results" / "demo_data" / "train" / "synth_0003.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "flags": {"checked": True}}))
    jobs = planned(study)
    assert jobs["rasterise"] == {"results/data/train.h5", "results/data/test.h5"}
    assert trained_runs(jobs) == RUNS  # scheduled, as a rebuilt input's consumers are
    trained = {k: v for k, v in checksums(study).items()
               if k.startswith("results/runs/") and (k.endswith((".pt", "history.csv")))}
    snakemake(study, *(f"results/runs/{run}/model.pt" for run in RUNS))
    assert {k: checksums(study)[k] for k in trained} == trained
    for run in RUNS:
        log = (study / "results" / "runs" / run / "train.log").read_text()
        assert log.count(" epoch 1/2: ") == 1
        assert log.endswith("complete for this spec and cache: kept, nothing to train\n")


def test_a_killed_snakemakes_train_job_is_waited_for_and_its_run_kept(tmp_path: Path):
    """Snakemake killed (SIGKILL) while a train job runs, then --unlock and a re-run: the new
    job waits for the orphan (held stopped until the new job waits), finds the run it finished
    complete and keeps it; nothing is deleted, and the run's train.log keeps every line."""
    shutil.copy(TINY, tmp_path / "config.yaml")
    edit_config(tmp_path, lambda c: c["train"].update(epochs=30))  # ~3 s left to stop it
    run = "unet__scratch__bcedice_0.5__plain__s0"
    target, folder = f"results/runs/{run}/model.pt", tmp_path / "results" / "runs" / run
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d",
               str(tmp_path), "--configfile", str(tmp_path / "config.yaml"), "--cores", "2"]
    first = subprocess.Popen([*command, target], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    orphan = None
    try:
        wait_for(lambda: (folder / "state.pt").exists())
        orphan = int(re.search(r"pid (\d+)", (folder / ".segpipe.lock").read_text())[1])
        os.kill(orphan, signal.SIGSTOP)
        first.kill()
        first.wait()
        snakemake(tmp_path, "--unlock")
        second = subprocess.Popen([*command, target], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        job_log = tmp_path / "results" / "logs" / "train" / f"{run}.log"
        wait_for(lambda: job_log.exists() and "waiting for it to end" in job_log.read_text())
        os.kill(orphan, signal.SIGCONT)
        output, _ = second.communicate(timeout=300)
        assert second.returncode == 0, output[-3000:]
    finally:
        first.kill()
        if orphan is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(orphan, signal.SIGCONT)
    assert f"in use by segpipe train (pid {orphan} on " in job_log.read_text()
    log = (folder / "train.log").read_text()
    assert log.count(" epoch 1/30: ") == log.count(" epoch 30/30: ") == 1  # trained once
    assert log.endswith("complete for this spec and cache: kept, nothing to train\n")
    assert {p.name for p in folder.iterdir()} >= {"model.pt", "history.csv", "snapshots"}
    assert "Nothing to be done" in snakemake(tmp_path, "--dry-run", target).stdout

    # The training definition edited, the job starts over the finished run: Snakemake backs up
    # its update() outputs, and a Snakemake killed now leaves the backups. After --unlock a
    # plain re-run starts from there (a stale backup of snapshots/ made every re-run fail).
    edit_config(tmp_path, lambda c: c["train"].update(lr=0.02))
    backup = tmp_path / ".snakemake" / "backups" / "results" / "runs" / run / "snapshots"
    third = subprocess.Popen([*command, target], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: backup.is_dir())
    finally:
        third.kill()
        third.wait()
    snakemake(tmp_path, "--unlock")
    rerun = snakemake(tmp_path, target)
    snapshots = Path("results", "runs", run, "snapshots")
    assert (f"removed {backup}: Snakemake's backup of {snapshots}, left by a Snakemake that was "
            "killed while its job ran") in rerun.stderr + rerun.stdout
    assert not backup.exists()
    assert torch.load(folder / "model.pt", weights_only=True)["spec"]["train"]["lr"] == 0.02
    assert "Nothing to be done" in snakemake(tmp_path, "--dry-run", target).stdout


def wait_for(condition, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# --------------------------------------------------------------------------- cross-validation

CV_RUNS = {"unet__scratch__bcedice_0.5__plain__s0",
           "attention_unet__scratch__bcedice_0.5__plain__s0"}


def trained_folds(jobs: dict[str, set[str]]) -> set[str]:
    """``<run>/fold<f>`` of the planned training jobs."""
    return {str(Path(p).parent.relative_to("results/runs")) for p in jobs.get("train", ())}


@pytest.fixture(scope="module")
def finished_cv(tmp_path_factory) -> Path:
    return run_study(TINY_CV, tmp_path_factory.mktemp("cv_study"))


@pytest.fixture
def cv_study(finished_cv: Path, tmp_path: Path) -> Path:
    return private_copy(finished_cv, tmp_path / "cv_study")


def test_cross_validation_tests_every_image_once(finished_cv: Path):
    results = finished_cv / "results"
    assert not (results / "data" / "test.h5").exists()
    with open_stacked(results / "data" / "train.h5") as f:
        names, groups, fold = f["names"].asstr()[:], f["groups"].asstr()[:], f["fold"][:]
        assert "is_val" not in f and f.attrs["folds"] == 3
    assert len(names) == 15 and sorted(np.bincount(fold)) == [5, 5, 5]
    assert sorted(set(groups)) == sorted({"synth_000", "synth_001", *names[5:10]})
    for group in set(groups):
        assert len(set(fold[groups == group])) == 1  # a group is in one fold
    for run in CV_RUNS:
        assert sorted(p.name for p in (results / "runs" / run).iterdir()) == [
            "fold0", "fold1", "fold2"]
        pooled = pd.concat([pd.read_csv(results / "runs" / run / f"fold{f}" / "per_image.csv")
                            .assign(fold=f) for f in range(3)])
        assert sorted(pooled["name"]) == sorted(names)  # every image exactly once
        assert (pooled.set_index("name")["fold"][names] == fold).all()  # by its own fold
        history = pd.read_csv(results / "runs" / run / "fold0" / "history.csv")
        assert list(history["epoch"]) == [1, 2]
    log = (results / "logs" / "train" / "unet__scratch__bcedice_0.5__plain__s0" / "fold1.log")
    assert "5 train / 5 val images" in log.read_text()
    summary = pd.read_csv(results / "experiments" / "architecture" / "summary.csv")
    assert list(summary["architecture"]) == ["unet", "attention_unet"]
    assert list(summary["n_images"]) == [15, 15]
    assert {"dice_fold0", "dice_fold1", "dice_fold2"} <= set(summary.columns)
    for name in set(FIGURES) - {"sweep", *CLASS_FIGURES}:
        assert (results / "experiments" / "architecture" / f"{name}.png").stat().st_size > 5000
    assert "3-fold cross-validation: 15 test images" in (results / "summary.md").read_text()


def test_complete_cross_validation_reruns_nothing(cv_study: Path):
    assert planned(cv_study) == {}


@pytest.mark.parametrize(("key", "value"), [("folds", 4), ("split_seed", 1), ("group", None)])
def test_changing_the_folds_reruns_everything(cv_study: Path, key, value):
    edit_config(cv_study, lambda c: c["data"].update({key: value}))
    jobs = planned(cv_study)
    folds = value if key == "folds" else 3
    assert jobs["rasterise"] == {"results/data/train.h5"}
    assert trained_folds(jobs) == {f"{run}/fold{f}" for run in CV_RUNS for f in range(folds)}


def test_editing_an_architecture_reruns_its_runs_in_every_fold(cv_study: Path):
    edit_config(cv_study, lambda c: c["architectures"]["attention_unet"].update(width=6))
    jobs = planned(cv_study)
    assert trained_folds(jobs) == {f"attention_unet__scratch__bcedice_0.5__plain__s0/fold{f}"
                                   for f in range(3)}
    assert set(jobs) == {"train", "evaluate", "aggregate", "summary", "all"}


@pytest.mark.parametrize(("config", "change", "message"), [
    (TINY_CV, lambda d: d.update(test_dir="results/demo_data/test"),
     "config: data.test_dir: must be absent (or null) with data.folds"),
    (TINY, lambda d: d.pop("test_dir"), "config: data.test_dir: required unless data.folds"),
    (TINY_CV, lambda d: d.update(group="(synth"),
     "config: data.group = '(synth': not a regular expression"),  # groups.group_keys' message
    (TINY_CV, lambda d: d.update(folds=2), "config: data.folds: 2 is less than the minimum of 3"),
    (TINY_CV, lambda d: d.update(drop_test_duplicates=True),
     "config: data.drop_test_duplicates: applies to data.test_dir, which cross-validation has "
     "none of"),
])
def test_cross_validation_config_errors_name_the_key(tmp_path: Path, config, change, message):
    shutil.copy(config, tmp_path / "config.yaml")
    edit_config(tmp_path, lambda c: change(c["data"]))
    proc = snakemake(tmp_path, "--dry-run", check=False)
    assert proc.returncode != 0 and message in proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- several classes

@pytest.fixture(scope="module")
def finished_classes(tmp_path_factory) -> Path:
    """A workdir in which the tiny study with data.classes (leaf, stone) ran to completion."""
    return run_study(TINY_CLASSES, tmp_path_factory.mktemp("classes"))


def test_study_with_classes_runs_end_to_end(finished_classes: Path):
    results = finished_classes / "results"
    with open_stacked(results / "data" / "train.h5") as f:
        assert set(np.unique(f["masks"][:])) == {0, 1, 2}  # background, leaf, stone
        assert json.loads(f.attrs["labels"])["names"] == ["leaf", "stone"]
    run = results / "runs" / "unet__scratch__bcedice_0.5__plain__s0"
    checkpoint = torch.load(run / "model.pt", weights_only=True)
    assert checkpoint["labels"]["names"] == ["leaf", "stone"]
    assert checkpoint["state_dict"]["decoder.head.weight"].shape[0] == 3  # background + 2
    per_image = pd.read_csv(run / "per_image.csv")
    for name in ("leaf", "stone"):
        # Undefined exactly where the truth lacks the class, whatever the prediction.
        assert (per_image[f"dice.{name}"].isna() == (per_image[f"ref.{name}"] == 0)).all()
        assert (per_image[f"tp.{name}"] + per_image[f"fn.{name}"] == per_image[f"ref.{name}"]).all()
    confusion = pd.read_csv(run / "confusion.csv", index_col="truth")
    assert list(confusion.index) == list(confusion.columns) == ["background", "leaf", "stone"]
    with open_stacked(results / "data" / "test.h5") as f:
        # counted at the original size (64x80), where the test images are scored
        assert confusion.to_numpy().sum() == (f["truth"][:] != IGNORE).sum() == 4 * 64 * 80
    summary = pd.read_csv(results / "experiments" / "architecture" / "summary.csv")
    for column in ("dice.leaf_mean", "dice.stone_lo", "delta_dice.leaf_hi", "n_images.stone"):
        assert column in summary
    for experiment in ("architecture", "dice_weight"):
        for name in FIGURES:
            if name != "sweep" or experiment == "dice_weight":
                assert (results / "experiments" / experiment / f"{name}.png").stat().st_size > 5000
    assert "Per class: test Dice" in (results / "summary.md").read_text()


def test_the_predict_section_predicts_with_the_reference_ensemble(finished_classes: Path):
    """tiny_classes.yaml predicts the demo test folder with the architecture experiment's
    reference: a mask, a LabelMe file (rasterised back: the mask) per image, uncertainty.csv."""
    from segpipe.data.labelme import load_annotation, rasterise
    from segpipe.labels import Labels

    results = finished_classes / "results"
    reference = pd.read_csv(results / "experiments" / "architecture" / "summary.csv")
    runs = (results / "experiments" / "architecture" / "reference_runs.txt").read_text().split()
    assert runs == [f"results/runs/{reference['reference'][0]}__scratch__bcedice_0.5__plain__s0"]
    out = results / "predictions" / "architecture"
    ranking = pd.read_csv(out / "uncertainty.csv")
    assert sorted(ranking["name"]) == [f"synth_{i:04d}" for i in range(4)]
    assert list(ranking["rank"]) == [1, 2, 3, 4]
    assert (ranking["members"] == 4).all()  # one seed, mirrored three ways (predict.tta)
    assert ranking["disagreement"].is_monotonic_decreasing
    reader = Labels.from_config(["leaf", "stone"], background=["grass"])
    for name in ranking["name"]:
        mask = np.array(PIL.Image.open(out / "masks" / f"{name}.png"))
        back = rasterise(load_annotation(out / "labelme" / f"{name}.json"), None, reader)
        assert mask.shape == (64, 80) and (back == mask).mean() > 0.98


def test_predictions_are_incremental(finished_classes: Path, tmp_path: Path):
    """A new predict folder runs predict alone, a second time nothing, an image added predict
    alone again (here without the mirrors): the models are not touched."""
    study = private_copy(finished_classes, tmp_path / "study")
    new = tmp_path / "new"
    new.mkdir()
    for i in range(2):
        shutil.copy(study / "results" / "demo_data" / "test" / f"synth_000{i}.jpg",
                    new / f"photo{i}.jpg")
    edit_config(study, lambda c: c["predict"].update(input_dir=str(new)))
    assert set(planned(study)) == {"predict", "all"}
    snakemake(study)
    assert set(planned(study)) == set()
    out = study / "results" / "predictions" / "architecture"  # one set: the old folder's gone
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "labelme/photo0.json", "labelme/photo1.json", "masks/photo0.png", "masks/photo1.png",
        "uncertainty.csv"]
    shutil.copy(new / "photo0.jpg", new / "photo2.jpg")
    assert set(planned(study)) == {"predict", "all"}
    edit_config(study, lambda c: c["predict"].update(tta=False))
    assert "--no-tta" in snakemake(study, "--dry-run").stdout
    snakemake(study)
    ranking = pd.read_csv(study / "results" / "predictions" / "architecture" / "uncertainty.csv")
    assert sorted(ranking["name"]) == ["photo0", "photo1", "photo2"]
    assert (ranking["members"] == 1).all() and ranking["entropy"].is_monotonic_decreasing


def correct_annotation(out: Path) -> tuple[Path, str]:
    corrected = out / "labelme" / "synth_0001.json"
    document = json.loads(corrected.read_text())
    document["shapes"].append({**document["shapes"][0], "label": "stone"})
    corrected.write_text(json.dumps(document))
    return corrected, "exists and is not an unedited segpipe prediction"


def correct_mask(out: Path) -> tuple[Path, str]:
    corrected = out / "masks" / "synth_0002.png"
    mask = np.array(PIL.Image.open(corrected))
    mask[:8, :8] = 2
    PIL.Image.fromarray(mask).save(corrected)  # an editor's save
    return corrected, "exists and is not a mask segpipe predicted, unchanged since"


def own_uncertainty(out: Path) -> tuple[Path, str]:
    own = out / "uncertainty.csv"
    own.write_text("image,checked\nsynth_0000.jpg,yes\n")
    return own, "exists and is not the uncertainty.csv segpipe writes"


@pytest.mark.parametrize("edit", [correct_annotation, correct_mask, own_uncertainty])
def test_a_corrected_prediction_stops_predict_and_is_kept(finished_classes: Path, tmp_path: Path,
                                                         edit):
    """An annotator corrects a predicted file in place (or puts a file of theirs among the
    predictions); a re-run of predict (here: its reference file rewritten) fails, naming it,
    and no prediction is deleted or replaced (update() outputs: the set is predict's to
    replace as one)."""
    study = private_copy(finished_classes, tmp_path / "study")
    out = study / "results" / "predictions" / "architecture"
    corrected, problem = edit(out)
    before = contents(out)
    reference = study / "results" / "experiments" / "architecture" / "reference_runs.txt"
    reference.write_text(reference.read_text() + "\n")  # new content: predict runs again
    proc = snakemake(study, check=False)
    assert proc.returncode == 1
    assert f"{corrected.relative_to(study)}: {problem}" \
        in (study / "results" / "logs" / "predict.log").read_text()
    assert contents(out) == before


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_a_label_no_class_names_stops_the_workflow(tmp_path: Path):
    """Classes that leave out a label of the user's files: the dry run stops, naming it."""
    for split, seed in (("train", 0), ("test", 1)):
        subprocess.run([sys.executable, "-m", "segpipe", "synth", "--output",
                        str(tmp_path / split), "--count", "4", "--seed", str(seed), "--size",
                        "32", "40"], check=True, capture_output=True)
    config = yaml.safe_load(TINY_CLASSES.read_text())
    config["data"].update(train_dir=str(tmp_path / "train"), test_dir=str(tmp_path / "test"),
                          background=[])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake(tmp_path, "--dry-run", check=False)
    assert proc.returncode != 0
    assert re.search(r"config: data.classes: label 'grass' of \S+/train/synth_000\d.json, .* "
                     r"is named by no class, data.background or data.ignore", proc.stdout)
    assert not (tmp_path / "results").exists()


def test_a_background_label_no_file_has_is_logged_not_refused(tmp_path: Path):
    """The README's advice: list _background_ under data.background before training on
    corrected predictions; before the first correction no file has it."""
    subprocess.run([sys.executable, "-m", "segpipe", "synth", "--output", str(tmp_path / "train"),
                    "--count", "12", "--size", "32", "40"], check=True, capture_output=True)
    config = yaml.safe_load(TINY.read_text())
    config["data"].update(train_dir=str(tmp_path / "train"), background=["grass", "_background_"])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake(tmp_path, "--dry-run")
    assert (f"config: data.background: no LabelMe file of {tmp_path / 'train'} has a shape "
            "labelled '_background_' (their labels: grass, leaf, stone)") in proc.stdout
    assert "rule rasterise" in proc.stdout


def result_files(root: Path) -> list[Path]:
    """The result files below ``root``/results, but logs, benchmarks, locks and timestamps."""
    return sorted(p.relative_to(root) for p in (root / "results").rglob("*")
                  if p.is_file() and p.relative_to(root).parts[1] not in ("logs", "benchmarks")
                  and p.name not in (".segpipe.lock", "train.log", ".snakemake_timestamp"))


def _comparable(path: Path, added: set[str] = ADDED_SINCE) -> object:
    """What must not change in a result file: its bytes, or for files that record timings
    (TIMING) everything else (CSV cells, checkpoint entries and tensors, npz arrays, summary.md
    without its train-seconds column); ``added``: entries left out of the comparison."""
    if path.suffix == ".csv":
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
        return table.drop(columns=[c for c in table if c in TIMING]).to_dict("list")
    if path.suffix == ".pt":
        checkpoint = torch.load(path, weights_only=True)
        weights = {k: v.numpy().tobytes() for k, v in checkpoint.pop("state_dict").items()}
        return weights, {k: v for k, v in checkpoint.items() if k not in TIMING | added}
    if path.suffix == ".npz":  # a zip: its members carry the time they were written
        with np.load(path) as npz:
            return {key: npz[key].tobytes() for key in npz.files}
    if path.suffix == ".h5":  # attribute source: the absolute data folder, in another workdir
        with open_stacked(path) as f:  # a group of images of several sizes: a list
            return ({key: [a.tolist() for a in f[key]] if isinstance(f[key], list)
                     else f[key][()].tolist() for key in f if key not in added},
                    {k: str(v) for k, v in f.attrs.items() if k not in {"source", *added}},
                    Path(f.attrs["source"]).relative_to(path.parents[2]))
    if path.suffix == ".md":
        return re.sub(r"\| [\d.]+ \|$", "|", path.read_text(), flags=re.M)
    return path.read_bytes()


def test_binary_study_trains_what_it_trained_before_classes(finished: Path, tmp_path: Path):
    """Without data.classes, at data.size, the tiny study trains what the commit before several
    classes (and before native resolution) trained, file by file: the caches' images, masks and
    split, and every model.pt, snapshot and history.csv (but timings, and the settings and keys
    added since); the commit is pinned in BEFORE_CLASSES. Only the test scores moved: they are
    computed at the images' original size now."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", BEFORE_CLASSES],
                             capture_output=True)
    if archive.returncode != 0:
        pytest.skip(f"the commit before several classes is not in this clone: {archive.stderr!r}")
    before = tmp_path / "before"
    before.mkdir()
    subprocess.run(["tar", "-x", "-C", str(before)], input=archive.stdout, check=True)
    workdir = tmp_path / "study"
    workdir.mkdir()
    shutil.copy(TINY, workdir / "config.yaml")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=str(before))
    # cwd: `python -m` puts the working directory first on sys.path, before PYTHONPATH
    subprocess.run([sys.executable, "-m", "snakemake", "-s", str(before / "Snakefile"), "-d",
                    str(workdir), "--configfile", str(workdir / "config.yaml"), "--cores", "2"],
                   check=True, capture_output=True, env=env, timeout=900, cwd=before)

    def files(root: Path) -> list[Path]:
        return [p for p in result_files(root)
                if p.suffix in (".pt", ".h5") or p.name == "history.csv"]

    assert files(finished) == files(workdir) and len(files(finished)) > 10
    changed = [str(p) for p in files(finished)
               if _trained(finished / p) != _trained(workdir / p)]
    assert not changed


def _trained(path: Path) -> object:
    """What training made of a file (:func:`_comparable`): a cache's images, masks, names and
    split; a checkpoint without the keys and train settings added since."""
    if path.suffix == ".h5":
        with open_stacked(path) as f:
            return {key: f[key][()].tolist() for key in ("images", "masks", "names", "is_val",
                                                         "orig_size") if key in f}
    if path.suffix == ".pt":
        weights, entries = _comparable(path, ADDED_SINCE | {"geometry"})
        train = entries["spec"]["train"]
        for key in NATIVE_SETTINGS:
            train.pop(key, None)
        return weights, entries
    return _comparable(path)


def segpipe_by_hand(workdir: Path, *args: object) -> subprocess.CompletedProcess:
    """``segpipe <step> <args>`` in ``workdir``, as a user types it, with the tiny study's one
    thread per job (resources.train_threads: the float sums of training depend on it)."""
    return subprocess.run([sys.executable, "-m", "segpipe", *map(str, args)], cwd=workdir,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_each_step_by_hand_makes_what_snakemake_makes(tmp_path: Path):
    """Every step typed by hand, each option that the config leaves out left out too, writes
    the files Snakemake writes: the defaults of the CLI and of the workflow are the schema's.
    Compared file by file, everything but timings (cache digests and fingerprints too)."""
    config = yaml.safe_load(TINY.read_text())
    del config["data"]["val_fraction"], config["evaluate"], config["experiments"]["dice_weight"]
    config["data"]["synthetic"] = {"train_count": 12, "test_count": 4}  # seed, size: defaults
    workflow, hand = tmp_path / "workflow", tmp_path / "hand"
    workflow.mkdir()
    hand.mkdir()
    (workflow / "config.yaml").write_text(yaml.safe_dump(config))
    snakemake(workflow)

    data, r = "results/demo_data", "results"
    steps = [("synth", "--output", f"{data}/train", "--count", 12),
             # the workflow's demo test seed is 2 * data.synthetic.seed + 1: unseen images
             ("synth", "--output", f"{data}/test", "--count", 4, "--seed", 1),
             ("rasterise", "--input", f"{data}/train", "--output", f"{r}/data/train.h5",
              "--size", 32, 32),
             ("rasterise", "--input", f"{data}/test", "--output", f"{r}/data/test.h5", "--size",
              32, 32, "--train-cache", f"{r}/data/train.h5")]
    runs = []
    for architecture in ("unet", "attention_unet"):
        names = {"architecture": architecture, "backbone": "scratch", "loss": "bcedice_0.5",
                 "augmentation": "plain"}
        run = "__".join([*names.values(), "s0"])
        spec = {"run": run, "seed": 0, "names": names,
                **{axis: config[f"{axis}s" if axis != "loss" else "losses"][name]
                   for axis, name in names.items()},
                "train": config["train"]}  # the settings config.yaml gives, no more
        (hand / f"{run}.json").write_text(json.dumps(spec))
        steps += [("train", "--cache", f"{r}/data/train.h5", "--spec", f"@{run}.json",
                   "--output-dir", f"{r}/runs/{run}", "--device", "cpu", "--num-workers", 0),
                  ("evaluate", "--run-dir", f"{r}/runs/{run}", "--cache", f"{r}/data/test.h5",
                   "--device", "cpu")]
        runs.append({"run": run, "dir": f"{r}/runs/{run}", "seed": 0, **names})
    experiment = {"name": "architecture", "axes": ["architecture"], "sweep": None,
                  "baseline": {"architecture": "unet"}, "runs": runs}
    (hand / "architecture.json").write_text(json.dumps(experiment))
    steps += [("aggregate", "--experiment", "architecture", "--spec", "@architecture.json",
               "--output-dir", f"{r}/experiments/architecture"),
              ("summary", "--experiments", f"{r}/experiments/architecture", "--output",
               f"{r}/summary.md")]
    for step in steps:
        done = segpipe_by_hand(hand, *step)
        assert done.returncode == 0, (step, done.stderr[-3000:])

    assert result_files(hand) == result_files(workflow)
    changed = [str(p) for p in result_files(workflow)
               if _comparable(workflow / p, added=set()) != _comparable(hand / p, added=set())]
    assert not changed, changed


def test_the_label_rule_is_one_by_hand_and_by_snakemake(finished: Path, tmp_path: Path):
    """A label the config names that no training file has: Snakemake stops at start (the bad
    edit above), and `segpipe rasterise` by hand stops with the same message."""
    done = segpipe_by_hand(finished, "rasterise", "--input",
                           finished / "results" / "demo_data" / "train", "--output",
                           tmp_path / "train.h5", "--size", 32, 32, "--foreground", "stnoe",
                           "--background", "grass")
    assert done.returncode == 1
    assert f"segpipe: error: {LABEL_IN_NO_FILE.removeprefix('config: ').format(w=finished)}" \
        in done.stderr
    assert not (tmp_path / "train.h5").exists()


# ----------------------------------------------------------------------------- native resolution

TINY_NATIVE = REPO / "tests" / "configs" / "tiny_native.yaml"


@pytest.mark.parametrize("classes", [None, ["leaf", "stone"]], ids=["binary", "classes"])
def test_native_study_runs_end_to_end(tmp_path: Path, classes):
    """data.scale + train.patch: cached at half the photos' 64x80, trained on 16x16 patches,
    scored at 64x80 (the masks predict delivers), binary and with several classes."""
    shutil.copy(TINY_NATIVE, tmp_path / "config.yaml")
    if classes:
        edit_config(tmp_path, lambda c: c["data"].update(classes=classes, background=["grass"]))
    snakemake(tmp_path)
    results = tmp_path / "results"
    with open_stacked(results / "data" / "test.h5") as f:
        assert f.attrs["scale"] == 0.5 and f["images"].shape == (4, 32, 40, 3)
        assert f["truth"].shape == (4, 64, 80)
    run = results / "runs" / "unet__scratch__bcedice_0.5__plain__s0"
    checkpoint = torch.load(run / "model.pt", weights_only=True)
    assert checkpoint["geometry"] == {"scale": 0.5} and checkpoint["size"] == [16, 16]
    per_image = pd.read_csv(run / "per_image.csv")
    assert len(per_image) == 4 and per_image["dice"].between(0, 1).all()
    assert (results / "experiments" / "architecture" / "bars.png").stat().st_size > 5000
    for name in per_image["name"]:
        mask = np.array(PIL.Image.open(results / "predictions" / "architecture" / "masks"
                                       / f"{name}.png"))
        assert mask.shape == (64, 80)


@pytest.mark.parametrize(("change", "message"), [
    (lambda c: c["train"].pop("patch"), "config: train.patch: missing: a study at data.scale "
                                        "trains on patches"),
    (lambda c: (c["data"].pop("scale"), c["data"].update(size=[32, 32])),
     "config: train.patch: applies with data.scale"),
    (lambda c: c["data"].update(size=[32, 32]), "config: data: needs exactly one of size"),
    (lambda c: (c["train"].update(patch=[8, 8]), c["architectures"]["unet"].update(depth=3)),
     "config: architectures.unet.depth: 3 is too deep for images of 8x8"),
])
def test_native_settings_are_checked_at_start(tmp_path: Path, change, message):
    shutil.copy(TINY_NATIVE, tmp_path / "config.yaml")
    edit_config(tmp_path, change)
    proc = snakemake(tmp_path, "--dry-run", check=False)
    assert proc.returncode != 0 and message in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists()
