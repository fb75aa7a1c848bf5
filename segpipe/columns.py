"""Names the stages share: the axes of a run and the columns of the result files.

Written once here, read by the workflow (workflow/rules/common.smk), training, evaluation and
aggregation. Torch-free, so that Snakemake and aggregation import it cheaply.
docs/formats.md describes the files.
"""

from __future__ import annotations

AXES = ("architecture", "backbone", "loss", "augmentation")
"""The axes of a run; a run's name is ``<architecture>__<backbone>__<loss>__<augmentation>
__s<seed>``, each part naming a definition in the config section ``DEFINITIONS[axis]``."""
DEFINITIONS = {"architecture": "architectures", "backbone": "backbones", "loss": "losses",
               "augmentation": "augmentations"}
"""Axis → the config section that holds its named definitions."""

METRICS = ("accuracy", "dice", "iou", "precision", "recall", "ap")
"""The metrics of :mod:`segpipe.metrics`, per image and pooled."""
MEAN_COLUMNS = tuple("map" if metric == "ap" else metric for metric in METRICS)
"""Means over the test images of the per-image metrics (the mean AP is "mAP")."""
POOLED_COLUMNS = tuple(f"pooled_{metric}" for metric in METRICS)
"""The metrics over all test pixels together."""
METRIC_COLUMNS = MEAN_COLUMNS + POOLED_COLUMNS
CURVES = {"map": "test mAP", "dice": "test Dice"}
"""The columns of metrics_by_epoch.csv that aggregation averages per epoch into curves.png,
with their labels there."""
RUN_COLUMNS = ("parameters", "train_seconds", "epochs", "best_epoch", "peak_memory_mb")
"""Facts about the training of a run, copied from its checkpoint."""

METRICS_CSV = ("run", *AXES, "seed", *METRIC_COLUMNS, *RUN_COLUMNS)
"""``metrics.csv``: one row, the best model (``model.pt``) on the test split."""
PER_IMAGE_CSV = ("name", *METRICS)
"""``per_image.csv``: one row per test image, the best model's metrics."""
BY_EPOCH_CSV = ("epoch", *METRIC_COLUMNS)
"""``metrics_by_epoch.csv``: one row per snapshot epoch, its metrics on the test split."""
REFERENCE_RUNS = "reference_runs.txt"
"""An experiment's reference group (chosen on validation), one run folder per line: the
ensemble ``segpipe predict`` uses in the workflow (every seed, and below each its folds)."""


def class_metric_columns(labels) -> list[str]:
    """The per-class columns of metrics.csv and metrics_by_epoch.csv for the classes of
    ``labels`` (:class:`segpipe.labels.Labels`): ``<metric>.<class>``, the mean over the test
    images whose truth holds the class, and ``pooled_<metric>.<class>``; none when binary."""
    from segpipe.labels import CLASS_METRICS

    return [c for prefix in ("", "pooled_") for m in CLASS_METRICS
            for c in labels.class_columns(prefix + m)]


def metrics_csv(labels) -> tuple[str, ...]:
    """metrics.csv's columns: :data:`METRICS_CSV`, with several classes the per-class columns
    before the run columns."""
    return ("run", *AXES, "seed", *METRIC_COLUMNS, *class_metric_columns(labels), *RUN_COLUMNS)


def per_image_csv(labels) -> tuple[str, ...]:
    """per_image.csv's columns: :data:`PER_IMAGE_CSV`, then the per-class metrics and counts."""
    return (*PER_IMAGE_CSV, *labels.per_image_columns())


def by_epoch_csv(labels) -> tuple[str, ...]:
    """metrics_by_epoch.csv's columns: :data:`BY_EPOCH_CSV`, then the per-class ones."""
    return (*BY_EPOCH_CSV, *class_metric_columns(labels))
