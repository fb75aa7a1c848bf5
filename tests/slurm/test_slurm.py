"""The tiny study on a real single-node SLURM cluster, submitted through profiles/slurm.

`make test-slurm` installs Debian's SLURM packages and runs this module (marker `slurm`, which
`make test` deselects); it needs root. A module fixture starts munged, slurmctld and slurmd with
tests/slurm/cluster.sh, all state in a temp folder, and stops them by pid, pass or fail. The
cluster has no accounting database, so the plugin polls with squeue (the cluster keeps finished
jobs for MinJobAge = 300 s >= 3 x the 2 s first wait). Every wait is bounded.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
TINY = REPO / "tests" / "configs" / "tiny.yaml"
RUN = "unet__scratch__bcedice_0.5__plain__s0"
# The test cluster has no slurmdbd: poll with squeue, and start polling after 2 s, not 40 s.
SLURM_ARGS = ("--profile", str(REPO / "profiles" / "slurm"), "--slurm-status-command", "squeue",
              "--slurm-init-seconds-before-status-checks", "2", "--verbose")
SUBMITTED = re.compile(r"has been submitted with SLURM jobid (\d+)")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A running cluster; yields the environment for snakemake and the SLURM commands."""
    if os.geteuid() != 0 or shutil.which("slurmctld") is None:
        pytest.skip("needs root and the SLURM packages: run `make test-slurm`")
    state = tmp_path_factory.mktemp("slurm")
    started = subprocess.run([CLUSTER, "start", state], capture_output=True, text=True, timeout=120)
    try:
        assert started.returncode == 0, f"cluster did not start:\n{started.stderr}"
        yield dict(os.environ, SLURM_CONF=str(state / "etc" / "slurm.conf"),
                   PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    finally:
        subprocess.run([CLUSTER, "stop", state], timeout=120)


def start_snakemake(env: dict[str, str], workdir: Path, *args: str) -> subprocess.Popen:
    """Snakemake on the repo's Snakefile in `workdir`, output to workdir/snakemake.out."""
    with (workdir / "snakemake.out").open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "snakemake", "-s", REPO / "Snakefile", "-d", workdir,
             "--configfile", workdir / "config.yaml", *args],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )


def finish(proc: subprocess.Popen, env: dict[str, str], timeout: float) -> int:
    """Wait for snakemake; past `timeout`, stop it and every job of the cluster, then fail."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        subprocess.run(["scancel", "--user", "root"], env=env, timeout=30)
        pytest.fail(f"snakemake did not finish within {timeout} s: {proc.args}")


def output(workdir: Path) -> str:
    return (workdir / "snakemake.out").read_text()


def new_study(path: Path) -> Path:
    path.mkdir()
    shutil.copy(TINY, path / "config.yaml")
    return path


@pytest.fixture(scope="module")
def studies(cluster, tmp_path_factory) -> tuple[Path, Path]:
    """The tiny study run to completion on SLURM and, at the same time, locally."""
    root = tmp_path_factory.mktemp("studies")
    slurm_dir, local_dir = new_study(root / "slurm"), new_study(root / "local")
    local = start_snakemake(cluster, local_dir, "--cores", "1")
    try:
        slurm = start_snakemake(cluster, slurm_dir, *SLURM_ARGS)
        assert finish(slurm, cluster, 400) == 0, output(slurm_dir)[-5000:]
        assert finish(local, cluster, 400) == 0, output(local_dir)[-5000:]
    finally:
        if local.poll() is None:
            os.killpg(local.pid, signal.SIGKILL)
            local.wait()
    return slurm_dir, local_dir


def test_cluster_jobs_repeat_no_start_check(studies, cluster, tmp_path):
    """The submitting Snakemake reads the user's LabelMe files once and keeps what it learnt
    (.snakemake/segpipe); inside each job Snakemake parses the workflow again (--mode remote):
    it skips the start checks and reads no file (a stat each)."""
    study = new_study(tmp_path / "user_data")
    data = studies[0] / "results" / "demo_data"  # written minutes ago: not "racily" recent
    config = yaml.safe_load((study / "config.yaml").read_text())
    config["data"].update(train_dir=str(data / "train"), test_dir=str(data / "test"))
    (study / "config.yaml").write_text(yaml.safe_dump(config))
    proc = start_snakemake(cluster, study, *SLURM_ARGS, "--slurm-keep-successful-logs",
                           "results/data/test.h5")
    assert finish(proc, cluster, 300) == 0, output(study)[-5000:]
    files = 2 * (12 + 4)  # the JSON files and their images
    assert f"segpipe: {files} data files, {files} read, 0 unchanged" in output(study)
    assert "start checks skipped" not in output(study)
    logs = sorted((study / ".snakemake" / "slurm_logs").rglob("*.log"))
    assert len(logs) == 2  # the two rasterise jobs
    for log in logs:
        text = log.read_text()
        assert "segpipe: start checks skipped in this cluster job" in text, text[-3000:]
        assert f"segpipe: {files} data files, 0 read, {files} unchanged" in text


def sbatch_lines(workdir: Path) -> dict[str, list[str]]:
    """The sbatch calls snakemake made, by rule (without the long --wrap command)."""
    calls: dict[str, list[str]] = {}
    for line in re.findall(r"^sbatch call: (sbatch .*?) --wrap=", output(workdir), re.M):
        rule = re.search(r"--comment rule_(\w+?)(?:_wildcards_\S+)? ", line).group(1)
        calls.setdefault(rule, []).append(line)
    return calls


def test_every_job_ran_as_a_slurm_job(studies):
    slurm_dir, _ = studies
    submitted = set(SUBMITTED.findall(output(slurm_dir)))
    logs = sorted((slurm_dir / "results" / "logs").rglob("*.log"))
    # 2 synthesise, 2 rasterise, 4 train, 4 evaluate, 2 aggregate, 1 summary; `all` is local.
    assert len(logs) == 15
    logged = {re.search(r"SLURM_JOB_ID=(\d+)", log.read_text()).group(1) for log in logs}
    assert len(logged) == 15 and logged <= submitted  # (a retried job logs its last attempt)


def test_training_and_evaluation_jobs_got_a_gpu(studies, cluster):
    slurm_dir, _ = studies
    calls = sbatch_lines(slurm_dir)
    assert len(calls["train"]) >= 4 and len(calls["evaluate"]) >= 4
    for rule, lines in calls.items():
        for line in lines:
            if rule == "train":
                assert " -p gpu " in line and " --gpus=1" in line and "--cpus-per-gpu=8" in line
            elif rule == "evaluate":
                assert " -p gpu " in line and " --gpus=1" in line and "--cpus-per-task=1" in line
            else:
                assert " -p cpu " in line and "--gpus" not in line and "--gres" not in line
    for rule in ("train", "evaluate"):
        for log in (slurm_dir / "results" / "logs" / rule).iterdir():
            job = re.search(r"SLURM_JOB_ID=(\d+)", log.read_text()).group(1)
            shown = subprocess.run(["scontrol", "show", "job", job], env=cluster,
                                   capture_output=True, text=True, timeout=30).stdout
            assert "JobState=COMPLETED" in shown and "Partition=gpu" in shown
            assert "TresPerJob=gres:gpu:1" in shown


def timing_free(frame: pd.DataFrame) -> pd.DataFrame:
    """A results table without its wall-clock and memory columns."""
    return frame[[c for c in frame.columns if "seconds" not in c and "memory" not in c]]


def test_outputs_equal_a_local_run(studies):
    slurm_dir, local_dir = studies
    tables = sorted(p.relative_to(local_dir) for p in (local_dir / "results").rglob("*.csv"))
    assert len(tables) == 4 * 4 + 2  # per run: history, metrics, per_image, metrics_by_epoch
    for table in tables:
        pd.testing.assert_frame_equal(timing_free(pd.read_csv(slurm_dir / table)),
                                      timing_free(pd.read_csv(local_dir / table)), check_exact=True)
    for split in ("train", "test"):
        with h5py.File(slurm_dir / f"results/data/{split}.h5") as s, \
             h5py.File(local_dir / f"results/data/{split}.h5") as l:  # every dataset's values
            assert s.attrs["content_sha256"] == l.attrs["content_sha256"]
    with np.load(slurm_dir / f"results/runs/{RUN}/evolution.npz") as s, \
         np.load(local_dir / f"results/runs/{RUN}/evolution.npz") as l:
        np.testing.assert_array_equal(s["probs"], l["probs"])


def queue(env: dict[str, str], *args: str) -> list[str]:
    """Job ids squeue lists (with `args` as filters)."""
    return subprocess.run(["squeue", "--noheader", "--format=%i", *args], env=env,
                          capture_output=True, text=True, timeout=30, check=True).stdout.split()


def test_a_failing_job_fails_snakemake_cleanly(studies, cluster, tmp_path):
    study = tmp_path / "study"
    shutil.copytree(studies[0], study, symlinks=True)
    (study / "results" / "data" / "test.h5").write_bytes(b"not an HDF5 file")
    metrics = f"results/runs/{RUN}/metrics.csv"
    proc = start_snakemake(cluster, study, *SLURM_ARGS, "--retries", "0", metrics)
    assert finish(proc, cluster, 120) == 1
    out = output(study)
    assert "Error in rule evaluate" in out and "At least one job did not complete" in out
    log = (study / "results" / "logs" / "evaluate" / f"{RUN}.log").read_text()
    assert "segpipe: error: results/data/test.h5: cannot open HDF5 cache" in log
    assert not (study / metrics).exists()  # the failed job's outputs are removed
    assert queue(cluster, "--states=PENDING,RUNNING") == []
    # Snakemake released its lock: a dry run plans just the failed evaluation.
    dry = subprocess.run([sys.executable, "-m", "snakemake", "-s", REPO / "Snakefile", "-d", study,
                          "--configfile", study / "config.yaml", "-n", metrics], env=cluster,
                         capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0 and re.search(r"^evaluate\s+1$", dry.stdout, re.M), dry.stdout


def test_preempted_training_resumes_from_its_state(studies, cluster, tmp_path):
    study = tmp_path / "study"
    shutil.copytree(studies[0], study, symlinks=True)
    epochs = 200  # long enough to be cancelled mid-training
    config = yaml.safe_load((study / "config.yaml").read_text())
    config["train"]["epochs"] = epochs
    (study / "config.yaml").write_text(yaml.safe_dump(config))
    run_dir = study / "results" / "runs" / RUN
    proc = start_snakemake(cluster, study, *SLURM_ARGS, f"results/runs/{RUN}/history.csv")

    deadline = time.monotonic() + 120
    while not (run_dir / "state.pt").exists():  # saved after each epoch
        assert proc.poll() is None and time.monotonic() < deadline, output(study)[-3000:]
        time.sleep(0.1)
    (job,) = queue(cluster, "--partition=gpu", "--states=RUNNING")
    subprocess.run(["scancel", job], env=cluster, timeout=30, check=True)
    assert finish(proc, cluster, 300) == 0, output(study)[-5000:]

    # The profile's `retries: 1` resubmitted the cancelled job, which resumed.
    out = output(study)
    assert f"SLURM-job '{job}' failed, SLURM status is: 'CANCELLED'" in out
    assert len(SUBMITTED.findall(out)) == 2
    resumed = re.findall(r"resuming after epoch (\d+)", (run_dir / "train.log").read_text())
    assert len(resumed) == 1 and 1 <= int(resumed[0]) < epochs
    history = pd.read_csv(run_dir / "history.csv")
    assert list(history["epoch"]) == list(range(1, epochs + 1))
    assert not (run_dir / "state.pt").exists()
