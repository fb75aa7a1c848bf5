"""Aggregation: CI maths, summary.csv, figures and summary.md on small hand-made run folders.

The run folders are written here with pandas/numpy in the formats of docs/formats.md
("Run directory"); those files are the interface between evaluate and aggregate.
"""

import math

import matplotlib.image
import numpy as np
import pandas as pd
import pytest

from segpipe import SegpipeError
from segpipe.aggregate import (
    aggregate_experiment,
    mean_ci95,
    t_quantile_975,
    write_summary,
)
from segpipe.cli import main
from segpipe.columns import METRIC_COLUMNS as METRICS

HEIGHT, WIDTH, EXAMPLES = 20, 28, 3
SNAPSHOTS = (2, 4)


def write_run(folder, seed, score, val_dice, snapshots=SNAPSHOTS, names=("a", "b", "c"),
              probs_best=False):
    """A run folder whose every test metric is ``score`` and whose best val_dice is ``val_dice``."""
    folder.mkdir(parents=True)
    pd.DataFrame([{"run": folder.name, "seed": seed, **{m: score for m in METRICS},
                   "parameters": 1234567, "train_seconds": 10.0 + seed, "epochs": 4,
                   "best_epoch": 3, "peak_memory_mb": 0.0}]).to_csv(folder / "metrics.csv",
                                                                   index=False)
    epochs = np.arange(1, 5)
    pd.DataFrame({"epoch": epochs, "train_loss": 1.0 / epochs, "val_loss": 1.1 / epochs,
                  "val_dice": [val_dice - 0.3, val_dice - 0.1, val_dice, val_dice - 0.05],
                  "val_iou": 0.5, "val_accuracy": 0.9, "val_ap": 0.6, "lr": 1e-3,
                  "seconds": 2.5}).to_csv(folder / "history.csv", index=False)
    pd.DataFrame([{"epoch": e, **{m: score * e / snapshots[-1] for m in METRICS}}
                  for e in snapshots], columns=["epoch", *METRICS]).to_csv(
        folder / "metrics_by_epoch.csv", index=False)
    rng = np.random.default_rng(seed)
    masks = np.zeros((len(names), HEIGHT, WIDTH), np.uint8)
    masks[:, 5:15, 6:20] = 1
    probs = np.array([np.clip(masks * (0.3 + 0.6 * i / len(snapshots))
                              + rng.normal(0, 0.2, masks.shape), 0, 1)
                      for i in range(1, len(snapshots) + 1)], np.float16).reshape(
        len(snapshots), *masks.shape)
    best = {"probs_best": masks.astype(np.float16) * 0.8} if probs_best else {}
    np.savez(folder / "evolution.npz", epochs=np.array(snapshots, dtype=np.int64), probs=probs,
             images=rng.integers(0, 256, (*masks.shape, 3), dtype=np.uint8), masks=masks,
             names=np.array(names), threshold=np.float64(0.5), **best)


def make_spec(root, groups, sweep=None):
    """``groups``: {loss name: [(seed, test score, best val_dice), ...]} in config order."""
    runs = []
    for loss, seeds in groups.items():
        for seed, score, val_dice in seeds:
            name = f"unet__scratch__{loss}__plain__s{seed}"
            write_run(root / "runs" / name, seed, score, val_dice)
            runs.append({"run": name, "dir": str(root / "runs" / name), "architecture": "unet",
                         "backbone": "scratch", "loss": loss, "augmentation": "plain",
                         "seed": seed})
    return {"name": "losses", "axes": ["loss"], "sweep": sweep, "runs": runs}


# Group order deliberately not alphabetical; "dice" has the best test scores but "bce" the best
# validation Dice; "focal" has a single seed.
GROUPS = {
    "dice": [(0, 0.6, 0.70), (1, 0.7, 0.71), (2, 0.8, 0.72)],
    "bce": [(0, 0.5, 0.80), (1, 0.7, 0.90)],
    "focal": [(0, 0.42, 0.5)],
}


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    aggregate_experiment("losses", make_spec(root, GROUPS), root / "experiments" / "losses")
    return root / "experiments" / "losses"


def test_t_quantiles_match_the_t_distribution():
    """Integrate the t density numerically: P(|T| ≤ t_{0.975,ν}) must be 0.95."""
    for dof in [*range(1, 31), 31, 40, 60, 120, 1000]:
        t = t_quantile_975(dof)
        x = np.linspace(0.0, t, 200_001)
        log_c = math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2) - 0.5 * math.log(dof * math.pi)
        density = np.exp(log_c - (dof + 1) / 2 * np.log1p(x**2 / dof))
        coverage = 2 * np.sum((density[1:] + density[:-1]) / 2 * np.diff(x))
        error_in_t = (coverage - 0.95) / (2 * density[-1])
        assert abs(error_in_t) < 1e-4, (dof, t, coverage)


def test_mean_ci95_hand_computed():
    # s = 0.1, n = 3: 4.3027 · 0.1 / √3 = 0.2484165
    mean, ci = mean_ci95([0.6, 0.7, 0.8])
    assert mean == pytest.approx(0.7) and ci == pytest.approx(0.2484165, abs=1e-6)
    # s = √0.02, n = 2: 12.7062 · √0.02 / √2 = 1.27062
    assert mean_ci95([0.5, 0.7]) == pytest.approx((0.6, 1.27062))
    mean, ci = mean_ci95([0.42])
    assert mean == 0.42 and math.isnan(ci)


def test_summary_csv_columns_order_and_values(experiment):
    summary = pd.read_csv(experiment / "summary.csv")
    metric_columns = [f"{m}_{s}" for m in (*METRICS, "val_dice") for s in ("mean", "ci95")]
    assert list(summary.columns) == ["group", "loss", "n_seeds", *metric_columns, "parameters",
                                     "train_seconds_mean", "epochs_mean", "best_run",
                                     "best_run_val_dice"]
    assert list(summary["group"]) == ["dice", "bce", "focal"]
    assert list(summary["n_seeds"]) == [3, 2, 1]
    dice, bce, focal = (row for _, row in summary.iterrows())
    for metric in METRICS:
        assert dice[f"{metric}_mean"] == pytest.approx(0.7)
        assert dice[f"{metric}_ci95"] == pytest.approx(0.2484165, abs=1e-6)
        assert bce[f"{metric}_ci95"] == pytest.approx(1.27062)
    assert math.isnan(focal["dice_ci95"]) and focal["dice_mean"] == pytest.approx(0.42)
    # val_dice is each run's best epoch: bce seeds 0.80 and 0.90
    assert bce["val_dice_mean"] == pytest.approx(0.85)
    assert bce["best_run"] == "unet__scratch__bce__plain__s1"
    assert bce["best_run_val_dice"] == pytest.approx(0.90)
    assert dice["train_seconds_mean"] == pytest.approx(11.0)
    assert dice["parameters"] == 1234567 and dice["epochs_mean"] == 4


def _read_png(path):
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    return image


def test_figures_are_png_and_not_blank(experiment):
    for figure in ("curves", "bars", "evolution", "samples"):
        path = experiment / f"{figure}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", figure
        image = _read_png(path)
        assert 300 <= min(image.shape[:2]) and max(image.shape[:2]) <= 4000, (figure, image.shape)
        assert image[..., :3].std() > 0.05, figure
    assert not (experiment / "sweep.png").exists()
    assert sorted(p.name for p in experiment.iterdir()) == [
        "bars.png", "curves.png", "evolution.png", "samples.png", "summary.csv"]


def test_sweep_png_written_with_a_sweep(tmp_path):
    groups = {f"bcedice_{a}": [(0, 0.5 + a / 4, 0.6), (1, 0.55 + a / 4, 0.6)]
              for a in (0.0, 0.5, 1.0)}
    sweep = {"axis": "loss", "param": "dice",
             "values": {"bcedice_0.0": 0.0, "bcedice_0.5": 0.5, "bcedice_1.0": 1.0}}
    aggregate_experiment("dice_weight", make_spec(tmp_path, groups, sweep), tmp_path / "out")
    image = _read_png(tmp_path / "out" / "sweep.png")
    assert image[..., :3].std() > 0.05


def test_sweep_value_missing_is_an_error(tmp_path):
    sweep = {"axis": "loss", "param": "dice", "values": {"dice": 1.0}}
    with pytest.raises(SegpipeError, match="sweep.values lacks bce, focal"):
        aggregate_experiment("losses", make_spec(tmp_path, GROUPS, sweep), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    spec = make_spec(tmp_path / "b", GROUPS, sweep)
    spec["axes"].append("architecture")
    with pytest.raises(SegpipeError, match="a sweep needs 'loss' as the only varied axis"):
        aggregate_experiment("losses", spec, tmp_path / "out")


def test_missing_metrics_csv_names_the_file_and_writes_nothing(tmp_path):
    spec = make_spec(tmp_path, GROUPS)
    missing = tmp_path / "runs" / "unet__scratch__bce__plain__s1" / "metrics.csv"
    missing.unlink()
    with pytest.raises(SegpipeError, match=f"{missing}: file not found"):
        aggregate_experiment("losses", spec, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(SegpipeError, match="'runs' must be a non-empty list"):
        aggregate_experiment("losses", {"axes": ["loss"], "runs": []}, tmp_path / "out")
    spec = make_spec(tmp_path, {"dice": GROUPS["dice"]})
    del spec["runs"][1]["loss"]
    with pytest.raises(SegpipeError, match=r"runs\[1\] lacks key\(s\) loss"):
        aggregate_experiment("losses", spec, tmp_path / "out")

    spec = make_spec(tmp_path / "b", {"dice": GROUPS["dice"]})
    history = tmp_path / "b" / "runs" / "unet__scratch__dice__plain__s2" / "history.csv"
    pd.read_csv(history).drop(columns="val_dice").to_csv(history, index=False)
    with pytest.raises(SegpipeError, match=f"{history}: missing column\\(s\\) val_dice"):
        aggregate_experiment("losses", spec, tmp_path / "out")

    spec = make_spec(tmp_path / "c", GROUPS)
    evolution = tmp_path / "c" / "runs" / "unet__scratch__bce__plain__s0" / "evolution.npz"
    write_run(evolution.parent.with_name("other"), 0, 0.5, 0.5, names=("x", "b", "c"))
    evolution.unlink()
    (evolution.parent.with_name("other") / "evolution.npz").rename(evolution)
    with pytest.raises(SegpipeError, match=f"{evolution}: example images .* differ"):
        aggregate_experiment("losses", spec, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_runs_that_reached_no_snapshot_epoch(tmp_path):
    """Early stopping before the first snapshot epoch: curves are empty, samples use the best
    model's probabilities; without those there is nothing to show, which is a clear error."""
    runs = []
    for seed in (0, 1):
        folder = tmp_path / "runs" / f"s{seed}"
        write_run(folder, seed, 0.5, 0.6, snapshots=(), probs_best=True)
        runs.append({"run": folder.name, "dir": str(folder), "loss": "bce", "seed": seed})
    aggregate_experiment("early", {"axes": ["loss"], "runs": runs}, tmp_path / "out")
    for figure in ("curves", "evolution", "samples"):
        assert _read_png(tmp_path / "out" / f"{figure}.png")[..., :3].std() > 0.05

    write_run(tmp_path / "bare", 0, 0.5, 0.6, snapshots=())
    runs[0]["dir"] = str(tmp_path / "bare")
    with pytest.raises(SegpipeError, match="holds neither a snapshot epoch nor probs_best"):
        aggregate_experiment("early", {"axes": ["loss"], "runs": runs}, tmp_path / "out2")


def test_summary_md_one_table_per_experiment_and_best_by_validation(experiment, tmp_path):
    spec = make_spec(tmp_path, {"unet": [(0, 0.9, 0.3)], "resunet": [(0, 0.2, 0.4)]})
    for run in spec["runs"]:
        run["architecture"] = run.pop("loss")
    spec["axes"] = ["architecture"]
    aggregate_experiment("architecture", spec, tmp_path / "experiments" / "architecture")
    output = tmp_path / "results" / "summary.md"
    write_summary([experiment, tmp_path / "experiments" / "architecture"], output)
    text = output.read_text()

    assert text.count("| group | n | Dice |") == 2
    assert "## losses" in text and "## architecture" in text
    losses, architecture = text.split("## architecture")
    # best by validation Dice, not by the (higher) test Dice of "dice" / "unet"
    assert "| **bce** | 2 | 0.600 ± 1.271 |" in losses
    assert "Best by validation Dice: **bce** (val Dice 0.850 ± 0.635)" in losses
    assert "`unet__scratch__bce__plain__s1` (val Dice 0.900)" in losses
    assert "| focal | 1 | 0.420 ± — |" in losses
    assert "Best by validation Dice: **resunet**" in architecture
    assert "| 1.23 M |" in losses
    assert "[sweep](" not in text
    for name in ("curves", "bars", "evolution", "samples"):
        target = (output.parent / text.split(f"[{name}](")[1].split(")")[0]).resolve()
        assert target == (experiment / f"{name}.png").resolve()


def test_summary_without_summary_csv_is_an_error(tmp_path):
    with pytest.raises(SegpipeError, match=f"{tmp_path / 'summary.csv'}: file not found"):
        write_summary([tmp_path], tmp_path / "summary.md")
    with pytest.raises(SegpipeError, match="no experiment folders"):
        write_summary([], tmp_path / "summary.md")
    assert not (tmp_path / "summary.md").exists()


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    spec = tmp_path / "spec.json"
    spec.write_text('{"axes": ["loss"], "runs": []}')
    assert main(["aggregate", "--experiment", "x", "--spec", f"@{spec}",
                 "--output-dir", str(tmp_path / "out")]) == 1
    assert "segpipe: error: experiment 'x': spec key 'runs'" in capsys.readouterr().err
