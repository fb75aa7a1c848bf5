"""Every figure segpipe draws: each function builds and returns a matplotlib ``Figure``
(:func:`plot_predictions`, a run's predictions.png, also writes it).

The figures are pure functions of already aggregated tables and arrays (``segpipe.aggregate``
computes the statistics and writes the files; :mod:`segpipe.figures` says which figures an
experiment has and calls these). They use the object-oriented API
(``Figure()`` rather than ``pyplot``), so no GUI backend or global state is involved.

Colour code of the mask panels (:func:`change_map`), comparing a thresholded prediction
with the truth and with the previous snapshot's prediction:

* black: background, correct (and already correct before)
* light grey: foreground, correct (and already correct before)
* green: newly correct (wrong in the previous prediction)
* red: newly wrong (correct in the previous prediction)
* orange: missed foreground (already missed before)
* magenta: false positive (already wrong before)

With no previous prediction (``previous = current``) only black, grey, orange and magenta occur.

With several classes the mask panels use the classes' VOC palette colours
(:func:`class_error_image`): a correct pixel in its class's colour, dimmed; a wrong one at full
brightness in the colour of the class it was *predicted* as (so a confusion shows which class
it was taken for), white where a class was missed (predicted background); ignored pixels grey.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from segpipe.columns import CURVES
from segpipe.files import atomic_path
from segpipe.labels import IGNORE, Labels

DPI = 120
CELL_INCHES = 1.6  # height of one image panel
MAX_BANDS = 4  # curves draw CI bands only up to this many groups (more would hide the lines)
# With many classes the class figures show those with the most support, so that they stay
# readable and bounded in size whatever the number of classes; summary.csv has them all.
MAX_CLASS_BARS = 40  # bars of classes.png (classes x groups), the rest one "other" cluster
MAX_CONFUSION_CLASSES = 20  # rows and columns of a confusion matrix, the rest one "other"
MAX_LEGEND_CLASSES = 24  # classes in the legend of the mask panels (those with most pixels)

BACKGROUND, FOREGROUND, NEWLY_CORRECT, NEWLY_WRONG, MISSED, FALSE_POSITIVE = range(6)
PALETTE = np.array(
    [
        [0.0, 0.0, 0.0],  # background
        [0.82, 0.82, 0.82],  # foreground
        [0.13, 0.75, 0.25],  # newly correct
        [0.90, 0.10, 0.10],  # newly wrong
        [1.00, 0.60, 0.00],  # missed foreground
        [0.85, 0.20, 0.85],  # false positive
    ]
)
EVOLUTION_LEGEND = ("background", "foreground", "newly correct", "newly wrong",
                    "still missed", "still false positive")
SAMPLES_LEGEND = ("background", "foreground", None, None, "missed", "false positive")

SIGNIFICANCE_COLOURS = {True: "#2b6cb0", False: "#e8edf3"}
DIAGONAL_COLOUR = "white"
BLOB_AREA = 700  # points² of a blob holding every resample

BAR_METRICS = {"dice": "Dice", "iou": "IoU", "map": "mAP", "precision": "precision",
               "recall": "recall"}
SWEEP_METRICS = {"dice": "Dice", "iou": "IoU", "map": "mAP"}


def group_colours(n: int, values: Sequence[float] | None = None) -> list[tuple]:
    """One colour per group: qualitative (tab10, tab20 beyond 10 groups), or, when the groups
    are points of a numeric sweep, sequential (viridis) by ``values``."""
    if values is not None:
        v = np.asarray(values, dtype=float)
        span = np.ptp(v) or 1.0
        return [matplotlib.colormaps["viridis"](0.9 * (x - v.min()) / span) for x in v]
    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def change_map(truth: np.ndarray, previous: np.ndarray, current: np.ndarray) -> np.ndarray:
    """Per-pixel category (``BACKGROUND`` … ``FALSE_POSITIVE``) of binary ``current`` against
    binary ``truth`` and the binary ``previous`` prediction; all arrays (H, W)."""
    truth, previous, current = (np.asarray(a, dtype=bool) for a in (truth, previous, current))
    correct, was_correct = current == truth, previous == truth
    category = np.where(truth, FOREGROUND, BACKGROUND)
    category[~correct & truth] = MISSED
    category[~correct & ~truth] = FALSE_POSITIVE
    category[correct & ~was_correct] = NEWLY_CORRECT
    category[~correct & was_correct] = NEWLY_WRONG
    return category


def _wrap(label: str, width: int = 16) -> str:
    """Break a long group label at spaces (e.g. around " / "), never inside a name."""
    return "\n".join(textwrap.wrap(label, width, break_long_words=False,
                                   break_on_hyphens=False)) or label


def _legend_columns(labels: Sequence[str], width: float) -> int:
    """Legend columns that fit ``width`` inches: a 9 pt character is about 0.075 in wide,
    the marker and spacing about 0.7 in."""
    entry = 0.7 + 0.075 * max(map(len, labels))
    return max(1, min(len(labels), int(width // entry)))


def _legend_height(labels: Sequence[str], width: float) -> float:
    """Inches the legend below a ``width``-inch figure takes."""
    return 0.25 * -(-len(labels) // _legend_columns(labels, width))


def _legend_below(fig: Figure, handles: list, labels: list[str]) -> None:
    fig.legend(handles, labels, loc="outside lower center", frameon=False, fontsize=9,
               ncols=_legend_columns(labels, fig.get_figwidth()))


def _clip_to_unit(ax) -> None:
    """Keep a score axis within [0, 1] (and a margin) even where a CI band reaches beyond."""
    bottom, top = ax.get_ylim()
    ax.set_ylim(max(bottom, -0.02), min(top, 1.02))


def _interval(table: pd.DataFrame, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper end of the 95 % CI of ``metric`` in each row of a summary table: its
    bootstrap interval (``<metric>_lo``, ``<metric>_hi``) where the table has one, else
    ``<metric>_mean`` ∓ ``<metric>_ci95``."""
    if f"{metric}_lo" in table:
        return table[f"{metric}_lo"].to_numpy(float), table[f"{metric}_hi"].to_numpy(float)
    mean, ci = table[f"{metric}_mean"].to_numpy(float), table[f"{metric}_ci95"].to_numpy(float)
    return mean - ci, mean + ci


def _caption(ax, text: str, inches: float) -> None:
    """A caption-like explanation above the axes, wrapped to ``inches`` (about 13 characters
    of 8 pt per inch)."""
    ax.set_title(textwrap.fill(text, int(13 * inches)), fontsize=8, color="0.25", loc="left")


def plot_curves(by_epoch: pd.DataFrame, groups: Sequence[str], colours: Sequence,
                title: str) -> Figure:
    """Test mAP and Dice vs epoch: one line per group (mean over seeds), shaded 95 % CI
    when there are at most ``MAX_BANDS`` groups.

    ``by_epoch`` has columns ``group, epoch, map_mean, map_ci95, dice_mean, dice_ci95``.
    """
    fig = Figure(figsize=(11, 4 + _legend_height(groups, 11)), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, (metric, label) in zip(axes, CURVES.items()):
        for group, colour in zip(groups, colours):
            rows = by_epoch[by_epoch["group"] == group]
            ax.plot(rows["epoch"], rows[f"{metric}_mean"], marker="o", markersize=3,
                    color=colour, label=group)
            if len(groups) <= MAX_BANDS:
                ax.fill_between(rows["epoch"], *_interval(rows, metric), color=colour,
                                alpha=0.15, linewidth=0)
        ax.set(title=label, xlabel="epoch", ylabel=label)
        if by_epoch.empty:
            ax.text(0.5, 0.5, "no snapshot epoch was reached", transform=ax.transAxes,
                    ha="center", va="center", color="0.4")
            ax.set(xticks=[], ylim=(0, 1))
        _clip_to_unit(ax)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    _legend_below(fig, *axes[0].get_legend_handles_labels())
    fig.suptitle(title)
    return fig


def plot_bars(summary: pd.DataFrame, colours: Sequence, title: str) -> Figure:
    """Grouped bars of the main test metrics, one bar per group, 95 % CI error bars."""
    n = len(summary)
    fig = Figure(figsize=(11, 4.2 + _legend_height(summary["group"], 11)), dpi=DPI,
                 layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(BAR_METRICS))
    width = 0.8 / n
    means = summary[[f"{m}_mean" for m in BAR_METRICS]].to_numpy(float)
    # (metrics, low/high, groups) -> low and high, each (groups, metrics)
    lows, highs = np.array([_interval(summary, m) for m in BAR_METRICS]).transpose(1, 2, 0)
    for i, (group, colour) in enumerate(zip(summary["group"], colours)):
        ax.bar(x + (i - (n - 1) / 2) * width, means[i], width,
               yerr=[means[i] - lows[i], highs[i] - means[i]], color=colour, label=group,
               capsize=min(3, 12 / n), error_kw={"linewidth": 0.8})
    ax.set_xticks(x, list(BAR_METRICS.values()))
    ax.set(ylim=(0, 1.05), ylabel="test score (mean, 95 % CI)")
    ax.grid(axis="y", alpha=0.3)
    _legend_below(fig, *ax.get_legend_handles_labels())
    fig.suptitle(title)
    return fig


def plot_sweep(summary: pd.DataFrame, x: Sequence[float], xlabel: str, title: str) -> Figure:
    """Test Dice, IoU and mAP vs the numeric value ``x`` of each group, with 95 % CI bands."""
    fig = Figure(figsize=(7.5, 4.5), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    table = summary.assign(x=np.asarray(x, dtype=float)).sort_values("x")
    for (metric, label), colour in zip(SWEEP_METRICS.items(), group_colours(3)):
        ax.plot(table["x"], table[f"{metric}_mean"], marker="o", markersize=4, color=colour,
                label=label)
        ax.fill_between(table["x"], *_interval(table, metric), color=colour, alpha=0.15,
                        linewidth=0)
    if len(table) <= 12:
        ax.set_xticks(table["x"], [f"{v:g}" for v in table["x"]])
    ax.set(xlabel=xlabel, ylabel="test score (mean, 95 % CI)")
    _clip_to_unit(ax)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    fig.suptitle(title)
    return fig


def plot_significance(groups: Sequence[str], means: Sequence[float], p_values: np.ndarray,
                      alpha: float, title: str) -> Figure:
    """challengeR's pairwise significance map (Wiesenfarth et al. 2021): cell (i, j) filled
    where group i is significantly better than group j (``p_values[i, j] < alpha``), groups in
    the given order (by mean Dice, best first) on both axes, each cell labelled with its p.

    ``p_values``: (G, G) one-sided p-values (:func:`segpipe.stats.significance`), NaN on the
    diagonal."""
    n = len(groups)
    side = min(11.0, 3.2 + 0.75 * n)
    fig = Figure(figsize=(side + 1.5, side + 0.6), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    better = np.where(np.isnan(p_values), np.nan, p_values < alpha)
    colours = ListedColormap([SIGNIFICANCE_COLOURS[False], SIGNIFICANCE_COLOURS[True]]
                             ).with_extremes(bad=DIAGONAL_COLOUR)
    ax.imshow(np.ma.masked_invalid(better), cmap=colours, vmin=0, vmax=1)
    labels = [f"{_wrap(group)}\n{mean:.3f}" for group, mean in zip(groups, means)]
    ax.set_xticks(range(n), labels, fontsize=8, rotation=90 if n > 6 else 0)
    ax.set_yticks(range(n), labels, fontsize=8)
    ax.set_xticks(np.arange(n + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(n + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="white", linewidth=2)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("… than this group (column; mean test Dice below the name)")
    ax.set_ylabel("is this group (row) significantly better …")
    for i, j in zip(*np.nonzero(~np.isnan(p_values))):
        p = p_values[i, j]
        ax.text(j, i, _p_text(p), ha="center", va="center", fontsize=8 if n <= 8 else 6,
                color="white" if p < alpha else "0.35")
    if n == 1:
        ax.text(0, 0, "one group:\nnothing to compare", ha="center", va="center", fontsize=9)
    handles = [Patch(facecolor=SIGNIFICANCE_COLOURS[True],
                     label=f"row better than column (Holm p < {alpha:g})"),
               Patch(facecolor=SIGNIFICANCE_COLOURS[False], label="not significant")]
    _legend_below(fig, handles, [h.get_label() for h in handles])
    _caption(ax, "Filled: the row group is significantly better than the column group by "
                 "both one-sided tests — Wilcoxon signed-rank on the per-image differences of "
                 "test Dice (averaged over shared seeds) and seeds × images — each "
                 "Holm-adjusted over all ordered pairs; numbers are the larger adjusted "
                 "p-value. Groups ordered by mean test Dice, best first.", side - 0.4)
    fig.suptitle(title)
    return fig


def _p_text(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.2g}"


def plot_ranking(groups: Sequence[str], ranks: np.ndarray, full_rank: Sequence[int],
                 rank_low: Sequence[int], rank_high: Sequence[int], colours: Sequence,
                 title: str) -> Figure:
    """Rank stability as a blob plot (challengeR, Wiesenfarth et al. 2021): for each group
    (x, in the given order: by rank on all data), a blob at every rank it takes in the
    bootstrap ``ranks`` (n_resamples, G) with area ∝ its frequency, its 95 % rank interval
    [``rank_low``, ``rank_high``] as a line and its rank on all data (``full_rank``) as ×."""
    n_resamples, n = ranks.shape
    fig = Figure(figsize=(max(7.5, 3.0 + 0.9 * n), 5.2), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    for x, (column, colour) in enumerate(zip(ranks.T, colours)):
        rank, count = np.unique(column, return_counts=True)
        ax.scatter(np.full(len(rank), x), rank, s=BLOB_AREA * count / n_resamples, color=colour,
                   alpha=0.75, linewidths=0)
    ax.vlines(range(n), rank_low, rank_high, color="black", linewidth=1.5)
    ax.scatter(range(n), full_rank, marker="x", color="black", s=40, zorder=3)
    ax.set_xticks(range(n), [_wrap(g) for g in groups], fontsize=8,
                  rotation=90 if n > 6 else 0)
    ax.set(xlim=(-0.6, n - 0.4), ylim=(n + 0.6, 0.4), yticks=range(1, n + 1),
           ylabel="rank by mean test Dice (1 = best)")
    ax.grid(axis="y", alpha=0.3)
    shares = (0.1, 0.5, 1.0)
    handles = [Line2D([], [], linestyle="", marker="o", markersize=np.sqrt(BLOB_AREA * f),
                      color="0.5", markeredgewidth=0) for f in shares]
    handles += [Line2D([], [], linestyle="", marker="x", color="black"),
                Line2D([], [], color="black", linewidth=1.5)]
    fig.legend(handles, [*(f"{f:.0%} of resamples" for f in shares), "rank on all data",
                         "95 % rank interval"], loc="outside right upper", frameon=False,
               fontsize=8, labelspacing=2.0, borderpad=1.0)
    _caption(ax, f"Rank by mean test Dice in each of {n_resamples} bootstrap resamples of the "
                 "test images and seeds; blob area ∝ how often the group took that rank. Blobs "
                 "spread over several ranks: an unstable rank.",
             fig.get_figwidth() - 2.2)
    fig.suptitle(title)
    return fig


def _mask_axes(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _colour_legend(fig: Figure, labels: Sequence[str | None]) -> None:
    handles = [Patch(facecolor=PALETTE[i], edgecolor="0.4", label=label)
               for i, label in enumerate(labels) if label]
    _legend_below(fig, handles, [h.get_label() for h in handles])


def _panel_figure(rows: int, columns: int, aspect: float) -> tuple[Figure, np.ndarray]:
    width = max(6.0, columns * CELL_INCHES * aspect + 1.2)
    fig = Figure(figsize=(width, rows * (CELL_INCHES + 0.35) + 1.0), dpi=DPI,
                 layout="constrained")
    return fig, fig.subplots(rows, columns, squeeze=False)


DIM = 0.4  # brightness of correct pixels in class_error_image
MISSED_COLOUR = (1.0, 1.0, 1.0)
IGNORED_COLOUR = (0.5, 0.5, 0.5)


def class_error_image(truth: np.ndarray, prediction: np.ndarray, labels: Labels) -> np.ndarray:
    """RGB float (H, W, 3) of a multi-class ``prediction`` against ``truth`` (class maps
    (H, W)): see the module docstring."""
    palette = np.array(labels.palette(), float) / 255
    wrong = prediction != truth
    image = np.where(wrong[..., None], palette[prediction], DIM * palette[truth])
    image[wrong & (prediction == 0)] = MISSED_COLOUR
    image[truth == IGNORE] = IGNORED_COLOUR
    return image


def _shown_classes(shown: Sequence[np.ndarray], labels: Labels,
                   background: bool = False) -> tuple[list[int], int]:
    """The classes (mask values; 0 only with ``background``) of the class maps ``shown``, at
    most :data:`MAX_LEGEND_CLASSES` of them (those of most pixels, in class order), and how
    many others they show."""
    counts = np.bincount(np.concatenate([np.ravel(m) for m in shown]), minlength=256)
    counts = counts[:len(labels.class_names)]
    if not background:
        counts[0] = 0
    present = [int(c) for c in np.argsort(-counts, kind="stable") if counts[c] > 0]
    return sorted(present[:MAX_LEGEND_CLASSES]), max(0, len(present) - MAX_LEGEND_CLASSES)


def _more(others: int) -> tuple[list, list[str]]:
    """A last legend entry, without a patch, counting the classes not listed."""
    return ([Patch(visible=False)], [f"+ {others} more classes"]) if others else ([], [])


def _class_legend(fig: Figure, labels: Labels, shown: Sequence[np.ndarray]) -> None:
    """The legend of the class panels: the classes the class maps ``shown`` hold
    (:func:`_shown_classes`), missed and dimmed correct pixels."""
    palette = np.array(labels.palette(), float) / 255
    listed, others = _shown_classes(shown, labels)
    more_handles, more_names = _more(others)
    handles = [*(Patch(facecolor=palette[c], edgecolor="0.4") for c in listed), *more_handles,
               Patch(facecolor=MISSED_COLOUR, edgecolor="0.4"),
               Patch(facecolor=DIM * palette[1], edgecolor="0.4")]
    names = [*(labels.class_names[c] for c in listed), *more_names, "missed", "dim: correct"]
    _legend_below(fig, handles, names)


def _mask_panel(ax, truth: np.ndarray, current: np.ndarray, labels: Labels | None,
                previous: np.ndarray | None = None) -> None:
    """Draw ``current`` against ``truth`` (and ``previous``)."""
    if labels is None or labels.binary:
        truth, current = truth.astype(bool), current.astype(bool)
        previous = current if previous is None else previous.astype(bool)
        ax.imshow(PALETTE[change_map(truth, previous, current)])
        return
    ax.imshow(class_error_image(truth, current, labels))


def _truth_panel(ax, truth: np.ndarray, labels: Labels | None) -> None:
    if labels is None or labels.binary:
        ax.imshow(PALETTE[np.where(truth.astype(bool), FOREGROUND, BACKGROUND)])
    else:
        ax.imshow(np.array(labels.palette(), np.uint8)[truth])


def plot_evolution(examples: Sequence[tuple[str, dict[str, np.ndarray], int]], title: str, *,
                   threshold: float, labels: Labels | None = None) -> Figure:
    """Mask evolution over training: one row per (group, test image); columns: image, truth,
    then the prediction (probability ≥ ``threshold``) at each snapshot epoch, coloured by
    :func:`change_map` against the previous snapshot (an empty mask before the first one).

    ``examples``: (group label, evolution.npz contents, index of the image in it), whose
    ``dice`` is the image's Dice at each snapshot as evaluation computed it (at the original
    size; the masks shown may be resized to fit); ``threshold``: the evaluation's
    (``evaluate.threshold``); ``labels``: with several classes, the class colours of the module
    docstring.
    """
    columns = 2 + max(len(data["epochs"]) for _, data, _ in examples)
    height, width = examples[0][1]["masks"].shape[1:]
    labels = labels or Labels()
    fig, axes = _panel_figure(len(examples), columns, width / height)
    shown = []
    for row, (group, data, k) in zip(axes, examples):
        truth = data["masks"][k]
        shown.append(truth)
        row[0].imshow(data["images"][k])
        row[0].set_ylabel(f"{_wrap(group)}\n{data['names'][k]}", fontsize=8)
        _truth_panel(row[1], truth, labels)
        previous = np.zeros_like(truth)
        for ax, epoch, probs, dice in zip(row[2:], data["epochs"], data["probs"][:, k],
                                          data["dice"][:, k]):
            current = labels.predict(probs.astype(np.float32), threshold)
            shown.append(current)
            _mask_panel(ax, truth, current, labels, previous)
            ax.set_title(f"epoch {epoch} · Dice {dice:.2f}", fontsize=8)
            previous = current
        for ax in row:
            _mask_axes(ax)
            if not ax.images:
                ax.set_visible(False)
    axes[0, 0].set_title("image", fontsize=9)
    axes[0, 1].set_title("truth", fontsize=9)
    if labels.binary:
        _colour_legend(fig, EVOLUTION_LEGEND)
    else:
        _class_legend(fig, labels, shown)
    fig.suptitle(title)
    return fig


def plot_samples(groups: Sequence[str], predictions: Sequence[np.ndarray],
                 dice: Sequence[np.ndarray], images: np.ndarray, masks: np.ndarray,
                 names: Sequence[str], title: str, *, threshold: float,
                 labels: Labels | None = None) -> Figure:
    """The same test images segmented by every group: one column per image; rows: image,
    truth, then each group's prediction (probability ≥ ``threshold``) coloured against the
    truth (grey correct foreground, orange missed, magenta false positive).

    ``predictions[g]`` holds group g's probabilities (K, H, W) for ``images`` (K, H, W, 3)
    with truth ``masks`` (K, H, W) and ``names`` (K,), ``dice[g]`` the images' Dice as
    evaluation computed it; ``threshold`` as in :func:`plot_evolution`.
    """
    k_images, height, width = masks.shape
    labels = labels or Labels()
    fig, axes = _panel_figure(2 + len(groups), k_images, width / height)
    shown = [masks]
    for k, column in enumerate(axes.T):
        truth = masks[k]
        column[0].imshow(images[k])
        column[0].set_title(names[k], fontsize=9)
        _truth_panel(column[1], truth, labels)
        for ax, probs, scores in zip(column[2:], predictions, dice):
            current = labels.predict(probs[k].astype(np.float32), threshold)
            shown.append(current)
            _mask_panel(ax, truth, current, labels)
            ax.set_title(f"Dice {scores[k]:.2f}", fontsize=8)
        for ax in column:
            _mask_axes(ax)
    for ax, label in zip(axes[:, 0], ("image", "truth", *groups)):
        ax.set_ylabel(_wrap(label), fontsize=9)
    if labels.binary:
        _colour_legend(fig, SAMPLES_LEGEND)
    else:
        _class_legend(fig, labels, shown)
    fig.suptitle(title)
    return fig


def plot_class_bars(summary: pd.DataFrame, class_names: Sequence[str], colours: Sequence,
                    title: str) -> Figure:
    """Test Dice per class: one cluster of bars per class, one bar per group, with its 95 %
    bootstrap interval (summary columns ``dice.<class>_mean``, ``_lo``, ``_hi``; a class is
    scored on the test images whose truth holds it). With more bars than
    :data:`MAX_CLASS_BARS`, the classes of the most test images (``n_images.<class>``) are
    shown and the others are one cluster, "other": the mean of their Dice, without interval."""
    groups = list(summary["group"])
    shown = list(class_names)
    limit = max(1, MAX_CLASS_BARS // len(groups))
    if len(shown) > limit:
        support = np.array([summary[f"n_images.{c}"].iloc[0] for c in class_names], float)
        top = np.sort(np.argsort(-support, kind="stable")[:limit - 1])
        shown = [class_names[i] for i in top]
        others = [c for c in class_names if c not in set(shown)]
        title += f" ({len(shown)} of {len(class_names)} classes with the most test images)"
    else:
        others = []
    ticks = [*shown, *([f"other\n({len(others)})"] if others else [])]
    width = max(6.0, 1.2 + len(ticks) * (0.35 * len(groups) + 0.6))
    fig = Figure(figsize=(width, 4 + _legend_height(groups, width)), dpi=DPI,
                 layout="constrained")
    ax = fig.subplots()
    step = 0.8 / len(groups)
    x = np.arange(len(ticks))
    for g, (group, colour) in enumerate(zip(groups, colours)):
        row = summary.iloc[g]
        mean = np.array([row[f"dice.{c}_mean"] for c in shown], float)
        low = np.array([row[f"dice.{c}_lo"] for c in shown], float)
        high = np.array([row[f"dice.{c}_hi"] for c in shown], float)
        if others:
            rest = np.array([row[f"dice.{c}_mean"] for c in others], float)
            other = np.nanmean(rest) if np.isfinite(rest).any() else np.nan
            mean, low, high = (np.append(v, other) for v in (mean, low, high))
        ax.bar(x - 0.4 + step * (g + 0.5), mean, step, color=colour, label=group,
               yerr=[mean - low, high - mean], capsize=2, ecolor="0.2")
    ax.set_xticks(x, ticks, rotation=45 if len(ticks) > 12 else 0,
                  ha="right" if len(ticks) > 12 else "center")
    ax.set_ylabel("test Dice")
    ax.set_ylim(0, 1.02)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    _legend_below(fig, *ax.get_legend_handles_labels())
    fig.suptitle(textwrap.fill(title, int(width * 9)))
    return fig


def plot_confusion(matrices: Sequence[np.ndarray], groups: Sequence[str],
                   class_names: Sequence[str], title: str) -> Figure:
    """One row-normalised confusion matrix per group (pixels of each true class, summed over
    the group's runs, by predicted class): a row shows where that class's pixels went. With
    more than :data:`MAX_CONFUSION_CLASSES` classes, those of the most true pixels (over all
    groups) are shown and the others are one class, "other", as truth and as prediction."""
    if len(class_names) > MAX_CONFUSION_CLASSES:
        others = len(class_names) - MAX_CONFUSION_CLASSES + 1
        matrices, class_names = _merge_classes(matrices, class_names)
        title += (f" ({MAX_CONFUSION_CLASSES - 1} classes with the most test pixels; the "
                  f"{others} others as one)")
    n, k = len(groups), len(class_names)
    cell = 0.45 + 0.35 * k
    columns = min(n, 4)
    rows = -(-n // columns)
    fig = Figure(figsize=(max(6.0, columns * cell + 1.5), rows * (cell + 0.5) + 0.8), dpi=DPI,
                 layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax, matrix, group in zip(axes.flat, matrices, groups):
        totals = matrix.sum(axis=1, keepdims=True)
        share = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
        shown = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{share[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if share[i, j] > 0.6 else "0.1")
        ax.set_xticks(range(k), class_names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(k), class_names, fontsize=8)
        ax.set_title(_wrap(group, 28), fontsize=9)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("truth", fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.colorbar(shown, ax=axes, fraction=0.03, label="share of the true class's pixels")
    fig.suptitle(textwrap.fill(title, int(fig.get_figwidth() * 9)), fontsize=10)
    return fig


def _merge_classes(matrices: Sequence[np.ndarray], class_names: Sequence[str]
                   ) -> tuple[list[np.ndarray], list[str]]:
    """The confusion ``matrices`` (C, C) reduced to the MAX_CONFUSION_CLASSES − 1 classes of
    the most true pixels over all of them (in class order) and one "other (N)" class, which
    sums the rows and columns of the rest."""
    support = sum(m.sum(axis=1) for m in matrices)
    kept = np.sort(np.argsort(-support, kind="stable")[:MAX_CONFUSION_CLASSES - 1])
    index = np.full(len(class_names), len(kept))  # every other class to the last row/column
    index[kept] = np.arange(len(kept))
    merged = []
    for matrix in matrices:
        reduced = np.zeros((len(kept) + 1, len(kept) + 1), matrix.dtype)
        np.add.at(reduced, (index[:, None], index[None, :]), matrix)
        merged.append(reduced)
    others = len(class_names) - len(kept)
    return merged, [*(class_names[i] for i in kept), f"other ({others})"]


def plot_predictions(names: list[str], images: np.ndarray, masks: np.ndarray,
                     probs: np.ndarray, threshold: float, labels: Labels, path: Path,
                     title: str) -> None:
    """A figure with one row per image: image, truth, prediction, probability. Binary: the
    prediction is ``prob >= threshold``; with several classes truth and prediction (argmax)
    are in the classes' palette colours, with a legend, and the probability panel shows the
    predicted class's probability."""
    rows = len(names)
    fig = Figure(figsize=(10, 2.6 * rows + 0.5 + (not labels.binary) * 0.4),
                 layout="constrained")
    axes = fig.subplots(rows, 4, squeeze=False)
    palette = np.array(labels.palette(), np.uint8)
    for r in range(rows):
        if labels.binary:
            panels = [(images[r], None, "image"), (masks[r], "gray", "truth"),
                      (probs[r] >= threshold, "gray", f"prediction (p ≥ {threshold:g})"),
                      (probs[r], "viridis", "probability")]
        else:
            panels = [(images[r], None, "image"), (palette[masks[r]], None, "truth"),
                      (palette[labels.predict(probs[r])], None, "prediction (argmax)"),
                      (probs[r].max(axis=0), "viridis", "probability of the prediction")]
        for ax, (data, cmap, label) in zip(axes[r], panels):
            shown = ax.imshow(data, cmap=cmap, vmin=0, vmax=1 if cmap else None,
                              interpolation="nearest")
            if r == 0:
                ax.set_title(label, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(names[r], fontsize=9)
        fig.colorbar(shown, ax=axes[r][3], fraction=0.046)
    if not labels.binary:
        listed, others = _shown_classes([masks, labels.predict(probs)], labels, background=True)
        more_handles, more_names = _more(others)
        fig.legend([*(Patch(color=palette[c] / 255) for c in listed), *more_handles],
                   [*(labels.class_names[c] for c in listed), *more_names],
                   loc="outside lower center", ncols=8, frameon=False, fontsize=9)
    fig.suptitle(title, fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
