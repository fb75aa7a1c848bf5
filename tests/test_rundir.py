"""A run directory has one writer (real processes), and its snapshots folder is complete."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from segpipe import SegpipeError
from segpipe.data.cache import build_cache
from segpipe.data.synthetic import write_dataset
from segpipe.evaluate import evaluate_run
from segpipe.rundir import LOCK_FILE, check_snapshots, run_lock
from segpipe.train import train_run

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_spec(**train: object) -> dict:
    return {
        "run": "unet__scratch__dice__plain__s0", "seed": 0,
        "names": {"architecture": "unet", "backbone": "scratch", "loss": "dice",
                  "augmentation": "plain"},
        "architecture": {"model": "unet", "width": 4, "depth": 2}, "backbone": {},
        "loss": {"dice": 1.0}, "augmentation": {},
        "train": {"epochs": 2, "batch_size": 4, "lr": 0.01, "optimizer": "adam",
                  "weight_decay": 0.0, "encoder_lr_mult": 0.1, "scheduler": "none",
                  "early_stop_patience": 0, "snapshot_epochs": [1, 2], "amp": False,
                  **train},
    }


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> tuple[Path, Path]:
    """Training (12 images, 3 for validation) and test caches (4 images) at 16×16."""
    root = tmp_path_factory.mktemp("data")
    write_dataset(root / "train", count=12, seed=0, size=(32, 32))
    write_dataset(root / "test", count=4, seed=1, size=(32, 32))
    build_cache(root / "train", root / "train.h5", size=(16, 16), val_fraction=0.25)
    build_cache(root / "test", root / "test.h5", size=(16, 16))
    return root / "train.h5", root / "test.h5"


def segpipe(*args: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "segpipe", *map(str, args)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_second_writer_stops_naming_the_first(caches, tmp_path):
    train, test = caches
    run, spec = tmp_path / "run", tmp_path / "spec.json"
    spec.write_text(json.dumps(make_spec(epochs=100_000)))
    train_command = ["train", "--cache", train, "--spec", f"@{spec}", "--output-dir", run]
    first = segpipe(*train_command)
    holder = f"segpipe train (pid {first.pid} on {socket.gethostname()})"
    try:
        deadline = time.monotonic() + 120
        while not (run / "state.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (run / LOCK_FILE).read_text().strip() == holder
        seconds = [segpipe(*train_command), segpipe("evaluate", "--run-dir", run, "--cache", test)]
        for second in seconds:
            _, stderr = second.communicate(timeout=120)
            assert second.returncode == 1
            assert stderr.splitlines()[-1] == (
                f"segpipe: error: {run}: in use by {holder}; a run directory has one writer: "
                f"wait for it to end (or stop it), then run again")
        assert first.poll() is None  # the first writer goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    with run_lock(run, "test"):  # the kernel released the lock of the killed process
        assert f"pid {os.getpid()}" in (run / LOCK_FILE).read_text()


def test_snapshots_folder_must_hold_exactly_the_reached_epochs(tmp_path):
    for epoch in (1, 5):
        (tmp_path / f"epoch_{epoch}.pt").touch()
    check_snapshots(tmp_path, [1, 5, 10], epochs=7)
    with pytest.raises(SegpipeError, match=r"holds snapshots of epochs \[1, 5\], but the run "
                                           r"reached 10 epoch\(s\) and snapshots at \[1, 5, 10\]"):
        check_snapshots(tmp_path, [1, 5, 10], epochs=10)
    with pytest.raises(SegpipeError, match=r"of epochs \[1, 5\], .* snapshots at \[1\]"):
        check_snapshots(tmp_path, [1, 5], epochs=4)


def test_evaluate_refuses_snapshots_that_model_pt_does_not_record(caches, tmp_path):
    train, test = caches
    run, other = tmp_path / "run", tmp_path / "other"
    train_run(make_spec(), train, run)
    train_run(make_spec(lr=0.02), train, other)
    (run / "snapshots" / "epoch_1.pt").unlink()
    with pytest.raises(SegpipeError, match=r"snapshots: holds snapshots of epochs \[2\], but the "
                                           r"run reached 2 epoch\(s\) and snapshots at \[1, 2\]"):
        evaluate_run(run, test)
    shutil.copy(other / "snapshots" / "epoch_1.pt", run / "snapshots")
    with pytest.raises(SegpipeError, match=r"epoch_1.pt: holds epoch 1 of run unet__scratch__"
                                           r"dice__plain__s0, not epoch 1 of the run of"):
        evaluate_run(run, test)  # same name, other spec (lr)
    assert not (run / "metrics.csv").exists() and not (run / "metrics_by_epoch.csv").exists()


def test_a_state_whose_snapshots_are_gone_is_not_resumed(caches, tmp_path):
    """Killed after epoch 1, its pending snapshot deleted: the run starts over instead of
    finishing without the snapshot of epoch 1."""
    train, _ = caches
    run, spec = tmp_path / "run", tmp_path / "spec.json"
    spec.write_text(json.dumps(make_spec(epochs=20, snapshot_epochs=[1, 20])))
    first = segpipe("train", "--cache", train, "--spec", f"@{spec}", "--output-dir", run)
    deadline = time.monotonic() + 120
    while not (run / "state.pt").exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    first.send_signal(signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL and (run / "state.pt").exists()
    shutil.rmtree(run / "state_snapshots")
    train_run(make_spec(epochs=20, snapshot_epochs=[1, 20]), train, run)
    assert "lacks snapshots it records; starting over" in (run / "train.log").read_text()
    assert sorted(p.name for p in (run / "snapshots").iterdir()) == ["epoch_1.pt", "epoch_20.pt"]
