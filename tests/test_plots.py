"""Figures: the colour code on hand-made masks, and that each figure shows the data it is given."""

import io

import matplotlib
import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from matplotlib.container import BarContainer

from segpipe import plots
from segpipe.labels import Labels
from segpipe.plots import (
    BACKGROUND,
    FALSE_POSITIVE,
    FOREGROUND,
    MISSED,
    NEWLY_CORRECT,
    NEWLY_WRONG,
    PALETTE,
    change_map,
    group_colours,
    plot_bars,
    plot_curves,
    plot_evolution,
    plot_ranking,
    plot_samples,
    plot_significance,
    plot_sweep,
)

B, F, NC, NW, M, FP = BACKGROUND, FOREGROUND, NEWLY_CORRECT, NEWLY_WRONG, MISSED, FALSE_POSITIVE


def rendered(fig):
    """The figure as an RGB(A) array, via a real PNG encode/decode."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    buffer.seek(0)
    image = matplotlib.image.imread(buffer, format="png")
    assert image[..., :3].std() > 0.05
    return image


def test_change_map_hand_computed():
    truth = np.array([[1, 1, 0, 0, 0], [1, 0, 0, 1, 1]])
    previous = np.array([[1, 0, 1, 0, 0], [0, 0, 1, 1, 1]])
    current = np.array([[1, 1, 0, 1, 0], [0, 1, 1, 0, 1]])
    assert change_map(truth, previous, current).tolist() == [[F, NC, NC, NW, B],
                                                             [M, NW, FP, NW, F]]
    # without a previous prediction only correct / missed / false positive remain
    assert change_map(truth, current, current).tolist() == [[F, F, B, FP, B], [M, FP, FP, M, F]]


def test_group_colours():
    assert len(set(group_colours(11))) == 11
    viridis = matplotlib.colormaps["viridis"]
    assert group_colours(3, [0.5, 1.0, 0.0]) == [viridis(0.45), viridis(0.9), viridis(0.0)]


TRUTH = np.array([[[1, 1, 0], [0, 0, 0]]], np.uint8)  # one 2x3 image
SNAPSHOTS = np.array([[[[0.9, 0.2, 0.6], [0.1, 0.1, 0.1]]],
                      [[[0.9, 0.7, 0.4], [0.1, 0.5, 0.1]]]], np.float16)  # (S=2, K=1, 2, 3)


def evolution(probs=SNAPSHOTS, dice=((0.5,), (0.8,))):
    """``dice``: (S, K) the scores evaluate computed, which the titles show."""
    return {"epochs": np.array([1, 3]), "probs": probs, "masks": TRUTH, "names": np.array(["x"]),
            "images": np.full((1, 2, 3, 3), 128, np.uint8), "dice": np.array(dice)}


def test_evolution_colours_each_snapshot_against_the_previous_one():
    fig = plot_evolution([("unet", evolution(), 0),
                          ("resunet", evolution(SNAPSHOTS[::-1], ((0.8,), (0.5,))), 0)],
                         "t", threshold=0.5)
    first, second = fig.axes[2], fig.axes[3]
    # epoch 1 vs an empty mask: prediction [[1,0,1],[0,0,0]]; Dice 2·1/(2+2), as evaluate
    # computed it (the title shows evolution.npz's "dice")
    assert np.array_equal(first.images[0].get_array(), PALETTE[[[NC, M, NW], [B, B, B]]])
    assert first.get_title() == "epoch 1 · Dice 0.50"
    # epoch 3 (0.5 counts as foreground): [[1,1,0],[0,1,0]]; Dice 2·2/(2+3)
    assert np.array_equal(second.images[0].get_array(), PALETTE[[[F, NC, NC], [B, NW, B]]])
    assert second.get_title() == "epoch 3 · Dice 0.80"
    assert np.array_equal(fig.axes[1].images[0].get_array(), PALETTE[TRUTH[0] * F])
    assert fig.axes[4].get_ylabel() == "resunet\nx"
    rendered(fig)


def test_samples_colour_each_group_against_the_truth():
    fig = plot_samples(["unet", "resunet"], [SNAPSHOTS[1], SNAPSHOTS[0]],
                       [np.array([0.8]), np.array([0.5])], evolution()["images"], TRUTH, ["x"],
                       "t", threshold=0.5)
    assert [ax.get_ylabel() for ax in fig.axes] == ["image", "truth", "unet", "resunet"]
    assert np.array_equal(fig.axes[2].images[0].get_array(), PALETTE[[[F, F, B], [B, FP, B]]])
    assert fig.axes[2].get_title() == "Dice 0.80"
    assert np.array_equal(fig.axes[3].images[0].get_array(), PALETTE[[[F, M, FP], [B, B, B]]])
    assert fig.axes[3].get_title() == "Dice 0.50"
    rendered(fig)


def summary_table(n):
    metrics = ("dice", "iou", "map", "precision", "recall")
    return pd.DataFrame([{"group": f"group_{i}",
                          **{f"{m}_mean": 0.5 + 0.01 * i + 0.1 * j for j, m in enumerate(metrics)},
                          **{f"{m}_ci95": 0.02 for m in metrics}} for i in range(n)])


def by_epoch_table(n):
    return pd.DataFrame([{"group": f"group_{i}", "epoch": e, "map_mean": 0.1 * e + 0.01 * i,
                          "map_ci95": 0.05, "dice_mean": 0.1 * e, "dice_ci95": np.nan}
                         for i in range(n) for e in (1, 2, 4)])


@pytest.mark.parametrize("n", [2, 11])
def test_curves_show_group_means_and_bands_for_few_groups(n):
    groups = [f"group_{i}" for i in range(n)]
    fig = plot_curves(by_epoch_table(n), groups, group_colours(n), "t")
    map_axes, dice_axes = fig.axes
    assert map_axes.lines[1].get_xdata().tolist() == [1, 2, 4]
    assert map_axes.lines[1].get_ydata() == pytest.approx([0.11, 0.21, 0.41])
    assert dice_axes.get_title() == "test Dice"
    assert len(map_axes.collections) == (n if n <= 4 else 0)
    rendered(fig)


def test_bars_heights_and_error_bars_are_the_group_statistics():
    fig = plot_bars(summary_table(3), group_colours(3), "t")
    ax = fig.axes[0]
    bars = [c for c in ax.containers if isinstance(c, BarContainer)][2]  # third group: i = 2
    assert [bar.get_height() for bar in bars] == pytest.approx([0.52, 0.62, 0.72, 0.82, 0.92])
    whiskers = bars.errorbar.lines[2][0].get_segments()
    assert np.array([seg[:, 1] for seg in whiskers]) == pytest.approx(
        np.array([[0.50, 0.54], [0.60, 0.64], [0.70, 0.74], [0.80, 0.84], [0.90, 0.94]]))
    assert [t.get_text() for t in ax.get_xticklabels()] == ["Dice", "IoU", "mAP", "precision",
                                                            "recall"]
    rendered(fig)


def test_bars_use_the_bootstrap_interval_where_there_is_one():
    table = summary_table(2).assign(dice_lo=[0.40, 0.45], dice_hi=[0.55, 0.60])
    fig = plot_bars(table, group_colours(2), "t")
    bars = [c for c in fig.axes[0].containers if isinstance(c, BarContainer)][1]
    whiskers = bars.errorbar.lines[2][0].get_segments()
    assert whiskers[0][:, 1] == pytest.approx([0.45, 0.60])  # Dice: asymmetric, lo to hi
    assert whiskers[1][:, 1] == pytest.approx([0.59, 0.63])  # IoU: mean ± ci95
    rendered(fig)


def test_significance_map_fills_the_cells_where_the_row_is_better():
    p = np.array([[np.nan, 0.01, 0.0004], [1.0, np.nan, 0.2], [1.0, 1.0, np.nan]])
    fig = plot_significance(["unet", "unetpp", "r2unet"], [0.75, 0.74, 0.5], p, 0.05, "t")
    ax = fig.axes[0]
    cells = ax.images[0].get_array()
    assert cells.mask.tolist() == np.eye(3, dtype=bool).tolist()  # the diagonal is blank
    assert cells.filled(-1).tolist() == [[-1, 1, 1], [0, -1, 0], [0, 0, -1]]
    texts = {(t.get_position(), t.get_text()) for t in ax.texts}
    assert {((1, 0), "0.01"), ((2, 0), "<0.001"), ((2, 1), "0.2"), ((0, 1), "1")} <= texts
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["unet\n0.750", "unetpp\n0.740", "r2unet\n0.500"]
    assert [t.get_text() for t in ax.get_xticklabels()] == labels
    assert "significantly better" in ax.get_ylabel() and "Holm" in ax.get_title(loc="left")
    rendered(fig)


def test_ranking_blobs_have_the_area_of_their_frequency():
    ranks = np.array([[1, 2], [1, 2], [1, 2], [2, 1]])  # 4 resamples, 2 groups
    fig = plot_ranking(["a", "b"], ranks, [1, 2], [1, 1], [2, 2], group_colours(2), "t")
    ax = fig.axes[0]
    blobs_a, blobs_b, marks = ax.collections[0], ax.collections[1], ax.collections[3]
    assert blobs_a.get_offsets().tolist() == [[0, 1], [0, 2]]
    assert blobs_a.get_sizes() / blobs_a.get_sizes().sum() == pytest.approx([0.75, 0.25])
    assert blobs_b.get_offsets().tolist() == [[1, 1], [1, 2]]
    assert blobs_b.get_sizes() / blobs_b.get_sizes().sum() == pytest.approx([0.25, 0.75])
    intervals = ax.collections[2].get_segments()
    assert [seg[:, 1].tolist() for seg in intervals] == [[1, 2], [1, 2]]
    assert marks.get_offsets().tolist() == [[0, 1], [1, 2]]
    assert ax.get_ylim() == (2.6, 0.4)  # rank 1 on top
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b"]
    rendered(fig)


def test_sweep_orders_points_by_value():
    fig = plot_sweep(summary_table(3), [1.0, 0.0, 0.5], "loss dice", "t")
    ax = fig.axes[0]
    dice = ax.lines[0]
    assert dice.get_xdata().tolist() == [0.0, 0.5, 1.0]
    assert dice.get_ydata() == pytest.approx([0.51, 0.52, 0.50])
    assert ax.get_xlabel() == "loss dice"
    assert [line.get_label() for line in ax.lines] == ["Dice", "IoU", "mAP"]
    rendered(fig)


# --------------------------------------------------------------------------- many classes

def test_confusion_merges_the_classes_of_least_support(monkeypatch):
    """With more classes than MAX_CONFUSION_CLASSES (here 3), those of the most true pixels
    over all groups are kept and the others summed into "other", as truth and prediction."""
    monkeypatch.setattr(plots, "MAX_CONFUSION_CLASSES", 3)
    first = np.array([[8, 1, 0, 1],    # background: 10 true pixels
                      [0, 1, 0, 0],    # a: 1
                      [1, 0, 2, 1],    # b: 4
                      [0, 2, 0, 3]])   # c: 5
    second = np.eye(4, dtype=np.int64)  # one pixel each: support 11, 2, 5, 6
    fig = plots.plot_confusion([first, second], ["g1", "g2"], ["background", "a", "b", "c"], "t")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["background", "c", "other (2)"]
    # kept: background, c (in class order); other: a + b. Rows normalised by their totals.
    expected = np.array([[8, 1, 1], [0, 3, 2], [1, 1, 3]]) / np.array([[10], [5], [5]])
    assert [float(t.get_text()) for t in ax.texts] == pytest.approx(
        np.round(expected, 2).ravel().tolist())
    assert fig._suptitle.get_text().replace("\n", " ") == \
        "t (2 classes with the most test pixels; the 2 others as one)"


def many_classes(k=254):
    return [f"class{i:03d}" for i in range(k)]


def test_class_figures_are_bounded_for_any_number_of_classes():
    """254 classes: the issue's 21 708 x 10 920 px confusion.png and 39 768 x 510 classes.png
    (two groups) become figures of a few megapixels that name the classes they show."""
    names = many_classes()
    rng = np.random.default_rng(0)
    matrices = [rng.integers(0, 50, (255, 255)) for _ in range(2)]
    fig = plots.plot_confusion(matrices, ["unet", "attention_unet"], ["background", *names], "t")
    width, height = fig.get_size_inches() * fig.dpi
    assert width * height < 4e6 and len(fig.axes[0].texts) == plots.MAX_CONFUSION_CLASSES ** 2
    summary = pd.DataFrame([{"group": group, **{f"n_images.{c}": i % 5 for i, c in
                                                enumerate(names)},
                             **{f"dice.{c}_{end}": value for c in names
                                for end, value in (("mean", 0.5), ("lo", 0.4), ("hi", 0.6))}}
                            for group in ("unet", "attention_unet")])
    fig = plots.plot_class_bars(summary, names, group_colours(2), "t")
    width, height = fig.get_size_inches() * fig.dpi
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert width * height < 4e6 and len(ticks) == plots.MAX_CLASS_BARS // 2
    # the classes of 4 test images (every fifth, from class004) first, then 3 images ...
    assert ticks[:3] == ["class004", "class009", "class014"]
    assert ticks[-1] == f"other\n({len(names) - len(ticks) + 1})"
    bars = [c for c in fig.axes[0].containers if isinstance(c, BarContainer)]
    assert [bar.get_height() for bar in bars[0]] == pytest.approx([0.5] * len(ticks))
    rendered(fig)


def test_the_class_legend_lists_the_classes_shown():
    labels = Labels(tuple(many_classes()), configured=True)
    truth = np.zeros((1, 4, 6), np.uint8)
    truth[0, :2, :3], truth[0, 2:, 3:] = 7, 200
    probs = np.zeros((1, 255, 4, 6), np.float16)
    probs[0, 7] = 1.0
    fig = plot_samples(["unet"], [probs], [np.array([0.5])], np.zeros((1, 4, 6, 3), np.uint8),
                       truth, ["x"], "t", threshold=0.5, labels=labels)
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["class006", "class199", "missed",
                                                         "dim: correct"]
