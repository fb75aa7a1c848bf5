"""Aggregate the runs of an experiment into ``summary.csv`` and its figures.

The runs are read by :mod:`segpipe.results` (groups, seeds, the test images as paired cases,
folds pooled), the figures drawn by :mod:`segpipe.figures`, and ``results/summary.md`` written
from the summary.csv files by :mod:`segpipe.summary`. The statistics are those of
:mod:`segpipe.stats`:

* Dice and IoU: mean per-image score with a two-level bootstrap percentile interval over test
  images and seeds (``<metric>_lo``, ``<metric>_hi``);
* the other metrics, validation Dice: mean over seeds ± the Student t 95 % half-width
  (``<metric>_ci95``; NaN with one seed, "—" in ``summary.md``);
* the reference is chosen on validation Dice (each run's best epoch in ``history.csv``) —
  the test split is never used to choose it: the best mean, or the experiment's baseline when
  the best is ahead by at most one standard error (:func:`segpipe.stats.choose_reference`);
  every other group gets ΔDice and ΔIoU with bootstrap intervals, Holm-adjusted two-sided
  Wilcoxon and seeds × images p-values and a verdict;
* ranks by mean test Dice with their bootstrap distribution (``ranking.png``) and the pairwise
  significance map (``significance.png``);
* in cross-validation, each fold's mean test Dice over its images and the seeds
  (``dice_fold<f>``), to show the spread between folds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from segpipe import SegpipeError, figures, plots, stats
from segpipe.columns import CURVES, METRIC_COLUMNS, REFERENCE_RUNS
from segpipe.files import atomic_path
from segpipe.labels import Labels
from segpipe.results import (PER_IMAGE_METRICS, check_experiment_spec, class_scores, group_name,
                             group_runs, image_scores, load_runs, representatives)
from segpipe.stats import mean_ci95

TEST_METRIC = "dice"  # the metric of the tests, verdicts, ranks and the significance map
COMPARISON_COLUMNS = ("reference",
                      *(f"delta_{m}{end}" for m in PER_IMAGE_METRICS for end in ("", "_lo", "_hi")),
                      "p_wilcoxon", "p_holm", "p_mrmc", "p_mrmc_holm", "verdict")


def class_summary(summary: pd.DataFrame, class_scores: dict[str, dict[str, stats.Scores]]
                  ) -> pd.DataFrame:
    """summary.csv's per-class columns, appended: for each class ``n_images.<class>`` (test
    images whose truth holds it), ``dice.<class>_mean`` with its two-level bootstrap interval
    ``_lo``, ``_hi``, and against the reference ``delta_dice.<class>`` with its paired
    interval ``_lo``, ``_hi`` (NaN for the reference itself)."""
    reference = summary["reference"].iloc[0]
    columns: dict[str, list[float]] = {}
    for name, by_group in class_scores.items():
        n_images = next(iter(by_group.values())).values.shape[1]
        columns[f"n_images.{name}"] = [n_images] * len(summary)
        if n_images == 0:
            for end in ("_mean", "_lo", "_hi"):
                columns[f"dice.{name}{end}"] = [math.nan] * len(summary)
                columns[f"delta_dice.{name}{end.replace('_mean', '')}"] = [math.nan] * len(summary)
            continue
        bootstrap = stats.Bootstrap(n_images)
        for group in summary["group"]:
            scores = by_group[group]
            low, high = bootstrap.interval(scores)
            delta = [math.nan] * 3
            if isinstance(reference, str) and group != reference:
                diff = stats.paired_difference(scores, by_group[reference])
                delta = [diff.mean(), *bootstrap.interval(diff)]
            for column, value in zip(
                    (f"dice.{name}_mean", f"dice.{name}_lo", f"dice.{name}_hi",
                     f"delta_dice.{name}", f"delta_dice.{name}_lo", f"delta_dice.{name}_hi"),
                    (scores.mean(), low, high, *delta)):
                columns.setdefault(column, []).append(value)
    return pd.concat([summary, pd.DataFrame(columns, index=summary.index)], axis=1)


# --------------------------------------------------------------------------- statistics

def summarise(runs: pd.DataFrame, axes: Sequence[str],
              scores: dict[str, dict[str, stats.Scores]], bootstrap: stats.Bootstrap,
              ranks: np.ndarray, image_folds: np.ndarray | None = None,
              baseline: str | None = None) -> pd.DataFrame:
    """summary.csv: one row per group in order of appearance (columns in docs/outputs.md).

    ``scores``: per-image scores as from ``_image_scores``; ``ranks``: bootstrap ranks by
    ``TEST_METRIC`` (n_resamples, groups) in the same group order; ``image_folds``: in
    cross-validation, the fold of each image of ``scores``; ``baseline``: the group the
    reference falls back to (:func:`segpipe.stats.choose_reference`)."""
    rows, val_dice_by_seed = [], {}
    for group, members in runs.groupby("group", sort=False):
        val_dice_by_seed[group] = dict(zip(members["seed"], members["val_dice"]))
        row = {"group": group, **members.iloc[0][list(axes)].to_dict(), "n_seeds": len(members),
               "n_images": scores[TEST_METRIC][group].values.shape[1]}
        for metric in METRIC_COLUMNS:
            if metric in scores:
                image_scores = scores[metric][group]
                row[f"{metric}_mean"] = image_scores.mean()
                row[f"{metric}_lo"], row[f"{metric}_hi"] = bootstrap.interval(image_scores)
            else:
                row[f"{metric}_mean"], row[f"{metric}_ci95"] = mean_ci95(members[metric])
        if image_folds is not None:
            values = scores[TEST_METRIC][group].values
            row.update({f"{TEST_METRIC}_fold{fold}": values[:, image_folds == fold].mean()
                        for fold in range(image_folds.max() + 1)})
        row["val_dice_mean"], row["val_dice_ci95"] = mean_ci95(members["val_dice"])
        val_dice = members["val_dice"]
        best = members.loc[val_dice.idxmax()] if val_dice.notna().any() else None
        rows.append({**row, "parameters": int(members["parameters"].iloc[0]),
                     "train_seconds_mean": members["train_seconds"].mean(),
                     "epochs_mean": members["epochs"].mean(),
                     "best_run": None if best is None else best["run"],
                     "best_run_val_dice": math.nan if best is None else best["val_dice"]})
    summary = pd.DataFrame(rows)

    reference = stats.choose_reference(val_dice_by_seed, baseline)
    compared = ({**stats.compare_with_reference(reference, scores, bootstrap, TEST_METRIC),
                 reference: {"verdict": "reference"}} if reference is not None else {})
    comparisons = pd.DataFrame([{"reference": reference, **compared.get(group, {})}
                                for group in summary["group"]], columns=COMPARISON_COLUMNS)
    summary = pd.concat([summary, comparisons], axis=1)

    low, high = stats.rank_interval(ranks)
    return summary.assign(
        rank=stats.rank_descending(summary[f"{TEST_METRIC}_mean"].to_numpy()),
        rank_mean=ranks.mean(axis=0), rank_lo=low, rank_hi=high)


def summarise_by_epoch(by_epoch: pd.DataFrame) -> pd.DataFrame:
    """Mean and 95 % CI over seeds of the curve metrics per (group, snapshot epoch); a seed
    that stopped before an epoch does not count there."""
    rows = []
    for (group, epoch), members in by_epoch.groupby(["group", "epoch"], sort=False):
        row = {"group": group, "epoch": epoch, "n_seeds": len(members)}
        for metric in CURVES:
            row[f"{metric}_mean"], row[f"{metric}_ci95"] = mean_ci95(members[metric])
        rows.append(row)
    columns = ["group", "epoch", "n_seeds",
               *(f"{m}_{s}" for m in CURVES for s in ("mean", "ci95"))]
    table = pd.DataFrame(rows, columns=columns).astype(dict.fromkeys(columns[1:], float))
    return table.sort_values("epoch", kind="stable")


# --------------------------------------------------------------------------- writing outputs

def _save(fig: Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi="figure")


def _sweep_values(name: str, sweep: dict, axes: list[str], summary: pd.DataFrame) -> list[float]:
    """The swept parameter's value of each group, in summary order."""
    axis, values = sweep["axis"], sweep["values"]
    if axes != [axis]:
        raise SegpipeError(f"experiment '{name}': a sweep needs '{axis}' as the only varied axis")
    missing = sorted(set(summary[axis]) - set(values))
    if missing:
        raise SegpipeError(f"experiment '{name}': spec key sweep.values lacks {', '.join(missing)}")
    return [float(values[v]) for v in summary[axis]]


def aggregate_experiment(name: str, spec: dict, output_dir: Path) -> None:
    """Write summary.csv, :data:`~segpipe.columns.REFERENCE_RUNS` (the run folders of the
    reference group; empty without one) and the figures (:data:`segpipe.figures.FIGURES`) for
    experiment ``name`` into ``output_dir`` (sweep.png only when ``spec["sweep"]`` is set,
    classes.png and confusion.png only with several classes).

    ``spec``: ``{"axes": [...], "sweep": null | {"axis", "param", "values": {value: number}},
    "baseline": null | {<axis>: value, ...},
    "runs": [{"run", "dir", "seed", <axis>: value, ..., optional "folds": [fold folders]}]}``
    (docs/formats.md)."""
    axes, run_specs = check_experiment_spec(name, spec)
    runs, by_epoch, per_image = load_runs(name, axes, run_specs)
    scores = image_scores(name, runs, per_image)
    test_scores = list(scores[TEST_METRIC].values())
    bootstrap = stats.Bootstrap(n_images=test_scores[0].values.shape[1])
    ranks = bootstrap.ranks(test_scores)
    image_folds = per_image[0]["fold"].to_numpy() if "fold" in per_image[0] else None
    baseline = group_name(name, axes, spec["baseline"]) if spec.get("baseline") else None
    summary = summarise(runs, axes, scores, bootstrap, ranks, image_folds, baseline)
    labels = Labels.from_columns(per_image[0].columns)
    if not labels.binary:
        summary = class_summary(summary, class_scores(runs, per_image, labels))
    sweep = spec.get("sweep")
    x = _sweep_values(name, sweep, axes, summary) if sweep else None
    order = np.argsort(summary["rank"].to_numpy(), kind="stable")  # best first
    context = figures.Context(
        name=name, summary=summary, ranked=summary.iloc[order], order=order,
        colours=plots.group_colours(len(summary), x), by_epoch=summarise_by_epoch(by_epoch),
        sweep=sweep, x=x, labels=labels, test_scores=test_scores, ranks=ranks,
        confusion=None if labels.binary else [sum(members["confusion"])
                                              for _, members in group_runs(runs)],
        evolution=representatives(runs), image_folds=image_folds)

    output_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(output_dir / "summary.csv") as tmp:
        summary.to_csv(tmp, index=False)
    reference = summary["reference"].iloc[0]
    with atomic_path(output_dir / REFERENCE_RUNS) as tmp:
        tmp.write_text("".join(f"{run['dir']}\n" for run in run_specs
                               if group_name(name, axes, run) == reference))
    for figure in figures.figures_for(sweep is not None, labels.binary):
        _save(figures.FIGURES[figure].draw(context), output_dir / f"{figure}.png")


