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
import torch

from segpipe import SegpipeError
from segpipe.data.cache import build_cache
from segpipe.data.synthetic import write_dataset
from segpipe.evaluate import evaluate_run
from segpipe.rundir import LOCK_FILE, check_snapshots, run_lock
from segpipe.spec import check_spec
from segpipe.train import fingerprint, train_run

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
    build_cache(root / "train", root / "train.h5", geometry=(16, 16), val_fraction=0.25)
    build_cache(root / "test", root / "test.h5", geometry=(16, 16))
    return root / "train.h5", root / "test.h5"


def segpipe(*args: object, stderr: Path | None = None) -> subprocess.Popen:
    """A `segpipe` process; its stderr into the file ``stderr``, else a pipe."""
    error = subprocess.PIPE if stderr is None else open(stderr, "w")  # noqa: SIM115
    return subprocess.Popen([sys.executable, "-m", "segpipe", *map(str, args)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=error, text=True)


def wait_for(condition, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_second_writer_waits_for_the_first(caches, tmp_path):
    """A second train and an evaluate on a run in use wait, naming the holder; once it ends,
    each goes on in turn (train resumes the holder's state; evaluate finds no model yet)."""
    train, test = caches
    run, spec = tmp_path / "run", tmp_path / "spec.json"
    spec.write_text(json.dumps(make_spec(epochs=100_000)))
    train_command = ["train", "--cache", train, "--spec", f"@{spec}", "--output-dir", run]
    first = segpipe(*train_command)
    holder = f"segpipe train (pid {first.pid} on {socket.gethostname()})"
    waiting, logs = [], [tmp_path / "second.log", tmp_path / "evaluate.log"]
    try:
        wait_for(lambda: (run / "state.pt").exists())
        assert (run / LOCK_FILE).read_text().strip() == holder
        evaluate_command = ["evaluate", "--run-dir", run, "--cache", test]
        for log, args in zip(logs, [train_command, evaluate_command]):
            waiting.append(segpipe(*args, stderr=log))
        for log in logs:
            wait_for(lambda: f"{run}: in use by {holder}; waiting for it to end" in log.read_text())
        assert first.poll() is None and all(w.poll() is None for w in waiting)
        first.send_signal(signal.SIGKILL)
        first.wait()
        wait_for(lambda: f"{holder} ended after" in logs[0].read_text())
        wait_for(lambda: "resuming after epoch" in (run / "train.log").read_text())
        waiting[0].send_signal(signal.SIGKILL)  # it would train 100000 epochs
        assert waiting[1].wait(timeout=120) == 1
        assert f"{run / 'model.pt'}: checkpoint not found" in logs[1].read_text()
    finally:
        for process in [first, *waiting]:
            process.kill()
            process.wait()
    with run_lock(run, "test"):  # the kernel released the lock of the killed processes
        assert f"pid {os.getpid()}" in (run / LOCK_FILE).read_text()


def test_a_finished_run_is_kept_for_the_same_cache_content(caches, tmp_path, caplog):
    """Rebuilt with the same content (a new file, a new mtime), the cache leaves a finished run
    as it is; with other content (another validation split) the run trains again."""
    train, _ = caches
    cache, run = tmp_path / "train.h5", tmp_path / "run"
    build = dict(geometry=(16, 16), val_fraction=0.25)
    build_cache(train.parent / "train", cache, **build)

    def outputs() -> dict[str, tuple[bytes, int]]:
        files = [run / "model.pt", run / "history.csv", *sorted((run / "snapshots").iterdir())]
        return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}

    train_run(make_spec(), cache, run)
    assert torch.load(run / "model.pt", weights_only=True)["fingerprint"] == fingerprint(
        check_spec(make_spec()), cache)
    finished = outputs()
    time.sleep(0.01)
    build_cache(train.parent / "train", cache, **build)
    train_run(make_spec(), cache, run)
    assert outputs() == finished
    assert (run / "train.log").read_text().count("epoch 1/2:") == 1
    assert "complete for this spec and cache: kept, nothing to train" in caplog.text
    build_cache(train.parent / "train", cache, **build, split_seed=1)
    train_run(make_spec(), cache, run)
    assert (run / "train.log").read_text().count("epoch 1/2:") == 2
    assert outputs()["model.pt"][1] != finished["model.pt"][1]


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
