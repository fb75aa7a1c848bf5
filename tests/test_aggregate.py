"""Aggregation: summary.csv, verdicts, figures and summary.md on small hand-made run folders.

The run folders are written here with pandas/numpy in the formats of docs/formats.md
("Run directory"); those files are the interface between evaluate and aggregate.
"""

import math
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
import scipy.stats

from segpipe import SegpipeError
from segpipe.aggregate import aggregate_experiment, class_summary
from segpipe.results import load_run
from segpipe.summary import write_summary
from segpipe.cli import main
from segpipe.stats import Scores
from segpipe.columns import METRIC_COLUMNS as METRICS
from segpipe.columns import REFERENCE_RUNS
from segpipe.figures import FIGURES, figures_for

HEIGHT, WIDTH, EXAMPLES = 20, 28, 3
SNAPSHOTS = (2, 4)


def write_run(folder, seed, score, val_dice, snapshots=SNAPSHOTS, names=("a", "b", "c"),
              probs_best=True, dice=None, first_case=0):
    """A run folder whose every test metric is ``score`` and whose best val_dice is ``val_dice``.

    per_image.csv holds the per-image ``dice`` (default: score − 0.1, score, score + 0.1 on
    images case0..case2, numbered from ``first_case``) and IoU = Dice / (2 − Dice), the exact
    per-image relation."""
    folder.mkdir(parents=True)
    dice = np.asarray([score - 0.1, score, score + 0.1] if dice is None else dice)
    cases = [f"case{first_case + i}" for i in range(len(dice))]
    pd.DataFrame({"name": cases, "accuracy": 0.9, "dice": dice,
                  "iou": dice / (2 - dice), "precision": 0.8, "recall": 0.7, "ap": 0.6}).to_csv(
        folder / "per_image.csv", index=False)
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
    best = {"probs_best": masks.astype(np.float16) * 0.8,
            "dice_best": np.full(len(names), score)} if probs_best else {}
    np.savez(folder / "evolution.npz", epochs=np.array(snapshots, dtype=np.int64), probs=probs,
             dice=np.full((len(snapshots), len(names)), score),
             images=rng.integers(0, 256, (*masks.shape, 3), dtype=np.uint8), masks=masks,
             names=np.array(names), threshold=np.float64(0.5), **best)


def make_spec(root, groups, sweep=None):
    """``groups``: {loss name: [(seed, test score, best val_dice[, per-image dice]), ...]} in
    config order."""
    runs = []
    for loss, seeds in groups.items():
        for seed, score, val_dice, *dice in seeds:
            name = f"unet__scratch__{loss}__plain__s{seed}"
            write_run(root / "runs" / name, seed, score, val_dice, dice=dice[0] if dice else None)
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


def iou(dice):
    return dice / (2 - dice)


def test_summary_csv_columns_order_and_values(experiment):
    summary = pd.read_csv(experiment / "summary.csv")
    metric_columns = [f"{m}_{s}" for m in (*METRICS, "val_dice")
                      for s in (("mean", "lo", "hi") if m in ("dice", "iou") else ("mean", "ci95"))]
    assert list(summary.columns) == [
        "group", "loss", "n_seeds", "n_images", *metric_columns, "parameters",
        "train_seconds_mean", "epochs_mean", "best_run", "best_run_val_dice", "reference",
        "delta_dice", "delta_dice_lo", "delta_dice_hi", "delta_iou", "delta_iou_lo",
        "delta_iou_hi", "p_wilcoxon", "p_holm", "p_mrmc", "p_mrmc_holm", "verdict", "rank",
        "rank_mean", "rank_lo",
        "rank_hi"]
    assert list(summary["group"]) == ["dice", "bce", "focal"]
    assert list(summary["n_seeds"]) == [3, 2, 1] and list(summary["n_images"]) == [3, 3, 3]
    dice, bce, focal = (row for _, row in summary.iterrows())
    for metric in set(METRICS) - {"dice", "iou"}:  # Student t over seeds
        assert dice[f"{metric}_mean"] == pytest.approx(0.7)
        assert dice[f"{metric}_ci95"] == pytest.approx(0.2484138, abs=1e-6)
        assert bce[f"{metric}_ci95"] == pytest.approx(1.2706205, abs=1e-6)
    assert math.isnan(focal["map_ci95"]) and focal["map_mean"] == pytest.approx(0.42)
    # Dice, IoU: per-image scores score − 0.1, score, score + 0.1, bootstrap over images and seeds
    assert dice["dice_mean"] == pytest.approx(0.7) and 0.5 < dice["dice_lo"] < 0.7
    assert 0.7 < dice["dice_hi"] < 0.9
    assert dice["iou_mean"] == pytest.approx(iou(np.array([0.5, 0.6, 0.7, 0.6, 0.7, 0.8,
                                                           0.7, 0.8, 0.9])).mean())
    # one seed: images only; all three draws equal the lowest (highest) image with p = 1/27 >
    # 2.5 %, so the interval is [0.32, 0.52]
    assert (focal["dice_lo"], focal["dice_hi"]) == pytest.approx((0.32, 0.52))
    # val_dice is each run's best epoch: bce seeds 0.80 and 0.90
    assert bce["val_dice_mean"] == pytest.approx(0.85)
    assert bce["best_run"] == "unet__scratch__bce__plain__s1"
    assert bce["best_run_val_dice"] == pytest.approx(0.90)
    assert dice["train_seconds_mean"] == pytest.approx(11.0)
    assert dice["parameters"] == 1234567 and dice["epochs_mean"] == 4


def test_comparisons_with_the_validation_chosen_reference(experiment):
    """bce has the best validation Dice, so it is the reference, although dice scores higher on
    test. dice − bce on the shared seeds 0, 1: seed 0 +0.1, seed 1 0 on every image, so each
    image's difference averaged over seeds is +0.05: three tied positive differences, exact
    permutation p = 2 · 1/8 = 0.25; resampling the 2 seeds gives Δ 0, 0.05, 0.1 with
    probabilities 1/4, 1/2, 1/4, so the interval is [0, 0.1]. focal − bce on seed 0: −0.08 on
    every image, p = 0.25, interval [−0.08, −0.08]. Holm over the two: 0.5 and 0.5. Seeds ×
    images: dice's seed means +0.1 and 0 and no image effect make it the t-test of (0.1, 0),
    t = 1 with 1 degree of freedom, p = 0.5; focal has one seed (NaN); Holm: 1 and NaN."""
    summary = pd.read_csv(experiment / "summary.csv").set_index("group")
    assert (summary["reference"] == "bce").all()
    assert list(summary["verdict"]) == ["no detectable difference", "reference",
                                        "no detectable difference"]
    dice, bce, focal = summary.loc["dice"], summary.loc["bce"], summary.loc["focal"]
    assert math.isnan(bce["delta_dice"]) and math.isnan(bce["p_holm"])
    assert (dice["delta_dice"], dice["delta_dice_lo"], dice["delta_dice_hi"]) == pytest.approx(
        (0.05, 0.0, 0.1))
    assert (focal["delta_dice"], focal["delta_dice_lo"], focal["delta_dice_hi"]) == \
        pytest.approx((-0.08, -0.08, -0.08))
    shared_dice = np.array([[0.5, 0.6, 0.7], [0.6, 0.7, 0.8]])
    shared_bce = np.array([[0.4, 0.5, 0.6], [0.6, 0.7, 0.8]])
    assert dice["delta_iou"] == pytest.approx((iou(shared_dice) - iou(shared_bce)).mean())
    assert dice["p_wilcoxon"] == pytest.approx(0.25) and focal["p_wilcoxon"] == pytest.approx(0.25)
    assert dice["p_holm"] == pytest.approx(0.5) and focal["p_holm"] == pytest.approx(0.5)
    assert dice["p_mrmc"] == pytest.approx(0.5) and dice["p_mrmc_holm"] == pytest.approx(1.0)
    assert math.isnan(focal["p_mrmc"]) and math.isnan(focal["p_mrmc_holm"])


def test_ranks_and_their_bootstrap_intervals(experiment):
    """Images are resampled alike for all groups, so dice vs bce is decided by the seeds: bce's
    2 seeds average 0.5, 0.6, 0.7 (1/4, 1/2, 1/4), dice's 3 seeds 0.6 … 0.8 (below 0.7 with
    p = 10/27, exactly 0.7 with 7/27, 0.6 with 1/27). bce ranks first (ties share rank 1) with
    p = 1/4 · 17/27 + 1/2 · 1/27 = 19/108, dice second with p = 1/4 · 10/27 = 5/54."""
    summary = pd.read_csv(experiment / "summary.csv")
    assert list(summary["rank"]) == [1, 2, 3]
    assert list(summary["rank_lo"]) == [1, 1, 3] and list(summary["rank_hi"]) == [2, 2, 3]
    assert summary["rank_mean"].tolist() == pytest.approx([1 + 5 / 54, 2 - 19 / 108, 3],
                                                          abs=0.03)


# Per-image test Dice of an architecture experiment with clear verdicts: 8 images, 2 seeds.
REFERENCE = np.array([0.50, 0.60, 0.70, 0.80, 0.55, 0.65, 0.75, 0.85])
STEPS = np.arange(1, 9) / 100


def architecture_spec(root):
    spec = make_spec(root, {
        "unet": [(s, REFERENCE.mean(), 0.9, REFERENCE) for s in (0, 1)],
        "attention_unet": [(s, REFERENCE.mean() - 0.045, 0.8, REFERENCE - STEPS) for s in (0, 1)],
        "unetpp": [(s, REFERENCE.mean() + 0.045, 0.7, REFERENCE + STEPS) for s in (0, 1)],
    })
    for run in spec["runs"]:
        run["architecture"] = run.pop("loss")
    spec["axes"] = ["architecture"]
    return spec


def test_verdicts_in_words(tmp_path):
    """unet is the reference (best validation Dice). attention_unet is worse on all 8 images,
    unetpp better (exact p = 2/2⁸ each); Holm over two: 4/256 = 0.0156 for both. Both seeds
    give the same differences, so the seeds × images test is the t-test of the 8 image
    differences ±0.01 … ±0.08, Holm-adjusted: 2 · p."""
    aggregate_experiment("architecture", architecture_spec(tmp_path), tmp_path / "architecture")
    summary = pd.read_csv(tmp_path / "architecture" / "summary.csv").set_index("group")
    assert summary.loc["attention_unet", "p_holm"] == pytest.approx(4 / 256)
    p_mrmc = 2 * scipy.stats.ttest_1samp(STEPS, 0).pvalue
    assert summary.loc[["attention_unet", "unetpp"], "p_mrmc_holm"].tolist() == pytest.approx(
        [p_mrmc, p_mrmc])
    assert list(summary["verdict"]) == ["reference", "worse", "better"]
    assert list(summary["rank"]) == [2, 3, 1]
    write_summary([tmp_path / "architecture"], tmp_path / "summary.md")
    text = (tmp_path / "summary.md").read_text()

    def interval(group):
        lo, hi = summary.loc[group, ["delta_dice_lo", "delta_dice_hi"]]
        return f"[{lo:+.3f}, {hi:+.3f}]".replace("-", "−")

    assert (f"- attention_unet: worse than unet: ΔDice −0.045 {interval('attention_unet')}, "
            f"Holm p = 0.0156 (Wilcoxon), {p_mrmc:.3g} (seeds × images)") in text
    assert (f"- unetpp: better than unet: ΔDice +0.045 {interval('unetpp')}, Holm p = 0.0156 "
            f"(Wilcoxon), {p_mrmc:.3g} (seeds × images)" in text)
    assert "Varied: architecture; 3 group(s), 2 seed(s) each, 8 test images." in text
    assert "2000 resamples of the test images and the seeds" in text
    assert "Holm-adjusted over the 2 comparison(s)" in text
    assert "| **unet** | 2 | 0.675 [" in text and "| 2 [2, 2] |" in text


def test_the_baseline_stays_the_reference_within_one_standard_error(tmp_path):
    """b has the best mean validation Dice (0.76 vs 0.75), but b − a is +0.08 and −0.06 on the
    two seeds: mean 0.01, standard error 0.07. The baseline a stays the reference."""
    spec = make_spec(tmp_path, {"a": [(0, 0.6, 0.70), (1, 0.6, 0.80)],
                                "b": [(0, 0.7, 0.78), (1, 0.7, 0.74)]})
    spec["baseline"] = {"loss": "a"}
    aggregate_experiment("losses", spec, tmp_path / "losses")
    summary = pd.read_csv(tmp_path / "losses" / "summary.csv").set_index("group")
    assert (summary["reference"] == "a").all() and summary.loc["b", "delta_dice"] > 0
    write_summary([tmp_path / "losses"], tmp_path / "summary.md")
    assert ("Reference: **a** (val Dice 0.750 ± 0.635), the baseline: b has the best mean "
            "validation Dice (0.760), ahead of it by at most one standard error."
            in (tmp_path / "summary.md").read_text())
    spec["baseline"] = {"architecture": "unet"}
    with pytest.raises(SegpipeError, match="spec key 'baseline' must map every axis"):
        aggregate_experiment("losses", spec, tmp_path / "bad")


def _read_png(path):
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    return image


def test_figures_are_png_and_not_blank(experiment):
    """Every figure of a binary experiment without a sweep (the registry, segpipe.figures)."""
    drawn = figures_for(sweep=False, binary=True)
    for figure in drawn:
        path = experiment / f"{figure}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", figure
        image = _read_png(path)
        assert 300 <= min(image.shape[:2]) and max(image.shape[:2]) <= 4000, (figure, image.shape)
        assert image[..., :3].std() > 0.05, figure
    assert not (experiment / "sweep.png").exists()
    assert sorted(p.name for p in experiment.iterdir()) == sorted(
        [*(f"{figure}.png" for figure in drawn), "summary.csv", REFERENCE_RUNS])


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


def test_runs_scored_on_other_test_images_are_an_error(tmp_path):
    spec = make_spec(tmp_path, GROUPS)
    runs = tmp_path / "runs"
    first = runs / "unet__scratch__dice__plain__s0" / "per_image.csv"
    path = runs / "unet__scratch__bce__plain__s1" / "per_image.csv"
    table = pd.read_csv(path)
    table.loc[1, "name"] = "other"
    table.to_csv(path, index=False)
    with pytest.raises(SegpipeError, match=f"{path}: scored other test images than {first} "
                                           r"\(missing: case1; extra: other\)"):
        aggregate_experiment("losses", spec, tmp_path / "out")
    table.loc[1, "name"] = "case0"
    table.to_csv(path, index=False)
    with pytest.raises(SegpipeError, match=f"{path}: an image is listed twice"):
        aggregate_experiment("losses", spec, tmp_path / "out")
    path.unlink()
    with pytest.raises(SegpipeError, match=f"{path}: file not found"):
        aggregate_experiment("losses", spec, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_rows_in_another_order_are_matched_by_image_name(tmp_path):
    spec = make_spec(tmp_path, GROUPS)
    path = tmp_path / "runs" / "unet__scratch__focal__plain__s0" / "per_image.csv"
    pd.read_csv(path).iloc[::-1].to_csv(path, index=False)
    aggregate_experiment("losses", spec, tmp_path / "out")
    focal = pd.read_csv(tmp_path / "out" / "summary.csv").set_index("group").loc["focal"]
    assert (focal["delta_dice_lo"], focal["delta_dice_hi"]) == pytest.approx((-0.08, -0.08))


def test_groups_without_a_shared_seed_are_an_error(tmp_path):
    spec = make_spec(tmp_path, {"dice": GROUPS["dice"][1:], "focal": GROUPS["focal"]})
    with pytest.raises(SegpipeError, match=r"experiment 'losses': no seed is shared by all "
                                           r"groups \(dice: 1, 2; focal: 0\)"):
        aggregate_experiment("losses", spec, tmp_path / "out")


def test_runs_that_reached_no_snapshot_epoch(tmp_path):
    """Early stopping before the first snapshot epoch: curves are empty, samples use the best
    model's probabilities, which evaluate always stores; a file without them is an error."""
    runs = []
    for seed in (0, 1):
        folder = tmp_path / "runs" / f"s{seed}"
        write_run(folder, seed, 0.5, 0.6, snapshots=(), probs_best=True)
        runs.append({"run": folder.name, "dir": str(folder), "loss": "bce", "seed": seed})
    aggregate_experiment("early", {"axes": ["loss"], "runs": runs}, tmp_path / "out")
    for figure in ("curves", "evolution", "samples", "significance", "ranking"):
        assert _read_png(tmp_path / "out" / f"{figure}.png")[..., :3].std() > 0.05
    row = pd.read_csv(tmp_path / "out" / "summary.csv").iloc[0]  # one group: nothing to compare
    assert row["verdict"] == "reference" and math.isnan(row["p_holm"])
    assert (row["rank"], row["rank_lo"], row["rank_hi"]) == (1, 1, 1)
    write_summary([tmp_path / "out"], tmp_path / "summary.md")
    assert "One group: nothing to compare." in (tmp_path / "summary.md").read_text()

    write_run(tmp_path / "bare", 0, 0.5, 0.6, snapshots=(), probs_best=False)
    runs[0]["dir"] = str(tmp_path / "bare")
    with pytest.raises(SegpipeError, match=r"evolution.npz: missing array\(s\) probs_best"):
        aggregate_experiment("early", {"axes": ["loss"], "runs": runs}, tmp_path / "out2")


# Cross-validation: fold 0 tests case0..2, fold 1 case3..4; unet's per-image Dice, and its
# other metrics, validation Dice and snapshot scores per fold; attention_unet 0.1 lower.
FOLD_DICE = (np.array([0.5, 0.6, 0.7]), np.array([0.8, 0.9]))
FOLD_SCORE, FOLD_VAL = (0.6, 0.85), (0.7, 0.8)


def cv_spec(root, overlap=False):
    runs = []
    for architecture, shift in (("unet", 0.0), ("attention_unet", -0.1)):
        for seed in (0, 1):
            run = root / "runs" / f"{architecture}__s{seed}"
            folds = [run / "fold0", run / "fold1"]
            for fold, folder in enumerate(folds):
                write_run(folder, seed, FOLD_SCORE[fold] + shift, FOLD_VAL[fold] + shift,
                          snapshots=SNAPSHOTS[: 2 - fold], dice=FOLD_DICE[fold] + shift,
                          first_case=3 * fold - (overlap and seed == fold == 1))
            runs.append({"run": run.name, "dir": str(run), "folds": list(map(str, folds)),
                         "architecture": architecture, "seed": seed})
    return {"name": "architecture", "axes": ["architecture"], "sweep": None, "runs": runs}


def test_folds_are_pooled_image_by_image(tmp_path):
    aggregate_experiment("architecture", cv_spec(tmp_path), tmp_path / "out")
    summary = pd.read_csv(tmp_path / "out" / "summary.csv").set_index("group")
    unet, attention = summary.loc["unet"], summary.loc["attention_unet"]
    assert list(summary["n_images"]) == [5, 5]  # every image once per seed
    assert unet["dice_mean"] == pytest.approx(0.7)
    assert (unet["dice_fold0"], unet["dice_fold1"]) == pytest.approx((0.6, 0.85))
    assert (attention["dice_fold0"], attention["dice_fold1"]) == pytest.approx((0.5, 0.75))
    assert list(summary.columns).index("dice_fold1") + 1 == list(summary.columns).index(
        "val_dice_mean")
    # other metrics: the folds' values weighted by their 3 and 2 images
    assert unet["map_mean"] == pytest.approx((3 * 0.6 + 2 * 0.85) / 5)
    assert unet["val_dice_mean"] == pytest.approx(0.75)  # mean over folds (and seeds)
    assert unet["train_seconds_mean"] == pytest.approx(21.0)  # folds summed: 20 s and 22 s
    # attention_unet is 0.1 lower on all 5 images: the exact two-sided p is 2/2⁵
    assert unet["verdict"] == "reference" and attention["p_wilcoxon"] == pytest.approx(1 / 16)
    assert attention["delta_dice"] == pytest.approx(-0.1)

    write_summary([tmp_path / "out"], tmp_path / "summary.md")
    text = (tmp_path / "summary.md").read_text()
    assert ("2 group(s), 2 seed(s) each, 2-fold cross-validation: 5 test images, each tested "
            "once per seed") in text
    assert "| val Dice | Dice per fold | rank |" in text
    assert "| 0.600 · 0.850 |" in text and "| 0.500 · 0.750 |" in text


def test_snapshot_metrics_of_folds_are_weighted_by_their_images(tmp_path):
    """Fold 0 (3 images, snapshots at epochs 2 and 4, Dice 0.3 and 0.6) and fold 1 (2 images,
    stopped early: a snapshot at epoch 2 only, Dice 0.85)."""
    spec = cv_spec(tmp_path)
    _, curves, per_image = load_run([Path(folder) for folder in spec["runs"][0]["folds"]])
    assert list(curves["epoch"]) == [2, 4]
    assert curves["dice"].tolist() == pytest.approx([(3 * 0.3 + 2 * 0.85) / 5, 0.6])
    assert list(per_image["name"]) == [f"case{i}" for i in range(5)]
    assert list(per_image["fold"]) == [0, 0, 0, 1, 1]


def test_an_image_tested_by_two_folds_is_an_error(tmp_path):
    spec = cv_spec(tmp_path, overlap=True)
    run = tmp_path / "runs" / "unet__s1"
    with pytest.raises(SegpipeError, match=f"{run / 'fold0' / 'per_image.csv'} and "
                                           f"{run / 'fold1' / 'per_image.csv'} both score image "
                                           "case2: the folds of a run must test disjoint images"):
        aggregate_experiment("architecture", spec, tmp_path / "out")


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
    bce = next(line for line in losses.splitlines()
               if line.startswith("| **bce** | 2 | 0.600 ["))
    assert "| 0.600 ± 1.271 |" in bce  # mAP: Student t over the 2 seeds
    assert "Reference: **bce** (val Dice 0.850 ± 0.635), the best validation Dice." in losses
    assert "`unet__scratch__bce__plain__s1` (val Dice 0.900)" in losses
    # Dice, IoU: bootstrap interval (IoU = D / (2 − D) of 0.32, 0.42, 0.52: 0.190, 0.266,
    # 0.351, mean 0.269); mAP: no interval from one seed
    assert "| focal | 1 | 0.420 [0.320, 0.520] | 0.269 [0.190, 0.351] | 0.420 ± — |" in losses
    assert "1–3 seed(s) each, 3 test images" in losses
    assert ("- dice: no detectable difference (ΔDice +0.050 [+0.000, +0.100], Holm p = 0.5 "
            "(Wilcoxon), 1 (seeds × images))" in losses)
    assert ("- focal: no detectable difference (ΔDice −0.080 [−0.080, −0.080], Holm p = 0.5 "
            "(Wilcoxon))" in losses)  # one seed: no seeds × images test
    assert "Reference: **resunet** (val Dice 0.400 ± —), the best validation Dice" in architecture
    # 3 images cannot show a difference: the smallest two-sided p is 2/2³
    assert ("- unet: no detectable difference (ΔDice +0.700 [+0.700, +0.700], Holm p = 0.25 "
            "(Wilcoxon))" in architecture)
    assert "| 1.23 M |" in losses
    assert "[sweep](" not in text
    for name in ("curves", "bars", "significance", "ranking", "evolution", "samples"):
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


def test_class_summary_per_class_dice_and_paired_delta():
    """Class leaf defined on 3 images (the others were left out before), two groups of two
    seeds: dice.leaf_mean is the mean over seeds and images, delta_dice.leaf the mean paired
    difference, empty on the reference; the intervals hold their means."""
    ref = Scores((0, 1), np.array([[0.8, 0.6, 0.7], [0.9, 0.5, 0.7]]))
    other = Scores((0, 1), np.array([[0.7, 0.6, 0.4], [0.8, 0.4, 0.6]]))
    summary = pd.DataFrame({"group": ["ref", "other"], "reference": ["ref", "ref"]})
    table = class_summary(summary, {"leaf": {"ref": ref, "other": other}})
    assert list(table["n_images.leaf"]) == [3, 3]
    assert table["dice.leaf_mean"].tolist() == pytest.approx([4.2 / 6, 3.5 / 6])
    assert math.isnan(table.loc[0, "delta_dice.leaf"])
    assert table.loc[1, "delta_dice.leaf"] == pytest.approx(-0.7 / 6)
    assert (table["dice.leaf_lo"] <= table["dice.leaf_mean"]).all()
    assert (table["dice.leaf_mean"] <= table["dice.leaf_hi"]).all()
    assert table.loc[1, "delta_dice.leaf_lo"] <= -0.7 / 6 <= table.loc[1, "delta_dice.leaf_hi"]


def test_every_figure_has_its_caption_and_every_caption_a_figure():
    """The registry (segpipe.figures) is what the workflow declares and the report captions:
    a figure is its draw function and its caption file, nothing else."""
    report = Path(__file__).resolve().parents[1] / "workflow" / "report"
    assert {path.stem for path in report.glob("*.rst")} - {"summary"} == set(FIGURES)
    assert set(figures_for(sweep=True, binary=False)) == set(FIGURES)
    assert set(FIGURES) - set(figures_for(sweep=False, binary=True)) == {
        "sweep", "classes", "confusion"}
