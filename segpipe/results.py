"""Reading the runs of an experiment: each run's files (:mod:`segpipe.rundir`), checked and
aligned so that the runs of an experiment are compared image by image.

Groups are the distinct combinations of the experiment's varied axes, in the order the runs
are listed; the replicates of a group are its seeds; the cases are the test images, the same
for every run (``per_image.csv``). In cross-validation a run is evaluated once per fold, each
fold on its own test images; its folds are pooled (:func:`load_run`), so every image is a case
once per seed. :mod:`segpipe.aggregate` computes the statistics from what this returns.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from segpipe import SegpipeError, rundir, stats
from segpipe.columns import CURVES, METRIC_COLUMNS, RUN_COLUMNS
from segpipe.labels import Labels

PER_IMAGE_METRICS = ("dice", "iou")  # bootstrap intervals and paired Δ from per_image.csv
EVOLUTION_KEYS = ("epochs", "probs", "probs_best", "dice", "dice_best", "images", "masks",
                  "names", "threshold")


def read_csv(path: Path, numeric: Sequence[str], text: Sequence[str] = (),
              allow_empty: bool = False) -> pd.DataFrame:
    """A CSV file with the ``numeric`` and ``text`` columns and, unless ``allow_empty``, rows."""
    if not path.is_file():
        raise SegpipeError(f"{path}: file not found")
    try:
        table = pd.read_csv(path).copy()  # consolidated: a table of many classes is wide
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


def read_evolution(path: Path) -> dict[str, np.ndarray]:
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
                "dice": (s, k), "dice_best": (k,),
                "images": (k, h, w, 3), "masks": (k, h, w), "threshold": ()}
    wrong = [f"{key} {data[key].shape} (expected {shape})" for key, shape in expected.items()
             if data[key].shape != shape]
    if wrong:
        raise SegpipeError(f"{path}: inconsistent array shapes: {'; '.join(wrong)}")
    return data


def check_experiment_spec(name: str, spec: dict) -> tuple[list[str], list[dict]]:
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


def load_run(folders: list[Path]) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
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
        metrics.append(read_csv(folder / rundir.METRICS, (*METRIC_COLUMNS, *RUN_COLUMNS)).iloc[0])
        val_dice.append(read_csv(folder / rundir.HISTORY, ("val_dice",))["val_dice"].max())
        table = read_csv(folder / rundir.PER_IMAGE, PER_IMAGE_METRICS, text=("name",))
        table = table.assign(name=table["name"].astype(str))
        snapshots = read_csv(folder / rundir.BY_EPOCH, ("epoch", *CURVES),
                              allow_empty=True)
        by_epoch.append(snapshots.assign(images=len(table)))
        per_image.append(table.assign(fold=fold) if len(folders) > 1 else table)
        if not Labels.from_columns(table.columns).binary:
            confusion = confusion + read_confusion(folder / rundir.CONFUSION, table.columns)
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
    curves = (by_epoch[list(CURVES)].mul(fold_weights, axis=0)
              .groupby(by_epoch["epoch"]).sum().reset_index())
    return run, curves, per_image


def read_confusion(path: Path, per_image_columns: Sequence[str]) -> np.ndarray:
    """confusion.csv's counts (C, C), its classes those of per_image.csv's header."""
    names = Labels.from_columns(per_image_columns).class_names
    table = read_csv(path, names, text=("truth",))
    if list(table["truth"].astype(str)) != list(names) or list(table.columns[1:]) != list(names):
        raise SegpipeError(f"{path}: rows and columns must be the classes "
                           f"{', '.join(names)}, as in per_image.csv")
    return table[list(names)].to_numpy(np.int64)


def group_name(experiment: str, axes: Sequence[str], values: dict) -> str:
    """A group's name: its values of the varied axes joined by " / " (the experiment's name
    when nothing varies)."""
    return " / ".join(str(values[axis]) for axis in axes) or experiment


def load_runs(name: str, axes: list[str], runs: list[dict]
               ) -> tuple[pd.DataFrame, pd.DataFrame, list[pd.DataFrame]]:
    """One row per run (group, seed, test metrics, best validation Dice, its evaluation
    folders), the per-snapshot test metrics of every run (group, seed, epoch, metrics) and each
    run's per-image scores (:func:`_load_run`)."""
    rows, by_epoch, per_image = [], [], []
    for run in runs:
        folders = [Path(folder) for folder in run.get("folds", [run["dir"]])]
        group = group_name(name, axes, run)
        metrics, curves, scores = load_run(folders)
        rows.append({"group": group, **{axis: str(run[axis]) for axis in axes},
                     "seed": run["seed"], "run": run["run"],
                     "folders": folders, **metrics})
        by_epoch.append(curves.assign(group=group, seed=run["seed"]))
        per_image.append(scores)
    return pd.DataFrame(rows), pd.concat(by_epoch, ignore_index=True), per_image


def image_scores(name: str, runs: pd.DataFrame, per_image: list[pd.DataFrame]
                  ) -> dict[str, dict[str, stats.Scores]]:
    """``{metric: {group: Scores}}`` of ``PER_IMAGE_METRICS`` (seeds ascending, images in the
    order of the first run). Every run must have scored the same test images, and all groups
    must share a seed, for the comparisons to be paired."""
    sources = [per_image_files(folders) for folders in runs["folders"]]
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
    groups = group_runs(runs)
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


def class_scores(runs: pd.DataFrame, per_image: list[pd.DataFrame], labels: Labels
                  ) -> dict[str, dict[str, stats.Scores]]:
    """``{class: {group: Scores}}`` of the per-class test Dice, on the test images whose truth
    holds the class. That set depends on the truth only, so it is the same for every run (the
    comparisons stay paired); a run that disagrees is an error."""
    names = list(per_image[0]["name"])
    tables = [table.set_index("name").loc[names] for table in per_image]
    groups = group_runs(runs)
    scores = {}
    for name in labels.names:
        column = f"dice.{name}"
        defined = tables[0][column].notna().to_numpy()
        for folders, table in zip(runs["folders"], tables):
            if not np.array_equal(table[column].notna().to_numpy(), defined):
                raise SegpipeError(f"{per_image_files(folders)}: defines {column} on other "
                                   "images than the experiment's first run; its truth differs")
        scores[name] = {group: stats.Scores(tuple(members["seed"]), np.stack(
                            [tables[i][column].to_numpy(float)[defined] for i in members.index]))
                        for group, members in groups}
    return scores


def group_runs(runs: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(group, its runs by ascending seed), in order of appearance."""
    return [(group, members.sort_values("seed", kind="stable"))
            for group, members in runs.groupby("group", sort=False)]


def per_image_files(folders: list[Path]) -> str:
    """The per_image.csv file(s) of a run, for messages."""
    if len(folders) == 1:
        return str(folders[0] / rundir.PER_IMAGE)
    return f"{rundir.PER_IMAGE} of {', '.join(map(str, folders))}"


def representatives(runs: pd.DataFrame) -> dict[str, dict[str, np.ndarray]]:
    """evolution.npz of each group's run with the smallest seed (of its first fold), all on the
    same test images and evaluated at the same threshold."""
    chosen = runs.loc[runs.groupby("group", sort=False)["seed"].idxmin()]
    evolution, reference = {}, None
    for group, folders in zip(chosen["group"], chosen["folders"]):
        path = folders[0] / rundir.EVOLUTION
        data = read_evolution(path)
        reference = data if reference is None else reference
        if list(data["names"]) != list(reference["names"]):
            raise SegpipeError(f"{path}: example images {list(data['names'])} differ from "
                               f"those of the other groups {list(reference['names'])}")
        if data["threshold"] != reference["threshold"]:
            raise SegpipeError(f"{path}: evaluated at threshold {data['threshold']:g}, the "
                               f"other groups at {reference['threshold']:g}")
        evolution[group] = data
    return evolution
