"""Real Snakemake runs of the whole workflow on a tiny study (tests/configs/tiny.yaml).

The study has two experiments sharing one run (unet with the default loss), one of them a numeric
sweep, so a complete run has 4 training jobs. The incremental cases are checked with dry runs
against a finished copy of the workflow's results and metadata.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pandas as pd
import pytest
import yaml

from segpipe.aggregate import FIGURES

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny.yaml"
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


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A workdir in which the tiny study ran to completion."""
    workdir = tmp_path_factory.mktemp("study")
    shutil.copy(TINY, workdir / "config.yaml")
    snakemake(workdir)
    return workdir


@pytest.fixture
def study(finished: Path, tmp_path: Path) -> Path:
    """A private copy of the finished study (results and Snakemake metadata)."""
    workdir = tmp_path / "study"
    shutil.copytree(finished, workdir, symlinks=True)
    return workdir


def edit_config(workdir: Path, change) -> None:
    path = workdir / "config.yaml"
    config = yaml.safe_load(path.read_text())
    change(config)
    path.write_text(yaml.safe_dump(config))


def test_study_runs_end_to_end(finished: Path):
    results = finished / "results"
    assert {p.name for p in (results / "runs").iterdir()} == RUNS

    with h5py.File(results / "data" / "train.h5") as f:
        assert f["images"].shape == (12, 32, 32, 3) and f["images"].dtype == "uint8"
        assert f["masks"].shape == (12, 32, 32)
        assert set(f["masks"][:].ravel()) <= {0, 1} and f["masks"][:].any()
        assert int(f["is_val"][:].sum()) == 3  # val_fraction 0.25 of 12
    with h5py.File(results / "data" / "test.h5") as f:
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
    for name in FIGURES:  # every figure segpipe aggregate writes is a workflow output
        for experiment in ("architecture", "dice_weight"):
            if name != "sweep" or experiment == "dice_weight":
                assert (results / "experiments" / experiment / f"{name}.png").stat().st_size > 5000
    assert not (results / "experiments" / "architecture" / "sweep.png").exists()
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


def test_config_errors_name_the_key(tmp_path: Path):
    shutil.copy(TINY, tmp_path / "config.yaml")
    edit_config(tmp_path, lambda c: c["train"].update(epoch=3))
    proc = snakemake(tmp_path, "--dry-run", check=False)
    assert proc.returncode != 0 and "'epoch' was unexpected" in proc.stdout + proc.stderr

    shutil.copy(TINY, tmp_path / "config.yaml")
    edit_config(tmp_path, lambda c: c["experiments"]["architecture"]["vary"].update(
        architecture=["unet", "transunet"]))
    proc = snakemake(tmp_path, "--dry-run", check=False)
    assert proc.returncode != 0
    assert "experiments.architecture.vary names architecture 'transunet'" in proc.stdout + proc.stderr
