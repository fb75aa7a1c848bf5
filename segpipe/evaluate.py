"""Evaluation of a trained run on its test images (never used for model selection).

``evaluate_run(run_dir, cache)`` scores ``model.pt`` (the best epoch on validation) and every
``snapshots/epoch_<k>.pt`` on the test images — every image of the test cache or, for a run
trained on fold f of a cross-validation cache (``spec["fold"]``), the images of fold f — with
the metrics of :mod:`segpipe.metrics` at ``threshold``, at each image's original size (the
probabilities of :mod:`segpipe.inference` resized there, against the cache's truth drawn
there: what ``segpipe predict`` delivers), and writes into the run directory
(docs/formats.md):

- ``metrics.csv``: one row (columns :data:`segpipe.columns.METRICS_CSV`): the run, its axes
  and seed, per-image means and pooled values of the metrics, and from the checkpoint
  ``parameters, train_seconds, epochs, best_epoch, peak_memory_mb``;
- ``per_image.csv``: ``name`` and the per-image metrics of the best model;
- ``metrics_by_epoch.csv``: ``epoch`` and the metric columns above, one row per snapshot;
- ``evolution.npz``: on the first ``n_examples`` test images, shown at one display size (the
  first one's original size, its longer side at most :data:`DISPLAY_SIDE`), the images, truth
  and probabilities of each snapshot (``probs``) and of the best model (``probs_best``), their
  Dice at the original size (``dice``, ``dice_best``: the per-image scores) and
  ``threshold``, so that figures made from it threshold and score as the metrics do;
- ``predictions.png``: image, truth, prediction and probability for those images.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import torch

from segpipe import SegpipeError
from segpipe.checkpoint import checkpoint_geometry, checkpoint_labels, load_checkpoint
from segpipe.columns import (AXES, MEAN_COLUMNS, METRICS, POOLED_COLUMNS,
                             RUN_COLUMNS, by_epoch_csv, class_metric_columns, metrics_csv,
                             per_image_csv)
from segpipe.data.cache import Cache
from segpipe.data.geometry import to_original, to_working
from segpipe.files import atomic_path, write_csv
from segpipe.inference import Predictor, image_batch
from segpipe.labels import Labels
from segpipe.metrics import image_metrics, pooled_metrics
from segpipe.plots import plot_predictions
from segpipe import rundir
from segpipe.rundir import check_snapshots, run_lock, snapshots
from segpipe.runtime import acquire_device
from segpipe.spec import default

log = logging.getLogger(__name__)

BATCH = 8
"""Squashed test images predicted at a time."""
DISPLAY_SIDE = 256
"""The longer side of the figures' examples, at most, in pixels."""


def evaluate_run(run_dir: Path, cache: Path, threshold: float = default("evaluate.threshold"),
                 n_examples: int = default("evaluate.examples"),
                 device: str = default("resources.device")) -> None:
    """Score a run's best model and snapshots on its test images (see the module docstring) on
    ``device`` (:data:`segpipe.runtime.DEVICES`), holding the run directory's lock
    (:func:`segpipe.rundir.run_lock`). The snapshots must be those that ``model.pt`` records
    (:func:`segpipe.rundir.check_snapshots`). ``threshold`` and ``n_examples`` are the
    config's ``evaluate`` settings, checked by the schema where they enter (the workflow at
    start, ``segpipe evaluate``'s options)."""
    run_dir, cache = Path(run_dir), Path(cache)
    if not run_dir.is_dir():
        raise SegpipeError(f"{run_dir}: run directory not found")
    with run_lock(run_dir, "evaluate"):
        _evaluate(run_dir, cache, threshold, n_examples, device)


def _evaluate(run_dir: Path, cache_path: Path, threshold: float, n_examples: int,
              device: str) -> None:
    from segpipe.data.dataset import split_indices

    device = acquire_device(device)
    model, checkpoint = load_checkpoint(run_dir / rundir.MODEL, device)
    spec, predictor = checkpoint["spec"], Predictor.of([model], [checkpoint], device)
    labels, fold = predictor.labels, spec.get("fold")
    rows = None if fold is None else split_indices(cache_path, fold)[2]
    with Cache(cache_path) as cache:
        rows = np.arange(len(cache)) if rows is None else rows
        if not len(rows):
            raise SegpipeError(f"{cache_path}: the test cache holds no images")
        _check_cache(cache, checkpoint, run_dir / rundir.MODEL)
        names = [cache.names[row] for row in rows]
        check_snapshots(run_dir / rundir.SNAPSHOTS, spec["train"]["snapshot_epochs"],
                        checkpoint["epochs"])
        shown = rows[:n_examples]
        display = _display_size(cache.orig_size[shown[0]])
        per_image, pooled, probs, confusion = score(predictor, cache, rows, threshold,
                                                    len(shown), display)
        row = {"run": spec["run"], **{axis: spec["names"][axis] for axis in AXES},
               "seed": spec["seed"], **_metric_columns(per_image, pooled, labels),
               **{key: checkpoint[key] for key in RUN_COLUMNS}}

        epochs, by_epoch, evolution, evolution_dice = [], [], [], []
        for epoch, path in snapshots(run_dir / rundir.SNAPSHOTS).items():
            snapshot, snapshot_checkpoint = load_checkpoint(path, device)
            if snapshot_checkpoint["spec"] != spec or snapshot_checkpoint["epoch"] != epoch:
                raise SegpipeError(f"{path}: holds epoch {snapshot_checkpoint['epoch']} of run "
                                   f"{snapshot_checkpoint['spec']['run']}, not epoch {epoch} of "
                                   f"the run of {run_dir / rundir.MODEL}")
            snapshot_per_image, snapshot_pooled, snapshot_probs, _ = score(
                Predictor.of([snapshot], [snapshot_checkpoint], device), cache, rows, threshold,
                len(shown), display)
            epochs.append(epoch)
            by_epoch.append({"epoch": epoch, **_metric_columns(snapshot_per_image,
                                                               snapshot_pooled, labels)})
            evolution.append(snapshot_probs)
            evolution_dice.append(snapshot_per_image["dice"][:len(shown)])
        images = np.stack([to_working(cache.image(r), display) for r in shown])
        masks = np.stack([_nearest(cache.truth(r), display) for r in shown])
    # Written once every snapshot is scored: a bad snapshot leaves no partial outputs.
    write_csv(run_dir / rundir.METRICS, metrics_csv(labels), [row])
    write_csv(run_dir / rundir.PER_IMAGE, per_image_csv(labels),
              [{"name": name, **{m: values[k] for m, values in per_image.items()}}
               for k, name in enumerate(names)])
    write_csv(run_dir / rundir.BY_EPOCH, by_epoch_csv(labels), by_epoch)
    if confusion is not None:
        write_csv(run_dir / rundir.CONFUSION, ("truth", *labels.class_names),
                  [{"truth": name, **dict(zip(labels.class_names, map(int, counts)))}
                   for name, counts in zip(labels.class_names, confusion)])
    shown_names = names[:len(shown)]
    with atomic_path(run_dir / rundir.EVOLUTION) as tmp:
        np.savez_compressed(
            tmp, epochs=np.array(epochs, dtype=np.int64),
            probs=np.array(evolution, dtype=np.float16).reshape(len(epochs), *probs.shape),
            probs_best=probs.astype(np.float16),
            dice=np.array(evolution_dice, dtype=np.float64).reshape(len(epochs), len(shown)),
            dice_best=per_image["dice"][:len(shown)], images=images, masks=masks,
            names=np.array(shown_names, dtype=str), threshold=np.float64(threshold))
    plot_predictions(shown_names, images, masks, probs, threshold, labels,
                     run_dir / rundir.PREDICTIONS,
                     title=f"{spec['run']} (epoch {checkpoint['best_epoch']}) on "
                           f"{cache_path.name}, scored at the original size")
    log.info("%s: test dice %.4f (pooled %.4f, its AP within %.1e of the exact one) at the "
             "original size, %d snapshot(s)", spec["run"], row["dice"], row["pooled_dice"],
             pooled.ap_bound(), len(epochs))


def _check_cache(cache: Cache, checkpoint: dict, model_path: Path) -> None:
    """The test cache is at the working resolution of the model and holds its classes."""
    geometry, labels = checkpoint_geometry(checkpoint), checkpoint_labels(checkpoint)
    if cache.geometry != geometry:
        raise SegpipeError(f"{cache.path}: images are at {cache.geometry.describe()}, but "
                           f"{model_path} was trained at {geometry.describe()}")
    if cache.labels.class_names != labels.class_names:
        raise SegpipeError(f"{cache.path}: holds the classes {', '.join(cache.labels.class_names)}"
                           f", but {model_path} predicts {', '.join(labels.class_names)}")


@torch.no_grad()
def score(predictor: Predictor, cache: Cache, rows: np.ndarray, threshold: float, keep: int,
          display: tuple[int, int]
          ) -> tuple[dict[str, np.ndarray], dict, np.ndarray, np.ndarray | None]:
    """Scores of the cache ``rows`` at their original size: the probabilities of
    ``predictor`` (:mod:`segpipe.inference`; squashed images :data:`BATCH` at a time) brought
    to each image's own size (:func:`segpipe.data.geometry.to_original`) and scored against
    its truth drawn there (:meth:`segpipe.data.cache.Cache.truth`). Returns the per-image
    metrics ``{column: (N,)}``, the pooled metrics (a :mod:`segpipe.metrics` accumulator, in
    constant memory), the probabilities float32 of the first ``keep`` images at the
    ``display`` size ((keep, h, w) binary, (keep, C, h, w) with several classes) and, with
    several classes, the pooled confusion matrix (C, C). One image at its original size is
    in memory at a time."""
    labels = predictor.labels
    pooled = pooled_metrics(labels, threshold)
    per_image: dict[str, list] = {}
    kept: list[np.ndarray] = []
    step = 1 if predictor.geometry.native else BATCH
    for first in range(0, len(rows), step):
        batch = rows[first:first + step]
        probs = predictor(image_batch([cache.image(r) for r in batch])).numpy()
        for row, working in zip(batch, probs):
            original = to_original(working, cache.orig_size[row])
            truth = torch.from_numpy(cache.truth(row))[None]
            scored = torch.from_numpy(original)[None]
            if labels.binary:
                truth = truth[:, None]
            pooled.update(scored, truth)
            for name, values in image_metrics(scored, truth, labels, threshold).items():
                per_image.setdefault(name, []).append(values)
            if len(kept) < keep:
                shown = to_original(original, display)
                kept.append(shown[0] if labels.binary else shown)
    confusion = None if labels.binary else pooled.confusion().numpy()
    return ({m: torch.cat(v).numpy() for m, v in per_image.items()}, pooled,
            np.stack(kept), confusion)


def _display_size(original: np.ndarray) -> tuple[int, int]:
    """The size of the figures' examples: the first example's own size, its longer side at
    most :data:`DISPLAY_SIDE` pixels; the others are resized to it (figures only)."""
    factor = min(1.0, DISPLAY_SIDE / max(original))
    return max(1, round(int(original[0]) * factor)), max(1, round(int(original[1]) * factor))


def _nearest(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A class mask at ``size`` by nearest neighbour (figures only)."""
    if mask.shape == tuple(size):
        return mask
    return cv2.resize(mask, (size[1], size[0]), interpolation=cv2.INTER_NEAREST_EXACT)


def _metric_columns(per_image: dict[str, np.ndarray], pooled,
                    labels: Labels) -> dict[str, float]:
    """The metric columns: per-image means, then pooled values; with several classes then
    each class's mean over the images whose truth holds it (NaN where none does) and its
    pooled value."""
    pooled = pooled.compute()
    columns = {**{col: float(per_image[m].mean()) for col, m in zip(MEAN_COLUMNS, METRICS)},
               **{col: pooled[m] for col, m in zip(POOLED_COLUMNS, METRICS)}}
    for column in class_metric_columns(labels):
        if column.startswith("pooled_"):
            columns[column] = pooled[column]
        else:
            defined = per_image[column][~np.isnan(per_image[column])]
            columns[column] = float(defined.mean()) if len(defined) else float("nan")
    return columns
