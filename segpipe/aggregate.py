"""Aggregate the runs of an experiment into ``summary.csv`` and figures, and all experiments
into ``results/summary.md``.

Groups are the distinct combinations of the experiment's varied axes, in the order the runs
are listed; the replicates of a group are its seeds; the cases are the test images, the same
for every run (``per_image.csv``), so groups are compared image by image. In cross-validation
a run is evaluated once per fold, each fold on its own test images; its folds are pooled
(:func:`_load_run`), so every image is a case once per seed. The statistics are those of
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
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from segpipe import SegpipeError, figures, plots, stats
from segpipe.columns import METRIC_COLUMNS, RUN_COLUMNS
from segpipe.files import atomic_path
from segpipe.labels import Labels
from segpipe import rundir
from segpipe.stats import mean_ci95

PER_IMAGE_METRICS = ("dice", "iou")  # bootstrap intervals and paired Δ from per_image.csv
TEST_METRIC = "dice"  # the metric of the tests, verdicts, ranks and the significance map
COMPARISON_COLUMNS = ("reference",
                      *(f"delta_{m}{end}" for m in PER_IMAGE_METRICS for end in ("", "_lo", "_hi")),
                      "p_wilcoxon", "p_holm", "p_mrmc", "p_mrmc_holm", "verdict")
EVOLUTION_KEYS = ("epochs", "probs", "probs_best", "images", "masks", "names", "threshold")


# --------------------------------------------------------------------------- reading inputs

def _read_csv(path: Path, numeric: Sequence[str], text: Sequence[str] = (),
              allow_empty: bool = False) -> pd.DataFrame:
    """A CSV file with the ``numeric`` and ``text`` columns and, unless ``allow_empty``, rows."""
    if not path.is_file():
        raise SegpipeError(f"{path}: file not found")
    try:
        table = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise SegpipeError(f"{path}: not a readable CSV file ({exc})") from None
    missing = [c for c in (*text, *numeric) if c not in table.columns]
    if missing:
        raise SegpipeError(f"{path}: missing column(s) {', '.join(missing)}")
    if table.empty:
        if not allow_empty:
            raise SegpipeError(f"{path}: no rows")
        return table.astype(dict.fromkeys(numeric, float))
    wrong = [c for c in numeric if not pd.api.types.is_numeric_dtype(table[c])]
    if wrong:
        raise SegpipeError(f"{path}: non-numeric values in column(s) {', '.join(wrong)}")
    return table


def _read_evolution(path: Path) -> dict[str, np.ndarray]:
    """evolution.npz with consistent shapes: epochs (S,), probs (S,K,H,W), probs_best
    (K,H,W), images (K,H,W,3), masks (K,H,W), names (K,), the evaluation threshold (a scalar);
    K ≥ 1 (S may be 0: no configured snapshot epoch may have been reached)."""
    if not path.is_file():
        raise SegpipeError(f"{path}: file not found")
    try:
        with np.load(path) as npz:
            data = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise SegpipeError(f"{path}: not a readable .npz file ({exc})") from None
    missing = [key for key in EVOLUTION_KEYS if key not in data]
    if missing:
        raise SegpipeError(f"{path}: missing array(s) {', '.join(missing)} (an older "
                           "segpipe evaluate wrote it? re-run: snakemake --forcerun evaluate)")
    s, k = len(data["epochs"]), len(data["names"])
    if k == 0:
        raise SegpipeError(f"{path}: holds no test image")
    h, w = data["masks"].shape[1:] if data["masks"].ndim == 3 else (None, None)
    channels = data["probs"].shape[2:-2]  # (C,) with several classes
    expected = {"probs": (s, k, *channels, h, w), "probs_best": (k, *channels, h, w),
                "images": (k, h, w, 3), "masks": (k, h, w), "threshold": ()}
    wrong = [f"{key} {data[key].shape} (expected {shape})" for key, shape in expected.items()
             if data[key].shape != shape]
    if wrong:
        raise SegpipeError(f"{path}: inconsistent array shapes: {'; '.join(wrong)}")
    return data


def _check_spec(name: str, spec: dict) -> tuple[list[str], list[dict]]:
    axes, runs = spec.get("axes", []), spec.get("runs")
    if not isinstance(runs, list) or not runs:
        raise SegpipeError(f"experiment '{name}': spec key 'runs' must be a non-empty list")
    for i, run in enumerate(runs):
        missing = [key for key in ("run", "dir", "seed", *axes) if key not in run]
        if missing:
            raise SegpipeError(f"experiment '{name}': runs[{i}] lacks key(s) {', '.join(missing)}")
        if "folds" in run and not (isinstance(run["folds"], list) and run["folds"]):
            raise SegpipeError(f"experiment '{name}': runs[{i}].folds must be a non-empty list")
    baseline = spec.get("baseline")
    if baseline is not None and not (isinstance(baseline, dict) and set(axes) <= set(baseline)):
        raise SegpipeError(f"experiment '{name}': spec key 'baseline' must map every axis "
                           f"({', '.join(axes)}) to a value")
    if len({len(run.get("folds", ())) for run in runs}) > 1:
        raise SegpipeError(f"experiment '{name}': its runs have different numbers of folds")
    return list(axes), runs


def _load_run(folders: list[Path]) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """A run's test metrics (``METRIC_COLUMNS``, parameters, training seconds, epochs, best
    validation Dice), per-snapshot test metrics and per-image scores, from its evaluation
    folder or those of its folds.

    Folds are pooled: the per-image tables are concatenated (with the ``fold`` of each image
    when there are folds; no image may be tested twice); the test metrics and the snapshot
    metrics at each epoch are the means over the folds weighted by their numbers of test images
    (for per-image means, exactly the mean over all images; at a snapshot epoch, over the folds
    whose training reached it), training seconds are summed, epochs and the best validation
    Dice averaged. One folder's values are returned as they are."""
    metrics, by_epoch, per_image, val_dice, confusion = [], [], [], [], 0
    for fold, folder in enumerate(folders):
        metrics.append(_read_csv(folder / rundir.METRICS, (*METRIC_COLUMNS, *RUN_COLUMNS)).iloc[0])
        val_dice.append(_read_csv(folder / rundir.HISTORY, ("val_dice",))["val_dice"].max())
        table = _read_csv(folder / rundir.PER_IMAGE, PER_IMAGE_METRICS, text=("name",))
        table = table.assign(name=table["name"].astype(str))
        snapshots = _read_csv(folder / rundir.BY_EPOCH, ("epoch", *plots.CURVE_METRICS),
                              allow_empty=True)
        by_epoch.append(snapshots.assign(images=len(table)))
        per_image.append(table.assign(fold=fold) if len(folders) > 1 else table)
        if not Labels.from_columns(table.columns).binary:
            confusion = confusion + _read_confusion(folder / rundir.CONFUSION, table.columns)
    images = np.array([len(table) for table in per_image], float)
    weights = images / images.sum()
    per_image = pd.concat(per_image, ignore_index=True)
    tested_twice = per_image.loc[per_image["name"].duplicated(), "name"]
    if len(folders) > 1 and len(tested_twice):
        image = tested_twice.iloc[0]
        files = " and ".join(str(folders[f] / rundir.PER_IMAGE)
                             for f in per_image.loc[per_image["name"] == image, "fold"])
        raise SegpipeError(f"{files} both score image {image}: the folds of a run must test "
                           "disjoint images")
    run = {metric: float(sum(w * m[metric] for w, m in zip(weights, metrics)))
           for metric in METRIC_COLUMNS}
    run.update(parameters=metrics[0]["parameters"],
               train_seconds=sum(m["train_seconds"] for m in metrics),
               epochs=float(np.mean([m["epochs"] for m in metrics])),
               val_dice=float(np.mean(val_dice)), confusion=confusion)
    by_epoch = pd.concat(by_epoch, ignore_index=True)
    fold_weights = by_epoch["images"] / by_epoch.groupby("epoch")["images"].transform("sum")
    curves = (by_epoch[list(plots.CURVE_METRICS)].mul(fold_weights, axis=0)
              .groupby(by_epoch["epoch"]).sum().reset_index())
    return run, curves, per_image


def _read_confusion(path: Path, per_image_columns: Sequence[str]) -> np.ndarray:
    """confusion.csv's counts (C, C), its classes those of per_image.csv's header."""
    names = Labels.from_columns(per_image_columns).class_names
    table = _read_csv(path, names, text=("truth",))
    if list(table["truth"].astype(str)) != list(names) or list(table.columns[1:]) != list(names):
        raise SegpipeError(f"{path}: rows and columns must be the classes "
                           f"{', '.join(names)}, as in per_image.csv")
    return table[list(names)].to_numpy(np.int64)


def _group_name(experiment: str, axes: Sequence[str], values: dict) -> str:
    """A group's name: its values of the varied axes joined by " / " (the experiment's name
    when nothing varies)."""
    return " / ".join(str(values[axis]) for axis in axes) or experiment


def _load_runs(name: str, axes: list[str], runs: list[dict]
               ) -> tuple[pd.DataFrame, pd.DataFrame, list[pd.DataFrame]]:
    """One row per run (group, seed, test metrics, best validation Dice, its evaluation
    folders), the per-snapshot test metrics of every run (group, seed, epoch, metrics) and each
    run's per-image scores (:func:`_load_run`)."""
    rows, by_epoch, per_image = [], [], []
    for run in runs:
        folders = [Path(folder) for folder in run.get("folds", [run["dir"]])]
        group = _group_name(name, axes, run)
        metrics, curves, scores = _load_run(folders)
        rows.append({"group": group, **{axis: str(run[axis]) for axis in axes},
                     "seed": run["seed"], "run": run["run"],
                     "folders": folders, **metrics})
        by_epoch.append(curves.assign(group=group, seed=run["seed"]))
        per_image.append(scores)
    return pd.DataFrame(rows), pd.concat(by_epoch, ignore_index=True), per_image


def _image_scores(name: str, runs: pd.DataFrame, per_image: list[pd.DataFrame]
                  ) -> dict[str, dict[str, stats.Scores]]:
    """``{metric: {group: Scores}}`` of ``PER_IMAGE_METRICS`` (seeds ascending, images in the
    order of the first run). Every run must have scored the same test images, and all groups
    must share a seed, for the comparisons to be paired."""
    sources = [_per_image_files(folders) for folders in runs["folders"]]
    first, names = sources[0], list(per_image[0]["name"])
    aligned = []
    for path, table in zip(sources, per_image):
        if table["name"].duplicated().any():
            raise SegpipeError(f"{path}: an image is listed twice")
        missing, extra = (sorted(set(names) - set(table["name"])),
                          sorted(set(table["name"]) - set(names)))
        if missing or extra:
            raise SegpipeError(f"{path}: scored other test images than {first} (missing: "
                               f"{', '.join(missing) or 'none'}; extra: "
                               f"{', '.join(extra) or 'none'}); the runs of an experiment "
                               "must be evaluated on the same test set")
        values = table.set_index("name").loc[names, list(PER_IMAGE_METRICS)]
        if not np.isfinite(values.to_numpy()).all():
            raise SegpipeError(f"{path}: missing or non-finite {', '.join(PER_IMAGE_METRICS)}")
        aligned.append(values)
    groups = _groups(runs)
    if not set.intersection(*(set(members["seed"]) for _, members in groups)):
        seeds = "; ".join(f"{group}: {', '.join(map(str, members['seed']))}"
                          for group, members in groups)
        raise SegpipeError(f"experiment '{name}': no seed is shared by all groups ({seeds}); "
                           "paired comparisons need the same seeds in every group")
    return {metric: {group: stats.Scores(tuple(members["seed"]),
                                         np.stack([aligned[i][metric].to_numpy(float)
                                                   for i in members.index]))
                     for group, members in groups}
            for metric in PER_IMAGE_METRICS}


def _class_scores(runs: pd.DataFrame, per_image: list[pd.DataFrame], labels: Labels
                  ) -> dict[str, dict[str, stats.Scores]]:
    """``{class: {group: Scores}}`` of the per-class test Dice, on the test images whose truth
    holds the class. That set depends on the truth only, so it is the same for every run (the
    comparisons stay paired); a run that disagrees is an error."""
    names = list(per_image[0]["name"])
    tables = [table.set_index("name").loc[names] for table in per_image]
    scores = {}
    for name in labels.names:
        column = f"dice.{name}"
        defined = tables[0][column].notna().to_numpy()
        for folders, table in zip(runs["folders"], tables):
            if not np.array_equal(table[column].notna().to_numpy(), defined):
                raise SegpipeError(f"{_per_image_files(folders)}: defines {column} on other "
                                   "images than the experiment's first run; its truth differs")
        scores[name] = {group: stats.Scores(tuple(members["seed"]), np.stack(
                            [tables[i][column].to_numpy(float)[defined] for i in members.index]))
                        for group, members in _groups(runs)}
    return scores


def _groups(runs: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(group, its runs by ascending seed), in order of appearance."""
    return [(group, members.sort_values("seed", kind="stable"))
            for group, members in runs.groupby("group", sort=False)]


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


def _per_image_files(folders: list[Path]) -> str:
    """The per_image.csv file(s) of a run, for messages."""
    if len(folders) == 1:
        return str(folders[0] / rundir.PER_IMAGE)
    return f"{rundir.PER_IMAGE} of {', '.join(map(str, folders))}"


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
        for metric in plots.CURVE_METRICS:
            row[f"{metric}_mean"], row[f"{metric}_ci95"] = mean_ci95(members[metric])
        rows.append(row)
    columns = ["group", "epoch", "n_seeds",
               *(f"{m}_{s}" for m in plots.CURVE_METRICS for s in ("mean", "ci95"))]
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


def _representatives(runs: pd.DataFrame) -> dict[str, dict[str, np.ndarray]]:
    """evolution.npz of each group's run with the smallest seed (of its first fold), all on the
    same test images and evaluated at the same threshold."""
    chosen = runs.loc[runs.groupby("group", sort=False)["seed"].idxmin()]
    evolution, reference = {}, None
    for group, folders in zip(chosen["group"], chosen["folders"]):
        path = folders[0] / rundir.EVOLUTION
        data = _read_evolution(path)
        reference = data if reference is None else reference
        if list(data["names"]) != list(reference["names"]):
            raise SegpipeError(f"{path}: example images {list(data['names'])} differ from "
                               f"those of the other groups {list(reference['names'])}")
        if data["threshold"] != reference["threshold"]:
            raise SegpipeError(f"{path}: evaluated at threshold {data['threshold']:g}, the "
                               f"other groups at {reference['threshold']:g}")
        evolution[group] = data
    return evolution


def aggregate_experiment(name: str, spec: dict, output_dir: Path) -> None:
    """Write summary.csv and the figures (:data:`segpipe.figures.FIGURES`) for experiment
    ``name`` into ``output_dir`` (sweep.png only when ``spec["sweep"]`` is set, classes.png and
    confusion.png only with several classes).

    ``spec``: ``{"axes": [...], "sweep": null | {"axis", "param", "values": {value: number}},
    "baseline": null | {<axis>: value, ...},
    "runs": [{"run", "dir", "seed", <axis>: value, ..., optional "folds": [fold folders]}]}``
    (docs/formats.md)."""
    axes, run_specs = _check_spec(name, spec)
    runs, by_epoch, per_image = _load_runs(name, axes, run_specs)
    scores = _image_scores(name, runs, per_image)
    test_scores = list(scores[TEST_METRIC].values())
    bootstrap = stats.Bootstrap(n_images=test_scores[0].values.shape[1])
    ranks = bootstrap.ranks(test_scores)
    image_folds = per_image[0]["fold"].to_numpy() if "fold" in per_image[0] else None
    baseline = _group_name(name, axes, spec["baseline"]) if spec.get("baseline") else None
    summary = summarise(runs, axes, scores, bootstrap, ranks, image_folds, baseline)
    labels = Labels.from_columns(per_image[0].columns)
    if not labels.binary:
        summary = class_summary(summary, _class_scores(runs, per_image, labels))
    sweep = spec.get("sweep")
    x = _sweep_values(name, sweep, axes, summary) if sweep else None
    order = np.argsort(summary["rank"].to_numpy(), kind="stable")  # best first
    context = figures.Context(
        name=name, summary=summary, ranked=summary.iloc[order], order=order,
        colours=plots.group_colours(len(summary), x), by_epoch=summarise_by_epoch(by_epoch),
        sweep=sweep, x=x, labels=labels, test_scores=test_scores, ranks=ranks,
        confusion=None if labels.binary else [sum(members["confusion"])
                                              for _, members in _groups(runs)],
        evolution=_representatives(runs), image_folds=image_folds)

    output_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(output_dir / "summary.csv") as tmp:
        summary.to_csv(tmp, index=False)
    for figure in figures.figures_for(sweep is not None, labels.binary):
        _save(figures.FIGURES[figure].draw(context), output_dir / f"{figure}.png")


# --------------------------------------------------------------------------- summary.md

SUMMARY_COLUMNS = {"dice": "Dice", "iou": "IoU", "map": "mAP", "pooled_dice": "pooled Dice",
                   "val_dice": "val Dice"}


def _estimate(row: pd.Series, metric: str) -> str:
    """``mean [low, high]`` for a bootstrap interval, ``mean ± half-width`` for a t interval."""
    mean = row[f"{metric}_mean"]
    if f"{metric}_lo" in row:
        return f"{mean:.3f} [{row[f'{metric}_lo']:.3f}, {row[f'{metric}_hi']:.3f}]"
    ci = row[f"{metric}_ci95"]
    return f"{mean:.3f} ± {'—' if math.isnan(ci) else f'{ci:.3f}'}"


def _signed(x: float) -> str:
    """``x`` with its sign and a true minus; −0.000 shows as +0.000."""
    return f"{round(x, 3) + 0.0:+.3f}".replace("-", "−")


def _count(parameters: float) -> str:
    return f"{parameters / 1e6:.2f} M" if parameters >= 1e6 else f"{parameters / 1e3:.1f} k"


def _verdict(row: pd.Series) -> str:
    """One comparison in words, e.g. "b: worse than a: ΔDice −0.040 [−0.070, −0.010], Holm
    p = 0.003 (Wilcoxon), 0.012 (seeds × images)" or "b: no detectable difference (ΔDice …)".
    With one seed there is no seeds × images p."""
    p = f"Holm p {_p_value(row['p_holm'])} (Wilcoxon)"
    if not math.isnan(row["p_mrmc_holm"]):
        p += f", {_p_value(row['p_mrmc_holm']).removeprefix('= ')} (seeds × images)"
    delta = (f"ΔDice {_signed(row['delta_dice'])} [{_signed(row['delta_dice_lo'])}, "
             f"{_signed(row['delta_dice_hi'])}], {p}")
    if row["verdict"] in ("better", "worse"):
        return f"{row['group']}: {row['verdict']} than {row['reference']}: {delta}"
    return f"{row['group']}: {row['verdict']} ({delta})"


def _p_value(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"= {p:.3g}"


def _comparisons(summary: pd.DataFrame) -> list[str]:
    """The paragraph on the comparisons with the reference, one verdict per line."""
    if len(summary) == 1:
        return ["One group: nothing to compare."]
    if summary["reference"].isna().all():
        return ["No comparison: no validation Dice was recorded to choose a reference."]
    others = summary[summary["verdict"] != "reference"]
    reference = summary["reference"].iloc[0]
    return [f"Compared with **{reference}** image by image: ΔDice = group − {reference}, the "
            "mean paired difference over test images and shared seeds [95 % paired bootstrap "
            f"interval]; Holm p: Holm-adjusted over the {len(others)} comparison(s), of the "
            "two-sided Wilcoxon signed-rank test on the per-image Dice differences (averaged "
            "over shared seeds) and of the seeds × images test, which also counts the "
            "training runs as random (docs/metrics.md); better or worse where both p < "
            f"{stats.ALPHA:g} and the interval excludes 0.", "",
            *(f"- {_verdict(row)}" for _, row in others.iterrows())]


def _experiment_section(folder: Path, output: Path) -> str:
    path = folder / "summary.csv"
    intervals = {m: ("lo", "hi") if m in PER_IMAGE_METRICS else ("ci95",)
                 for m in SUMMARY_COLUMNS}
    numeric = ["n_seeds", "n_images", "parameters", "train_seconds_mean", "best_run_val_dice",
               "delta_dice", "delta_dice_lo", "delta_dice_hi", "p_holm", "p_mrmc_holm",
               "rank", "rank_lo",
               "rank_hi", *(f"{m}_{s}" for m, ends in intervals.items()
                            for s in ("mean", *ends))]
    summary = _read_csv(path, numeric, text=("group", "best_run", "reference", "verdict"))
    axes = list(summary.columns[1:list(summary.columns).index("n_seeds")])
    is_reference = summary["verdict"] == "reference"
    reference = summary.index[is_reference][0] if is_reference.any() else None

    fewest, most = int(summary["n_seeds"].min()), int(summary["n_seeds"].max())
    seeds = str(most) if fewest == most else f"{fewest}–{most}"
    folds = [c for c in summary.columns if c.startswith(f"{TEST_METRIC}_fold")]
    images = f"{int(summary['n_images'].iloc[0])} test images"
    if folds:
        images = (f"{len(folds)}-fold cross-validation: {images}, each tested once per seed by "
                  "the models of the fold that held it out")

    header = ["group", "n", *SUMMARY_COLUMNS.values(), *(["Dice per fold"] if folds else []),
              "rank", "parameters", "train s"]
    lines = [f"## {folder.name}", "",
             f"Varied: {', '.join(axes) or 'nothing'}; {len(summary)} group(s), "
             f"{seeds} seed(s) each, {images}.", "",
             "Test-split metrics. Dice and IoU: mean per-image score [95 % bootstrap percentile "
             f"interval, {stats.N_RESAMPLES} resamples of the test images and the seeds, "
             f"generator seed {stats.SEED}]; mAP, pooled Dice, val Dice: mean ± 95 % CI over "
             "seeds (Student t). Rank: by mean test Dice [95 % bootstrap interval]. **Bold**: "
             "the reference, chosen on validation Dice — never on test: the best mean, or the "
             "experiment's baseline (its default group) when the best is ahead of it by at most "
             "one standard error." + (" Dice per fold: the mean test Dice of each fold's "
                                      "images, folds 0, 1, …" if folds else ""), "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, row in summary.iterrows():
        group = f"**{row['group']}**" if i == reference else row["group"]
        per_fold = [" · ".join(f"{row[c]:.3f}" for c in folds)] if folds else []
        cells = [group, str(int(row["n_seeds"])), *(_estimate(row, m) for m in SUMMARY_COLUMNS),
                 *per_fold, f"{int(row['rank'])} [{int(row['rank_lo'])}, {int(row['rank_hi'])}]",
                 _count(row["parameters"]), f"{row['train_seconds_mean']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if reference is None:
        lines.append("Reference: not available (no validation Dice recorded).")
    else:
        row = summary.loc[reference]
        top = summary.loc[summary["val_dice_mean"].idxmax()]
        why = ("the best validation Dice" if top["group"] == row["group"] else
               f"the baseline: {top['group']} has the best mean validation Dice "
               f"({top['val_dice_mean']:.3f}), ahead of it by at most one standard error")
        lines.append(
            f"Reference: **{row['group']}** (val Dice {_estimate(row, 'val_dice')}), {why}. "
            f"Its test Dice {_estimate(row, 'dice')}, IoU {_estimate(row, 'iou')}, mAP "
            f"{_estimate(row, 'map')}; its best run: `{row['best_run']}` (val Dice "
            f"{row['best_run_val_dice']:.3f}).")
    lines += ["", *_comparisons(summary), *_class_table(summary)]
    pngs = [folder / f"{figure}.png" for figure in figures.FIGURES]
    links = [f"[{path.stem}]({Path(os.path.relpath(path, output.parent)).as_posix()})"
             for path in pngs if path.is_file()]
    lines += ["", "Figures: " + " · ".join(links), ""]
    return "\n".join(lines)


def _class_table(summary: pd.DataFrame) -> list[str]:
    """With several classes: each group's test Dice per class [95 % bootstrap interval] and its
    ΔDice against the reference [95 % paired interval], so a reader sees which class a model
    wins on."""
    classes = [c.removeprefix("dice.").removesuffix("_mean") for c in summary.columns
               if c.startswith("dice.") and c.endswith("_mean")]
    if not classes:
        return []
    reference = summary["reference"].iloc[0]
    images = ", ".join(f"{c} {int(summary[f'n_images.{c}'].iloc[0])}" for c in classes)
    lines = ["", f"Per class: test Dice on the images whose truth holds the class ({images}) "
             "[95 % bootstrap interval]" + (f"; Δ: group − {reference} on those images [95 % "
                                            "paired interval]" if isinstance(reference, str)
                                            else "") + ".", "",
             "| group | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
    for _, row in summary.iterrows():
        cells = []
        for c in classes:
            if math.isnan(row[f"dice.{c}_mean"]):
                cells.append("—")
                continue
            cell = (f"{row[f'dice.{c}_mean']:.3f} [{row[f'dice.{c}_lo']:.3f}, "
                    f"{row[f'dice.{c}_hi']:.3f}]")
            if not math.isnan(row[f"delta_dice.{c}"]):
                cell += (f" Δ {_signed(row[f'delta_dice.{c}'])} "
                         f"[{_signed(row[f'delta_dice.{c}_lo'])}, "
                         f"{_signed(row[f'delta_dice.{c}_hi'])}]")
            cells.append(cell)
        lines.append(f"| {row['group']} | " + " | ".join(cells) + " |")
    return lines


def write_summary(experiment_dirs: list[Path], output: Path) -> None:
    """Write ``output`` (results/summary.md): one section per experiment folder, each with a
    table of its summary.csv, the best group by validation Dice and links to its figures."""
    if not experiment_dirs:
        raise SegpipeError("summary: no experiment folders given")
    sections = [_experiment_section(Path(folder), output) for folder in experiment_dirs]
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output) as tmp:
        tmp.write_text("# segpipe results\n\n" + "\n".join(sections))
