"""Training on tiny synthetic data (32×32, U-Net of width 8): it learns, it resumes exactly
after being killed, it selects on validation only, and it rejects bad input."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from cachefile import open_stacked
from segpipe import SegpipeError
from segpipe.data.cache import build_cache
from segpipe.data.synthetic import write_dataset
from segpipe.models import build_model
from segpipe.runtime import lock_free_gpu
from segpipe.spec import check_spec, default
from segpipe.train import (HISTORY_COLUMNS, _restore, _state, build_optimizer, fingerprint,
                           train_run)

REPO = Path(__file__).resolve().parents[1]
SIZE = 32


def make_spec(architecture: dict | None = None, augmentation: dict | None = None,
              **train: object) -> dict:
    """A small run: U-Net of width 8, flips, 3 epochs, snapshots at epochs 1 and 3."""
    return {
        "run": "unet__scratch__bcedice_0.5__flips__s0",
        "seed": 0,
        "names": {"architecture": "unet", "backbone": "scratch", "loss": "bcedice_0.5",
                  "augmentation": "flips"},
        "architecture": architecture or {"model": "unet", "width": 8, "depth": 2},
        "backbone": {},
        "loss": {"bce": 0.5, "dice": 0.5},
        "augmentation": {"hflip": 0.5, "vflip": 0.5} if augmentation is None else augmentation,
        "train": {"epochs": 3, "batch_size": 8, "lr": 0.01, "optimizer": "adam",
                  "weight_decay": 0.0, "encoder_lr_mult": 0.1, "scheduler": "cosine",
                  "early_stop_patience": 0, "snapshot_epochs": [1, 3, 99], "amp": True,
                  **train},
    }


# The learning run: a wider and deeper U-Net, no augmentation, 12 epochs (~5 s on one core).
LEARNING = dict(architecture={"model": "unet", "width": 16, "depth": 3}, augmentation={},
                epochs=12, batch_size=4, lr=0.003)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """48 synthetic images at 32×32, 12 of them in the validation split."""
    root = tmp_path_factory.mktemp("data")
    write_dataset(root / "labelme", count=48, seed=0, size=(64, 64))
    build_cache(root / "labelme", root / "train.h5", geometry=(SIZE, SIZE), val_fraction=0.25)
    return root / "train.h5"


@pytest.fixture(scope="module")
def trained(cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    train_run(make_spec(**LEARNING), cache, out)
    return out


@pytest.fixture(scope="module")
def short_run(cache, tmp_path_factory) -> Path:
    """The reference for the exactness tests: an uninterrupted 3-epoch run."""
    out = tmp_path_factory.mktemp("short_run")
    train_run(make_spec(), cache, out)
    return out


def history_without_time(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "history.csv").drop(columns="seconds")


def assert_same_weights(a: Path, b: Path) -> None:
    sa = torch.load(a, weights_only=True)["state_dict"]
    sb = torch.load(b, weights_only=True)["state_dict"]
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_training_learns_beyond_all_foreground(cache, trained):
    with open_stacked(cache) as f:
        masks = f["masks"][:][f["is_val"][:]].reshape(-1, SIZE * SIZE).astype(float)
    all_foreground = np.mean(2 * masks.sum(1) / (masks.sum(1) + SIZE * SIZE))
    history = pd.read_csv(trained / "history.csv")
    assert list(history.columns) == HISTORY_COLUMNS
    assert list(history["epoch"]) == list(range(1, 13))
    # Margins that another CPU's last bits cannot cross: on this one the loss falls by ~40 %
    # and the best val Dice (~0.55) is twice all-foreground's (~0.27).
    assert history["train_loss"].iloc[-3:].mean() < history["train_loss"].iloc[:3].mean()
    assert history["val_dice"].max() > all_foreground, (history, all_foreground)


def test_outputs_and_self_describing_checkpoint(trained):
    history = pd.read_csv(trained / "history.csv")
    checkpoint = torch.load(trained / "model.pt", weights_only=True)
    best = int(history["val_dice"].idxmax()) + 1  # the first epoch of the maximum
    assert checkpoint["epoch"] == checkpoint["best_epoch"] == best
    assert checkpoint["val_dice"] == pytest.approx(history["val_dice"].max())
    assert checkpoint["epochs"] == 12
    assert checkpoint["train_seconds"] == pytest.approx(history["seconds"].sum())
    assert checkpoint["size"] == [SIZE, SIZE]
    assert checkpoint["mean"] == [0.485, 0.456, 0.406]
    assert checkpoint["std"] == [0.229, 0.224, 0.225]
    assert checkpoint["architecture"] == LEARNING["architecture"]
    assert checkpoint["spec"] == check_spec(make_spec(**LEARNING))
    assert checkpoint["peak_memory_mb"] > 0 and checkpoint["geometry"] == {"size": [SIZE, SIZE]}
    model = build_model(checkpoint["architecture"], checkpoint["backbone"])
    assert checkpoint["parameters"] == sum(p.numel() for p in model.parameters())
    model.load_state_dict(checkpoint["state_dict"])  # strict: every key matches
    # The cosine schedule: lr_e = lr/2 · (1 + cos(π (e − 1) / epochs)).
    expected_lr = [0.0015 * (1 + np.cos(np.pi * e / 12)) for e in range(12)]
    np.testing.assert_allclose(history["lr"], expected_lr, rtol=1e-12)
    # Snapshots at the reached configured epochs (99 is never reached), state removed.
    assert sorted(p.name for p in (trained / "snapshots").iterdir()) == ["epoch_1.pt", "epoch_3.pt"]
    snapshot = torch.load(trained / "snapshots" / "epoch_3.pt", weights_only=True)
    assert snapshot["epoch"] == 3 and snapshot["val_dice"] == pytest.approx(history["val_dice"][2])
    assert not (trained / "state.pt").exists() and not (trained / "state_snapshots").exists()
    log = (trained / "train.log").read_text().splitlines()
    assert [int(re.search(r" epoch (\d+)/12: ", line)[1]) for line in log
            if " epoch " in line and "/12: " in line] == list(range(1, 13))


def test_same_result_with_dataloader_workers(cache, short_run, tmp_path):
    train_run(make_spec(), cache, tmp_path, num_workers=2)
    pd.testing.assert_frame_equal(history_without_time(tmp_path), history_without_time(short_run))
    assert_same_weights(tmp_path / "model.pt", short_run / "model.pt")


def test_kill_and_resume_equals_uninterrupted(cache, short_run, tmp_path,
                                              killed_after_first_epoch):
    """A `segpipe train` process killed (SIGKILL) once an epoch's state is saved, then run
    again, ends with the weights and history of the uninterrupted run."""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(make_spec()))
    out = tmp_path / "run"
    command = [sys.executable, "-m", "segpipe", "train", "--cache", str(cache),
               "--spec", f"@{spec}", "--output-dir", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    killed_after_first_epoch(command, env, out, timeout_s=120)

    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resuming after epoch" in (out / "train.log").read_text()
    pd.testing.assert_frame_equal(history_without_time(out), history_without_time(short_run))
    assert_same_weights(out / "model.pt", short_run / "model.pt")
    for name in ("epoch_1.pt", "epoch_3.pt"):
        assert_same_weights(out / "snapshots" / name, short_run / "snapshots" / name)
    assert not (out / "state.pt").exists()


def test_state_of_another_spec_is_ignored(cache, short_run, tmp_path):
    spec, other = make_spec(), make_spec(lr=0.02)
    assert fingerprint(other, cache) != fingerprint(spec, cache)
    # The state of a finished run of the other spec: if it were used, nothing would be trained.
    torch.save({"fingerprint": fingerprint(other, cache), "progress": {"epoch": 3}},
               tmp_path / "state.pt")
    train_run(spec, cache, tmp_path)
    assert "ignoring" in (tmp_path / "train.log").read_text()
    pd.testing.assert_frame_equal(history_without_time(tmp_path), history_without_time(short_run))
    assert_same_weights(tmp_path / "model.pt", short_run / "model.pt")


def test_early_stopping_on_validation_dice(cache, tmp_path):
    spec = make_spec(epochs=12, early_stop_patience=1, lr=0.05, scheduler="none")
    train_run(spec, cache, tmp_path)
    dice = list(pd.read_csv(tmp_path / "history.csv")["val_dice"])
    # Patience 1: the run stops after the first epoch without a gain (or runs all 12).
    stale = [e for e in range(2, len(dice) + 1) if dice[e - 1] <= max(dice[:e - 1])]
    assert len(dice) == (stale[0] if stale else 12)
    best = dice.index(max(dice)) + 1  # the first epoch wins ties
    assert torch.load(tmp_path / "model.pt", weights_only=True)["best_epoch"] == best


def test_non_finite_loss_names_run_and_epoch(cache, tmp_path):
    # Adam's first step moves every weight by ~lr: activations overflow to inf, then NaN.
    with pytest.raises(SegpipeError, match=r"run unet__scratch__bcedice_0.5__flips__s0: "
                                           r"the training loss is nan in epoch 1"):
        train_run(make_spec(epochs=3, lr=1e30), cache, tmp_path)
    assert not (tmp_path / "model.pt").exists() and not (tmp_path / "history.csv").exists()


@pytest.mark.parametrize("change, message", [
    ({"optimiser": "adam"}, r"train.optimiser: unknown key \(allowed: epochs, batch_size, "),
    ({"lr": "fast"}, r"train.lr: 'fast' is not of type 'number'"),
    ({"epochs": 2.0}, r"train.epochs: 2.0 is not of type 'integer'"),
    ({"amp": 1}, r"train.amp: 1 is not of type 'boolean'"),
    ({"snapshot_epochs": [0]}, r"train.snapshot_epochs\[0\]: 0 is less than the minimum of 1"),
    ({"device": "cpu"}, r"train.device: unknown key"),  # an execution setting
])
def test_bad_train_settings(cache, tmp_path, change, message):
    with pytest.raises(SegpipeError, match=message):
        train_run(make_spec(**change), cache, tmp_path)
    assert not any(tmp_path.iterdir())


def test_a_setting_left_out_is_the_schemas_and_a_cache_without_validation(cache, tmp_path):
    """A spec written by hand without a train setting trains the run of the schema's default,
    the same run (spec and fingerprint) as the workflow's spec, which holds every setting."""
    spec = make_spec(scheduler=default("train.scheduler"))
    partial = copy.deepcopy(spec)
    del partial["train"]["scheduler"]
    train_run(partial, cache, tmp_path / "a")
    checkpoint = torch.load(tmp_path / "a" / "model.pt", weights_only=True)
    spec = check_spec(spec)  # with the new settings' defaults too
    assert checkpoint["spec"] == spec and checkpoint["fingerprint"] == fingerprint(spec, cache)
    no_val = tmp_path / "no_val.h5"
    shutil.copy(cache, no_val)
    with h5py.File(no_val, "r+") as f:
        f["is_val"][...] = False
    with pytest.raises(SegpipeError, match="no_val.h5: no validation images"):
        train_run(make_spec(), no_val, tmp_path / "b")


def test_encoder_learning_rate_multiplier_only_for_pretrained_encoders():
    model = build_model({"model": "unet", "width": 4, "depth": 2}, {})
    train = make_spec(lr=0.01, encoder_lr_mult=0.1)["train"]
    lrs = {g["name"]: g["lr"] for g in build_optimizer(model, train, pretrained=True).param_groups}
    assert lrs == {"encoder": pytest.approx(0.001), "decoder": 0.01}
    lrs = {g["name"]: g["lr"] for g in build_optimizer(model, train, pretrained=False).param_groups}
    assert lrs == {"encoder": 0.01, "decoder": 0.01}


def test_gpu_locks_give_concurrent_jobs_different_gpus(tmp_path):
    """The lock per GPU UUID: a second process gets the next free GPU, waits boundedly when
    all are taken, and gets a GPU back once its holder exits."""
    a, b = f"GPU-{uuid.uuid4()}", f"GPU-{uuid.uuid4()}"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from segpipe.runtime import lock_free_gpu; "
         f"print(lock_free_gpu({[a, b]!r}, {str(tmp_path)!r}), flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "0"
        assert lock_free_gpu([a, b], tmp_path, wait_s=0) == 1  # a is taken by the other process
        assert lock_free_gpu([a, b], tmp_path, wait_s=0) == 1  # this process keeps its GPU
        with pytest.raises(SegpipeError, match="all 1 GPU.* in use"):
            lock_free_gpu([a], tmp_path, wait_s=0.3, poll_s=0.1)
    finally:
        holder.kill()
        holder.wait()
    assert lock_free_gpu([a], tmp_path, wait_s=0) == 0  # released when its holder died


def test_state_saved_without_fp16_resumes_under_fp16():
    """A run begun where the gradient scaler is off (the CPU, a bf16 GPU: its state is empty)
    resumes on an fp16 GPU, whose scaler starts afresh; and the other way round."""
    cpu = torch.device("cpu")
    model = build_model({"model": "unet", "width": 4, "depth": 2}, {})
    optimizer = torch.optim.Adam(model.parameters())
    off, on = (torch.amp.GradScaler("cpu", enabled=e, init_scale=1024.0) for e in (False, True))
    progress = {"epoch": 1}
    assert _restore(_state(model, optimizer, None, off, cpu, progress, "k"), model, optimizer,
                    None, on, cpu) == progress
    assert on.get_scale() == 1024.0
    _restore(_state(model, optimizer, None, on, cpu, progress, "k"), model, optimizer, None, off,
             cpu)
    assert not off.is_enabled()
