"""Segmentation metrics from probabilities, per image and pooled: binary (foreground
probabilities, below) and several classes (:func:`per_image_class_metrics`).

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
from segpipe.labels import CLASS_METRICS, COUNTS, IGNORE, Labels


def per_image_metrics(probs: Tensor, masks: Tensor, threshold: float = 0.5) -> dict[str, Tensor]:
    """Metrics of each image: ``{name: float64 tensor (N,)}`` for the names in ``METRICS``,
    on the device of ``probs``. Their means over images are the per-image scores ("mAP" for
    ``ap``). Pixels of ``masks`` equal to :data:`~segpipe.labels.IGNORE` are not counted."""
    probs, truth, valid = _flatten(probs, masks)
    if valid is None:
        ap = torch.stack([_average_precision(p, t) for p, t in zip(probs, truth)])
        return _metrics(*_counts(probs >= threshold, truth), ap)
    ap = torch.stack([_average_precision(p[v], t[v]) for p, t, v in zip(probs, truth, valid)])
    return _metrics(*_counts(probs >= threshold, truth, valid), ap)


AP_BINS = 10_000
"""Bins of width 1/AP_BINS over [0, 1] of the pooled metrics' probability histograms."""


class PooledMetrics:
    """Metrics over all pixels of a dataset, accumulated batch by batch in constant memory.

    TP, FP, FN, TN are counted exactly. AP: each pixel's probability lands in one of
    :data:`AP_BINS` equal bins over [0, 1] (a histogram of positives and of negatives), and
    the pooled AP is the exact AP of the probabilities rounded down to their bin (the pixels
    of a bin tied): :func:`histogram_ap`, which also bounds its difference to the AP of the
    unrounded probabilities (scikit-learn's ``average_precision_score``). Per-image AP is
    exact (:func:`per_image_metrics`).
    """

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = threshold
        self._counts = torch.zeros(4, dtype=torch.int64)
        self._positives = torch.zeros(AP_BINS, dtype=torch.int64)
        self._negatives = torch.zeros(AP_BINS, dtype=torch.int64)

    def update(self, probs: Tensor, masks: Tensor) -> None:
        """Add a batch: ``probs`` and ``masks`` as for :func:`per_image_metrics`."""
        probs, truth, valid = _flatten(probs, masks)
        counts = _counts(probs >= self.threshold, truth, valid)
        if valid is not None:
            probs, truth = probs[valid], truth[valid]
        self._counts += torch.stack([c.sum() for c in counts]).cpu()
        bins, truth = _bins(probs.reshape(-1)).cpu(), truth.reshape(-1).cpu()
        self._positives += torch.bincount(bins[truth], minlength=AP_BINS)
        self._negatives += torch.bincount(bins[~truth], minlength=AP_BINS)

    def compute(self) -> dict[str, float]:
        """``{name: value}`` for the names in ``METRICS`` over every pixel seen so far."""
        if not self._counts.any():
            raise ValueError("PooledMetrics.compute() called before any update()")
        ap, _ = histogram_ap(self._positives, self._negatives)
        metrics = _metrics(*self._counts, ap)
        return {name: value.item() for name, value in metrics.items()}

    def ap_bound(self) -> float:
        """The most the pooled AP can differ from the exact AP of the unrounded probabilities."""
        return histogram_ap(self._positives, self._negatives)[1].item()


def _bins(probs: Tensor) -> Tensor:
    """The histogram bin of each probability: ⌊p · AP_BINS⌋, 1 in the last bin."""
    return (probs.float() * AP_BINS).long().clamp_(0, AP_BINS - 1)


def histogram_ap(positives: Tensor, negatives: Tensor) -> tuple[Tensor, Tensor]:
    """AP (float64 scalar tensor; NaN without positives) of probabilities given as the counts
    of positive and negative pixels in each bin (low bins first), the pixels of a bin tied:
    Σ_b (p_b / P)·Prec_b, Prec_b the precision at the end of bin b from the top — scikit-learn's
    AP of the binned scores; and a bound of its difference to the AP of the unbinned ones.

    Bound: the k-th positive of bin b, with TP₀ and FP₀ the positives and negatives of the
    bins above, has precision (TP₀ + k)/(TP₀ + FP₀ + k + m) for the m ≤ n_b negatives of its
    bin ranked above it, so between lo_b = (TP₀ + 1)/(TP₀ + FP₀ + n_b + 1) and hi_b =
    (TP₀ + p_b)/(TP₀ + FP₀ + p_b), as is Prec_b: |AP − AP_binned| ≤ Σ_b (p_b/P)(hi_b − lo_b).
    """
    pos, neg = positives.flip(0).double(), negatives.flip(0).double()
    tp, fp = pos.cumsum(0), neg.cumsum(0)
    total = tp[-1]
    if total == 0:
        return torch.tensor(float("nan"), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    tp0, fp0 = tp - pos, fp - neg
    share = pos / total
    precision = tp / (tp + fp).clamp_min(1)
    high = tp / (tp + fp0).clamp_min(1)
    low = (tp0 + 1) / (tp0 + fp0 + neg + 1)
    return (share * precision).sum(), (share * (high - low)).sum()


def _flatten(probs: Tensor, masks: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """(N, ...) probabilities and masks → (N, pixels) float and bool, and the pixels that are
    not ignored (None when none is)."""
    if probs.shape != masks.shape or probs.dim() < 2:
        raise ValueError(f"probs {tuple(probs.shape)} and masks {tuple(masks.shape)} must "
                         "have one shape (N, H, W) or (N, 1, H, W)")
    masks = masks.flatten(1)
    ignored = masks == IGNORE
    if not ignored.any():
        return probs.flatten(1), masks.bool(), None
    return probs.flatten(1), masks.bool() & ~ignored, ~ignored


def _counts(pred: Tensor, truth: Tensor, valid: Tensor | None = None
            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """TP, FP, FN, TN per row of (N, pixels) bool tensors, on the ``valid`` pixels only when
    given (``truth`` is False on the others)."""
    if valid is not None:
        pred = pred & valid
    tp = (pred & truth).sum(1)
    fp = pred.sum(1) - tp
    fn = truth.sum(1) - tp
    tn = (pred.shape[1] if valid is None else valid.sum(1)) - tp - fp - fn
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


# --------------------------------------------------------------------------- several classes

def image_metrics(probs: Tensor, masks: Tensor, labels: Labels, threshold: float = 0.5
                  ) -> dict[str, Tensor]:
    """The per-image metrics of a study: :func:`per_image_metrics` (binary, at ``threshold``)
    or :func:`per_image_class_metrics`."""
    if labels.binary:
        return per_image_metrics(probs, masks, threshold)
    return per_image_class_metrics(probs, masks, labels)


def pooled_metrics(labels: Labels, threshold: float = 0.5) -> PooledMetrics | PooledClassMetrics:
    """The pooled metrics of a study: :class:`PooledMetrics` (binary) or
    :class:`PooledClassMetrics`."""
    return PooledMetrics(threshold) if labels.binary else PooledClassMetrics(labels)


def per_image_class_metrics(probs: Tensor, masks: Tensor, labels: Labels
                            ) -> dict[str, Tensor]:
    """Metrics of each image of a multi-class study: ``{column: float64 tensor (N,)}`` for the
    image scores ``METRICS`` and the per-class columns of
    :meth:`~segpipe.labels.Labels.per_image_columns`.

    ``probs`` (N, C, H, W) softmax probabilities, ``masks`` (N, H, W) or (N, 1, H, W) class
    indices; the prediction is the argmax; ignored pixels count nowhere. For class c with
    TP, FP, FN on the image: dice, iou, precision, recall as in the binary case and the
    one-vs-rest AP of ``probs[:, c]``, all **undefined (NaN) when c is absent from the truth**
    (whatever the prediction: its false-positive pixels are in ``fp.<c>``), and precision 0
    when c is present but never predicted. An image's ``dice`` (``iou``, ``precision``,
    ``recall``, ``ap``) is the mean over the classes its truth holds; an image whose truth
    holds no class scores 1 when nothing is predicted either, else 0 (binary's "empty vs empty
    = 1"). ``accuracy``: the share of its pixels whose class is right.
    """
    pred, truth, valid, flat = _classes(probs, masks)
    columns: dict[str, Tensor] = {}
    present, scores = [], {m: [] for m in CLASS_METRICS}
    for c, name in enumerate(labels.names, start=1):
        t, p = (truth == c) & valid, (pred == c) & valid
        tp, fp, fn, _ = _counts(p, t)
        ref, predicted = tp + fn, tp + fp
        defined = ref > 0
        ap = torch.stack([_average_precision(scores_[v], t_[v])
                          for scores_, t_, v in zip(flat[:, c], t, valid)])
        values = {"dice": _ratio(2 * tp, 2 * tp + fp + fn), "iou": _ratio(tp, tp + fp + fn),
                  "precision": _ratio(tp, predicted), "recall": _ratio(tp, ref), "ap": ap}
        for metric, value in values.items():
            value = torch.where(defined, value, torch.nan)
            columns[f"{metric}.{name}"] = value
            scores[metric].append(value)
        for count, value in zip(COUNTS, (tp, fp, fn, ref, predicted)):
            columns[f"{count}.{name}"] = value.double()
        present.append(defined)
    present = torch.stack(present, 1)
    nothing_predicted = ((pred > 0) & valid).sum(1) == 0
    empty_score = nothing_predicted.double()
    image = {m: torch.where(present.any(1), torch.stack(v, 1).nansum(1) / present.sum(1).clamp_min(1),
                            empty_score) for m, v in scores.items()}
    correct = ((pred == truth) & valid).sum(1)
    image["accuracy"] = _ratio(correct, valid.sum(1)).where(valid.sum(1) > 0, 1.0)
    return {**{m: image[m] for m in METRICS}, **columns}


class PooledClassMetrics:
    """Metrics of a multi-class study over all pixels of a dataset, batch by batch in constant
    memory: :meth:`compute` gives per class ``pooled_<metric>.<class>`` from the dataset's TP,
    FP, FN (NaN for a class absent from the whole truth) and the one-vs-rest AP of its
    probability histogram (:func:`histogram_ap`), and for the names in ``METRICS`` their means
    over the classes (the macro average over the foreground classes: ``iou`` is the mIoU of
    computer-vision papers, without the background) and the pixel accuracy; :meth:`confusion`
    the confusion matrix."""

    def __init__(self, labels: Labels) -> None:
        self.labels = labels
        self._confusion = torch.zeros(labels.outputs, labels.outputs, dtype=torch.int64)
        self._positives = torch.zeros(labels.outputs, AP_BINS, dtype=torch.int64)
        self._negatives = torch.zeros(labels.outputs, AP_BINS, dtype=torch.int64)

    def update(self, probs: Tensor, masks: Tensor) -> None:
        pred, truth, valid, flat = _classes(probs, masks)
        n = self.labels.outputs
        pairs = truth[valid].long() * n + pred[valid].long()
        self._confusion += torch.bincount(pairs, minlength=n * n).reshape(n, n).cpu()
        truth = truth[valid].cpu()
        for c in range(1, n):
            bins = _bins(flat[:, c][valid]).cpu()
            positive = truth == c
            self._positives[c] += torch.bincount(bins[positive], minlength=AP_BINS)
            self._negatives[c] += torch.bincount(bins[~positive], minlength=AP_BINS)

    def confusion(self) -> Tensor:
        """(C, C) int64 pixel counts, rows the true class, columns the predicted one."""
        return self._confusion.clone()

    def ap_bound(self) -> float:
        """The most any class's pooled AP can differ from the exact one (:func:`histogram_ap`)."""
        return max(histogram_ap(self._positives[c], self._negatives[c])[1].item()
                   for c in range(1, self.labels.outputs))

    def compute(self) -> dict[str, float]:
        if not self._confusion.any():
            raise ValueError("PooledClassMetrics.compute() called before any update()")
        matrix = self._confusion.double()
        result, per_class = {}, {m: [] for m in CLASS_METRICS}
        for c, name in enumerate(self.labels.names, start=1):
            tp = matrix[c, c]
            fp, fn = matrix[:, c].sum() - tp, matrix[c].sum() - tp
            defined = bool(tp + fn > 0)
            values = {"dice": _ratio(2 * tp, 2 * tp + fp + fn), "iou": _ratio(tp, tp + fp + fn),
                      "precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn),
                      "ap": histogram_ap(self._positives[c], self._negatives[c])[0]}
            for metric, value in values.items():
                value = value.item() if defined else float("nan")
                result[f"pooled_{metric}.{name}"] = value
                per_class[metric].append(value)
        means = {m: float(torch.tensor(v).nanmean()) for m, v in per_class.items()}
        means["accuracy"] = (matrix.diag().sum() / matrix.sum().clamp_min(1)).item()
        return {**{m: means[m] for m in METRICS}, **result}


def _classes(probs: Tensor, masks: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Predicted classes (N, pixels) by argmax, true classes, the pixels not ignored, and the
    probabilities (N, C, pixels)."""
    masks = masks.flatten(1)
    if probs.dim() != 4 or masks.shape != (probs.shape[0], probs.shape[2] * probs.shape[3]):
        raise ValueError(f"probs {tuple(probs.shape)} must be (N, C, H, W) and masks "
                         f"{tuple(masks.shape)} (N, H, W) or (N, 1, H, W)")
    flat = probs.flatten(2)
    return flat.argmax(1), masks, masks != IGNORE, flat


def _ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """numerator / denominator as float64, 0 where the denominator is 0."""
    value = numerator.double() / denominator.double().clamp_min(1)
    return torch.where(denominator > 0, value, 0.0)
