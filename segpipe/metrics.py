"""Binary segmentation metrics from foreground probabilities, per image and pooled.

Inputs are torch tensors on any device: ``probs`` float (N, H, W) or (N, 1, H, W) and
``masks`` of the same shape with values in {0, 1} (any dtype). A pixel is predicted
foreground when ``prob >= threshold`` (0.5 by default). With TP, FP, FN, TN counted over the
pixels of one image (per image) or of all images (pooled):

    accuracy  = (TP + TN) / (TP + FP + FN + TN)
    dice      = 2·TP / (2·TP + FP + FN)
    iou       = TP / (TP + FP + FN)
    precision = TP / (TP + FP)
    recall    = TP / (TP + FN)
    ap        = Σₙ (Rₙ − Rₙ₋₁)·Pₙ   (average precision of the pixel probabilities)

AP is scikit-learn's ``average_precision_score``: the thresholds are the distinct
probability values in decreasing order, Pₙ and Rₙ the precision and recall of ``prob >=
threshold n``, R₀ = 0; tied probabilities enter together at one threshold. It does not
depend on ``threshold``.

Zero denominators: a ratio whose denominator is 0 is 1 when prediction and truth are both
empty ("empty vs empty = 1") and 0 otherwise. So on an image without foreground, a
prediction without foreground scores 1 on dice, iou, precision, recall and ap, and any
predicted foreground pixel scores 0 on all five. AP needs positives to be defined: when the
truth is empty it follows the same rule (1 if no pixel reaches ``threshold``, else 0).
"""

from __future__ import annotations

import torch
from torch import Tensor

from segpipe.columns import METRICS


def per_image_metrics(probs: Tensor, masks: Tensor, threshold: float = 0.5) -> dict[str, Tensor]:
    """Metrics of each image: ``{name: float64 tensor (N,)}`` for the names in ``METRICS``,
    on the device of ``probs``. Their means over images are the per-image scores ("mAP" for
    ``ap``)."""
    probs, truth = _flatten(probs, masks)
    ap = torch.stack([_average_precision(p, t) for p, t in zip(probs, truth)])
    return _metrics(*_counts(probs >= threshold, truth), ap)


class PooledMetrics:
    """Metrics over all pixels of a dataset, accumulated batch by batch.

    Counts are accumulated exactly; for the exact pooled AP every probability is kept on the
    CPU as float32 with its label (5 bytes per pixel: 15 MB for 11 images of 512², 1.3 GB
    for 1000), and :meth:`compute` sorts them, briefly needing about 60 bytes per pixel.
    """

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = threshold
        self._counts = torch.zeros(4, dtype=torch.int64)
        self._probs: list[Tensor] = []
        self._labels: list[Tensor] = []

    def update(self, probs: Tensor, masks: Tensor) -> None:
        """Add a batch: ``probs`` and ``masks`` as for :func:`per_image_metrics`."""
        probs, truth = _flatten(probs, masks)
        counts = _counts(probs >= self.threshold, truth)
        self._counts += torch.stack([c.sum() for c in counts]).cpu()
        self._probs.append(probs.reshape(-1).float().cpu())
        self._labels.append(truth.reshape(-1).cpu())

    def compute(self) -> dict[str, float]:
        """``{name: value}`` for the names in ``METRICS`` over every pixel seen so far."""
        if not self._probs:
            raise ValueError("PooledMetrics.compute() called before any update()")
        ap = _average_precision(torch.cat(self._probs), torch.cat(self._labels))
        metrics = _metrics(*self._counts, ap)
        return {name: value.item() for name, value in metrics.items()}


def average_precision(scores: Tensor, labels: Tensor) -> float:
    """Average precision ``Σₙ (Rₙ − Rₙ₋₁)·Pₙ`` of 1-D ``scores`` against 1-D ``labels`` in
    {0, 1}, as scikit-learn's ``average_precision_score`` (thresholds at the distinct score
    values). NaN when ``labels`` has no positive (AP is undefined)."""
    if scores.dim() != 1 or scores.shape != labels.shape:
        raise ValueError(f"expected two 1-D tensors of one length, got {tuple(scores.shape)} "
                         f"and {tuple(labels.shape)}")
    return _average_precision(scores, labels.bool()).item()


def _flatten(probs: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """(N, ...) probabilities and masks → (N, pixels) float and bool."""
    if probs.shape != masks.shape or probs.dim() < 2:
        raise ValueError(f"probs {tuple(probs.shape)} and masks {tuple(masks.shape)} must "
                         "have one shape (N, H, W) or (N, 1, H, W)")
    return probs.flatten(1), masks.flatten(1).bool()


def _counts(pred: Tensor, truth: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """TP, FP, FN, TN per row of (N, pixels) bool tensors."""
    tp = (pred & truth).sum(1)
    fp = pred.sum(1) - tp
    fn = truth.sum(1) - tp
    tn = pred.shape[1] - tp - fp - fn
    return tp, fp, fn, tn


def _metrics(tp: Tensor, fp: Tensor, fn: Tensor, tn: Tensor, ap: Tensor) -> dict[str, Tensor]:
    """All metrics from counts and AP, with the zero-denominator rule of the module."""
    both_empty = (tp + fp + fn) == 0

    def ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
        value = numerator.double() / denominator.clamp_min(1).double()
        return torch.where(denominator > 0, value, both_empty.double())

    return {
        "accuracy": ratio(tp + tn, tp + fp + fn + tn),
        "dice": ratio(2 * tp, 2 * tp + fp + fn),
        "iou": ratio(tp, tp + fp + fn),
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
        "ap": torch.where(tp + fn > 0, ap, both_empty.double()),
    }


def _average_precision(scores: Tensor, labels: Tensor) -> Tensor:
    """Σₙ (Rₙ − Rₙ₋₁)·Pₙ of 1-D scores and bool labels as a float64 scalar tensor; NaN
    without positives. Threshold n is the end of the n-th group of tied scores in decreasing
    order; the counts there are cumulative sums of the sorted labels."""
    sorted_scores, order = torch.sort(scores, descending=True)
    true_positives = labels[order].cumsum(0)
    group_ends = torch.cat([
        torch.nonzero(sorted_scores[1:] != sorted_scores[:-1]).flatten(),
        torch.tensor([len(scores) - 1], device=scores.device),
    ])
    tp = true_positives[group_ends].double()
    precision = tp / (group_ends + 1)
    recall_gain = torch.diff(tp, prepend=tp.new_zeros(1)) / tp[-1]
    return (recall_gain * precision).sum()
