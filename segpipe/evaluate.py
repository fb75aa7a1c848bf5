"""Evaluation of a trained run on its test images (never used for model selection).

``evaluate_run(run_dir, cache)`` scores ``model.pt`` (the best epoch on validation) and every
``snapshots/epoch_<k>.pt`` on the test images — every image of the test cache or, for a run
trained on fold f of a cross-validation cache (``spec["fold"]``), the images of fold f — with
the metrics of :mod:`segpipe.metrics` at ``threshold``, and writes into the run directory
(docs/formats.md):

- ``metrics.csv``: one row (columns :data:`segpipe.columns.METRICS_CSV`): the run, its axes
  and seed, per-image means and pooled values of the metrics, and from the checkpoint
  ``parameters, train_seconds, epochs, best_epoch, peak_memory_mb``;
- ``per_image.csv``: ``name`` and the per-image metrics of the best model;
- ``metrics_by_epoch.csv``: ``epoch`` and the metric columns above, one row per snapshot;
- ``evolution.npz``: on the first ``n_examples`` test images, the probabilities of each
  snapshot (``probs``) and of the best model (``probs_best``), and ``threshold``, so that
  figures made from it threshold as the metrics do;
- ``predictions.png``: image, truth, prediction and probability for those images.
"""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn

from segpipe import SegpipeError
from segpipe.checkpoint import checkpoint_labels, load_checkpoint
from segpipe.columns import (AXES, MEAN_COLUMNS, METRICS, POOLED_COLUMNS,
                             RUN_COLUMNS, by_epoch_csv, class_metric_columns, metrics_csv,
                             per_image_csv)
from segpipe.files import atomic_path, write_csv
from segpipe.labels import Labels
from segpipe.metrics import image_metrics, pooled_metrics
from segpipe.plots import plot_predictions
from segpipe import rundir
from segpipe.rundir import check_snapshots, run_lock, snapshots
from segpipe.runtime import acquire_device, forward_logits, probabilities
from segpipe.spec import default

log = logging.getLogger(__name__)


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


def _evaluate(run_dir: Path, cache: Path, threshold: float, n_examples: int,
              device: str) -> None:
    from segpipe.data.dataset import SegmentationH5Dataset, split_indices

    device = acquire_device(device)
    model, checkpoint = load_checkpoint(run_dir / rundir.MODEL, device)
    spec, labels = checkpoint["spec"], checkpoint_labels(checkpoint)
    fold = spec.get("fold")
    rows = None if fold is None else split_indices(cache, fold)[2]
    all_names, images, masks = _read_test_images(cache, rows, n_examples)
    names = all_names[: len(images)]
    if list(images.shape[1:3]) != list(checkpoint["size"]):
        raise SegpipeError(f"{cache}: images are {images.shape[1]}x{images.shape[2]}, but "
                           f"{run_dir / rundir.MODEL} was trained at "
                           f"{checkpoint['size'][0]}x{checkpoint['size'][1]}")
    test_set = SegmentationH5Dataset(cache, indices=rows)
    if test_set.labels.class_names != labels.class_names:
        raise SegpipeError(f"{cache}: holds the classes {', '.join(test_set.labels.class_names)}"
                           f", but {run_dir / rundir.MODEL} predicts "
                           f"{', '.join(labels.class_names)}")
    loader = torch.utils.data.DataLoader(test_set, batch_size=8)

    check_snapshots(run_dir / rundir.SNAPSHOTS, spec["train"]["snapshot_epochs"],
                    checkpoint["epochs"])
    per_image, pooled, probs, confusion = score(model, checkpoint, loader, device, threshold,
                                                len(names), labels)
    row = {"run": spec["run"], **{axis: spec["names"][axis] for axis in AXES},
           "seed": spec["seed"], **_metric_columns(per_image, pooled, labels),
           **{key: checkpoint[key] for key in RUN_COLUMNS}}

    epochs, by_epoch, evolution = [], [], []
    for epoch, path in snapshots(run_dir / rundir.SNAPSHOTS).items():
        snapshot, snapshot_checkpoint = load_checkpoint(path, device)
        if snapshot_checkpoint["spec"] != spec or snapshot_checkpoint["epoch"] != epoch:
            raise SegpipeError(f"{path}: holds epoch {snapshot_checkpoint['epoch']} of run "
                               f"{snapshot_checkpoint['spec']['run']}, not epoch {epoch} of the "
                               f"run of {run_dir / rundir.MODEL}")
        snapshot_per_image, snapshot_pooled, snapshot_probs, _ = score(
            snapshot, snapshot_checkpoint, loader, device, threshold, len(names), labels)
        epochs.append(epoch)
        by_epoch.append({"epoch": epoch, **_metric_columns(snapshot_per_image, snapshot_pooled,
                                                           labels)})
        evolution.append(snapshot_probs)
    # Written once every snapshot is scored: a bad snapshot leaves no partial outputs.
    write_csv(run_dir / rundir.METRICS, metrics_csv(labels), [row])
    write_csv(run_dir / rundir.PER_IMAGE, per_image_csv(labels),
              [{"name": name, **{m: values[k] for m, values in per_image.items()}}
               for k, name in enumerate(all_names)])
    write_csv(run_dir / rundir.BY_EPOCH, by_epoch_csv(labels), by_epoch)
    if confusion is not None:
        write_csv(run_dir / rundir.CONFUSION, ("truth", *labels.class_names),
                  [{"truth": name, **dict(zip(labels.class_names, map(int, counts)))}
                   for name, counts in zip(labels.class_names, confusion)])
    with atomic_path(run_dir / rundir.EVOLUTION) as tmp:
        np.savez_compressed(
            tmp, epochs=np.array(epochs, dtype=np.int64),
            probs=np.array(evolution, dtype=np.float16).reshape(len(epochs), *probs.shape),
            probs_best=probs.astype(np.float16), images=images, masks=masks,
            names=np.array(names, dtype=str), threshold=np.float64(threshold))
    plot_predictions(names, images, masks, probs, threshold, labels, run_dir / rundir.PREDICTIONS,
                     title=f"{spec['run']} (epoch {checkpoint['best_epoch']}) on {cache.name}")
    log.info("%s: test dice %.4f (pooled %.4f), %d snapshot(s)", spec["run"], row["dice"],
             row["pooled_dice"], len(epochs))


@torch.no_grad()
def score(model: nn.Module, checkpoint: dict, loader: torch.utils.data.DataLoader,
          device: torch.device, threshold: float, keep: int, labels: Labels
          ) -> tuple[dict[str, np.ndarray], dict[str, float], np.ndarray, np.ndarray | None]:
    """Per-image metrics ``{column: (N,)}``, pooled metrics, the probabilities float32 of the
    first ``keep`` images ((keep, H, W) binary, (keep, C, H, W) with several classes) and,
    with several classes, the pooled confusion matrix (C, C)."""
    pooled = pooled_metrics(labels, threshold)
    per_image: dict[str, list] = {}
    kept: list[torch.Tensor] = []
    for images, masks in loader:
        logits = forward_logits(model, images, device, checkpoint["mean"], checkpoint["std"])
        probs = probabilities(logits)
        masks = masks.to(device)
        pooled.update(probs, masks)
        for name, values in image_metrics(probs, masks, labels, threshold).items():
            per_image.setdefault(name, []).append(values.cpu())
        if sum(map(len, kept)) < keep:
            kept.append((probs[:keep, 0] if labels.binary else probs[:keep]).cpu())
    confusion = None if labels.binary else pooled.confusion().numpy()
    return ({m: torch.cat(v).numpy() for m, v in per_image.items()}, pooled.compute(),
            torch.cat(kept)[:keep].numpy(), confusion)


def _metric_columns(per_image: dict[str, np.ndarray], pooled: dict[str, float],
                    labels: Labels) -> dict[str, float]:
    """The metric columns: per-image means, then pooled values; with several classes then
    each class's mean over the images whose truth holds it (NaN where none does) and its
    pooled value."""
    columns = {**{col: float(per_image[m].mean()) for col, m in zip(MEAN_COLUMNS, METRICS)},
               **{col: pooled[m] for col, m in zip(POOLED_COLUMNS, METRICS)}}
    for column in class_metric_columns(labels):
        if column.startswith("pooled_"):
            columns[column] = pooled[column]
        else:
            defined = per_image[column][~np.isnan(per_image[column])]
            columns[column] = float(defined.mean()) if len(defined) else float("nan")
    return columns


def _read_test_images(cache: Path, rows: np.ndarray | None, count: int
                      ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The names of the test images (cache ``rows``, all rows when None), and images (K,H,W,3)
    and masks (K,H,W) of the first ``count`` of them."""
    try:
        with h5py.File(cache, "r") as f:
            names = f["names"].asstr()[:]
            rows = np.arange(len(names)) if rows is None else rows
            first = rows[:count]
            names, images, masks = list(names[rows]), f["images"][first], f["masks"][first]
    except (OSError, KeyError) as exc:
        raise SegpipeError(f"{cache}: not a segpipe HDF5 cache ({exc})") from None
    if not names:
        raise SegpipeError(f"{cache}: the test cache holds no images")
    return names, images, masks
