"""`segpipe evaluate` on a tiny trained run: every file and column, and metrics that agree
with a computation from scratch on the test images."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import matplotlib.image
import numpy as np
import pandas as pd
import pytest
import torch

from cachefile import open_stacked
from segpipe import SegpipeError, aggregate
from segpipe.data.cache import build_cache
from segpipe.data.synthetic import write_dataset
from segpipe.evaluate import evaluate_run
from segpipe.models import build_model
from segpipe.train import train_run

METRICS = ["accuracy", "dice", "iou", "precision", "recall"]
SPEC = {
    "run": "unet__scratch__bcedice_0.5__plain__s3",
    "seed": 3,
    "names": {"architecture": "unet", "backbone": "scratch", "loss": "bcedice_0.5",
              "augmentation": "plain"},
    "architecture": {"model": "unet", "width": 16, "depth": 3},
    "backbone": {},
    "loss": {"bce": 0.5, "dice": 0.5},
    "augmentation": {},
    "train": {"epochs": 6, "batch_size": 4, "lr": 0.003, "optimizer": "adamw",
              "weight_decay": 0.01, "encoder_lr_mult": 0.1, "scheduler": "plateau",
              "early_stop_patience": 0, "snapshot_epochs": [1, 2, 3, 4, 5, 6], "amp": False},
}
EPOCHS = [1, 2, 3, 4, 5, 6]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_dataset(root / "train", count=48, seed=0, size=(64, 64))
    write_dataset(root / "test", count=5, seed=1, size=(64, 64))
    build_cache(root / "train", root / "train.h5", geometry=(32, 32), val_fraction=0.25)
    build_cache(root / "test", root / "test.h5", geometry=(32, 32))
    train_run(SPEC, root / "train.h5", root / "run")
    spread_head(root / "run", root / "test.h5")
    return root


def logits_on_test(checkpoint: dict, cache: Path) -> torch.Tensor:
    """The logits (N, H, W) of a checkpoint on the test cache, computed here with torch."""
    model = build_model(checkpoint["architecture"], checkpoint["backbone"]).eval()
    model.load_state_dict(checkpoint["state_dict"])
    with open_stacked(cache) as f:
        images = f["images"][:]
    mean, std = (torch.tensor(checkpoint[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    x = (torch.from_numpy(images).permute(0, 3, 1, 2) / 255.0 - mean) / std
    with torch.no_grad():
        return model(x)[:, 0]


def widest_gap_near(ordered: np.ndarray, q: float) -> float:
    """The middle of the widest gap between neighbours of the sorted ``ordered`` within 5 % of
    the values around its ``q`` quantile: no value lies close to it, so a threshold there
    splits the values alike whatever last bits another CPU computes."""
    n = len(ordered)
    low, high = int(n * (q - 0.05)), int(n * (q + 0.05))
    i = low + int(np.argmax(np.diff(ordered[low:high + 1])))
    return float(ordered[i] + ordered[i + 1]) / 2


def spread_head(run_dir: Path, cache: Path) -> None:
    """Rescale the 1×1 head of model.pt and of every snapshot (the same affine map) so that
    model.pt's test logits have (about) their median at 0 and their upper quartile at logit(0.9),
    each in the widest nearby gap between logits (:func:`widest_gap_near`): at
    threshold 0.5 it predicts the top half of the test pixels, at 0.9 the top quarter, whatever
    the few trained epochs learnt on this CPU. The tests then never depend on where a short
    training trajectory ends."""
    checkpoint = torch.load(run_dir / "model.pt", weights_only=True)
    logits = np.sort(logits_on_test(checkpoint, cache).flatten().numpy())
    median, upper = (widest_gap_near(logits, q) for q in (0.5, 0.75))
    scale = np.log(9) / (upper - median)  # logit(0.9) = ln 9
    for path in [run_dir / "model.pt", *sorted((run_dir / "snapshots").glob("*.pt"))]:
        checkpoint = torch.load(path, weights_only=True)
        state = checkpoint["state_dict"]
        state["decoder.head.weight"] *= scale
        state["decoder.head.bias"] = (state["decoder.head.bias"] - median) * scale
        torch.save(checkpoint, path)


@pytest.fixture(scope="module")
def run(data) -> Path:
    evaluate_run(data / "run", data / "test.h5", n_examples=3)
    return data / "run"


def scratch_metrics(run_dir: Path, cache: Path, threshold: float) -> tuple[pd.DataFrame, dict]:
    """Per-image and pooled metrics of model.pt on the test cache at the original size,
    computed here from the definitions (docs/metrics.md) with numpy and OpenCV: the
    probabilities at 32x32 resized bilinearly to the images' 64x64, against the truth drawn
    there."""
    checkpoint = torch.load(run_dir / "model.pt", weights_only=True)
    with open_stacked(cache) as f:
        masks = f["truth"][:].astype(bool)  # at the original size, 64x64
    probs = torch.sigmoid(logits_on_test(checkpoint, cache)).numpy()  # at 32x32
    pred = np.stack([cv2.resize(p, (64, 64), interpolation=cv2.INTER_LINEAR)
                     for p in probs]) >= threshold

    def ratios(tp, fp, fn, tn):
        with np.errstate(invalid="ignore", divide="ignore"):
            return {"accuracy": (tp + tn) / (tp + fp + fn + tn),
                    "dice": 2 * tp / (2 * tp + fp + fn), "iou": tp / (tp + fp + fn),
                    "precision": tp / (tp + fp), "recall": tp / (tp + fn)}

    counts = [(pred & masks).sum((1, 2)), (pred & ~masks).sum((1, 2)),
              (~pred & masks).sum((1, 2)), (~pred & ~masks).sum((1, 2))]
    per_image = pd.DataFrame(ratios(*[c.astype(float) for c in counts]))
    pooled = ratios(*[np.float64(c.sum()) for c in counts])
    return per_image, pooled


def test_metrics_csv_has_every_column(run):
    metrics = pd.read_csv(run / "metrics.csv")
    assert list(metrics.columns) == [
        "run", "architecture", "backbone", "loss", "augmentation", "seed",
        "accuracy", "dice", "iou", "precision", "recall", "map",
        "pooled_accuracy", "pooled_dice", "pooled_iou", "pooled_precision", "pooled_recall",
        "pooled_ap", "parameters", "train_seconds", "epochs", "best_epoch", "peak_memory_mb"]
    row = metrics.iloc[0]
    assert len(metrics) == 1 and row["run"] == SPEC["run"] and row["seed"] == 3
    assert (row["architecture"], row["loss"]) == ("unet", "bcedice_0.5")
    checkpoint = torch.load(run / "model.pt", weights_only=True)
    for key in ("parameters", "epochs", "best_epoch"):
        assert row[key] == checkpoint[key]
    assert row["train_seconds"] == pytest.approx(checkpoint["train_seconds"])
    assert row["epochs"] == 6 and 1 <= row["best_epoch"] <= 6


@pytest.mark.parametrize("threshold", [0.5, 0.9])
def test_metrics_agree_with_a_computation_from_scratch(data, run, tmp_path, threshold):
    if threshold != 0.5:  # evaluate a copy of the run at another threshold
        shutil.copytree(run, tmp_path / "run")
        evaluate_run(tmp_path / "run", data / "test.h5", threshold=threshold, n_examples=3)
        run = tmp_path / "run"
    expected_per_image, expected_pooled = scratch_metrics(run, data / "test.h5", threshold)
    # spread_head: a quarter (threshold 0.9) or half (0.5) of the pixels are foreground.
    assert 0 < expected_pooled["dice"] < 1 and 0 < expected_pooled["accuracy"] < 1
    per_image = pd.read_csv(run / "per_image.csv")
    assert list(per_image.columns) == ["name", *METRICS, "ap"]
    with open_stacked(data / "test.h5") as f:
        assert list(per_image["name"]) == list(f["names"].asstr()[:])
    # Zero denominators (nothing predicted or nothing true) follow metrics.py's rule; compare
    # where the ratio is defined.
    # Upsampled probabilities fill the gap spread_head left around the threshold: a pixel
    # there may fall either side on another CPU (its last bits), so a few pixels of the 4096
    # of an image may differ (one moves a ratio by < 1e-3).
    defined = expected_per_image.notna()
    np.testing.assert_allclose(per_image[METRICS][defined].fillna(0),
                               expected_per_image[defined].fillna(0), rtol=0, atol=3e-3)
    metrics = pd.read_csv(run / "metrics.csv").iloc[0]
    for name in METRICS:
        assert metrics[name] == pytest.approx(per_image[name].mean())
        if np.isfinite(expected_pooled[name]):
            assert metrics[f"pooled_{name}"] == pytest.approx(expected_pooled[name], abs=1e-3)
    assert metrics["map"] == pytest.approx(per_image["ap"].mean())


def test_average_precision_does_not_depend_on_the_threshold(data, run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    evaluate_run(tmp_path / "run", data / "test.h5", threshold=0.2, n_examples=1)
    before = pd.read_csv(run / "metrics.csv").iloc[0]
    after = pd.read_csv(tmp_path / "run" / "metrics.csv").iloc[0]
    assert after["pooled_ap"] == before["pooled_ap"] and after["map"] == before["map"]


def test_snapshots_are_scored_on_test(run):
    by_epoch = pd.read_csv(run / "metrics_by_epoch.csv")
    metrics = pd.read_csv(run / "metrics.csv").iloc[0]
    assert list(by_epoch["epoch"]) == EPOCHS
    assert list(by_epoch.columns) == ["epoch", *metrics.index[6:18]]
    # model.pt is the snapshot of its best epoch: the same scores.
    best = by_epoch.set_index("epoch").loc[metrics["best_epoch"]]
    np.testing.assert_allclose(best.to_numpy(float), metrics.iloc[6:18].to_numpy(float))


def test_evolution_holds_the_snapshots_probabilities(data, run):
    evolution = np.load(run / "evolution.npz")
    assert list(evolution["epochs"]) == EPOCHS
    # the examples at their original size (64x64: under the display's 256)
    assert evolution["probs"].shape == (6, 3, 64, 64) and evolution["probs"].dtype == np.float16
    assert ((0 <= evolution["probs"]) & (evolution["probs"] <= 1)).all()
    with open_stacked(data / "test.h5") as f:
        np.testing.assert_array_equal(
            evolution["images"], [cv2.resize(image, (64, 64), interpolation=cv2.INTER_AREA)
                                  for image in f["images"][:3]])
        np.testing.assert_array_equal(evolution["masks"], f["truth"][:3])
        assert list(evolution["names"]) == list(f["names"].asstr()[:3])
    best = int(pd.read_csv(run / "metrics.csv")["best_epoch"][0])
    np.testing.assert_array_equal(evolution["probs_best"], evolution["probs"][best - 1])
    per_image = pd.read_csv(run / "per_image.csv")
    pred = evolution["probs"][best - 1].astype(np.float32) >= 0.5
    truth = evolution["masks"].astype(bool)
    dice = 2 * (pred & truth).sum((1, 2)) / (pred.sum((1, 2)) + truth.sum((1, 2)))
    np.testing.assert_allclose(dice, per_image["dice"][:3], atol=0.02)  # float16 rounding


def test_figures_threshold_as_the_metrics(data, run, tmp_path, monkeypatch):
    """At evaluate.threshold 0.9, the Dice that samples.png and evolution.png print for the
    best model is per_image.csv's: aggregation takes the threshold from evolution.npz."""
    shutil.copytree(run, tmp_path / "run")
    evaluate_run(tmp_path / "run", data / "test.h5", threshold=0.9, n_examples=3)
    figures = {}
    save = aggregate._save
    monkeypatch.setattr(aggregate, "_save",
                        lambda fig, path: (figures.__setitem__(path.name, fig), save(fig, path)))
    spec = {"axes": [], "sweep": None,
            "runs": [{"run": SPEC["run"], "dir": str(tmp_path / "run"), "seed": SPEC["seed"]}]}
    aggregate.aggregate_experiment("t", spec, tmp_path / "experiment")

    def shown(fig, prefix):
        return np.array([float(ax.get_title().removeprefix(prefix)) for ax in fig.axes
                         if ax.get_title().startswith(prefix)])

    # Two decimals, and float16 probabilities in evolution.npz move a few boundary pixels.
    samples = shown(figures["samples.png"], "Dice ")
    np.testing.assert_allclose(samples, pd.read_csv(tmp_path / "run" / "per_image.csv")["dice"][:3],
                               atol=0.015)
    at_half = pd.read_csv(run / "per_image.csv")["dice"][:3]
    # spread_head: the top quarter of the pixels against the top half.
    assert np.abs(samples - at_half).max() > 0.05  # the threshold makes a difference here
    best = pd.read_csv(run / "metrics.csv")["best_epoch"][0]
    evolution = shown(figures["evolution.png"], f"epoch {best} · Dice ")
    np.testing.assert_array_equal(evolution, samples)


def test_predictions_figure(run):
    figure = matplotlib.image.imread(run / "predictions.png")
    height, width, _ = figure.shape
    assert width == 1000 and height > 3 * 200  # 4 panels per row, one row per example


def test_missing_model_and_size_mismatch(data, run, tmp_path):
    with pytest.raises(SegpipeError, match=r"empty/model.pt: checkpoint not found"):
        (tmp_path / "empty").mkdir()
        evaluate_run(tmp_path / "empty", data / "test.h5")
    build_cache(data / "test", tmp_path / "test48.h5", geometry=(48, 48))
    shutil.copytree(run, tmp_path / "run")
    with pytest.raises(SegpipeError, match=r"test48.h5: images are at 48x48, but .* trained at 32x32"):
        evaluate_run(tmp_path / "run", tmp_path / "test48.h5")


def test_a_fold_is_trained_without_and_scored_on_its_own_images(data, tmp_path, caplog):
    """Fold 1 of 3: trained on fold 0, selected on fold 2, scored on fold 1's images only."""
    cache = tmp_path / "cv.h5"
    build_cache(data / "test", cache, geometry=(32, 32), folds=3, split_seed=4)
    spec = {**SPEC, "run": f"{SPEC['run']}/fold1", "fold": 1,
            "train": {**SPEC["train"], "epochs": 1, "snapshot_epochs": [1]}}
    with caplog.at_level("INFO"):
        train_run(spec, cache, tmp_path / "run")
    with open_stacked(cache) as f:
        names, fold = f["names"].asstr()[:], f["fold"][:]
    assert list(np.bincount(fold)) == [2, 2, 1]
    assert "2 train / 1 val images" in caplog.text  # fold 0 trains, fold 2 validates
    evaluate_run(tmp_path / "run", cache, n_examples=3)
    assert list(pd.read_csv(tmp_path / "run" / "per_image.csv")["name"]) == list(names[fold == 1])
    assert list(np.load(tmp_path / "run" / "evolution.npz")["names"]) == list(names[fold == 1])
    assert pd.read_csv(tmp_path / "run" / "metrics.csv")["run"][0].endswith("__s3/fold1")

    with pytest.raises(SegpipeError, match="test.h5: no cross-validation folds 'fold' for fold 1"):
        train_run(spec, data / "test.h5", tmp_path / "fixed")
    with pytest.raises(SegpipeError, match="run spec: fold: -1 is less than the minimum of 0"):
        train_run({**spec, "fold": -1}, cache, tmp_path / "negative")
