import math

import pytest
import torch

from segpipe.metrics import METRICS, PooledMetrics, average_precision, per_image_metrics

torch.set_num_threads(1)

# Four 2x2 images (probabilities, truth) and their metrics worked out by hand.
PROBS = torch.tensor([
    [0.9, 0.6, 0.4, 0.1],  # TP 0.9, FP 0.6, FN 0.4, TN 0.1
    [0.2, 0.2, 0.2, 0.2],  # empty vs empty
    [0.7, 0.2, 0.2, 0.2],  # empty truth, one false positive
    [0.3, 0.2, 0.1, 0.0],  # object missed at 0.5, but ranked first
]).view(4, 2, 2)
MASKS = torch.tensor([
    [1, 0, 1, 0],
    [0, 0, 0, 0],
    [0, 0, 0, 0],
    [1, 0, 0, 0],
], dtype=torch.uint8).view(4, 2, 2)
EXPECTED = {
    "accuracy": [2 / 4, 1, 3 / 4, 3 / 4],
    "dice": [2 / 4, 1, 0, 0],
    "iou": [1 / 3, 1, 0, 0],
    "precision": [1 / 2, 1, 0, 0],
    "recall": [1 / 2, 1, 0, 0],
    # image 1, by threshold: 0.9 (P 1, R 1/2), 0.6 (P 1/2, R 1/2), 0.4 (P 2/3, R 1), 0.1
    "ap": [1 / 2 * 1 + 1 / 2 * 2 / 3, 1, 0, 1],
}


def brute_force_ap(scores: list[float], labels: list[int]) -> float:
    """Σ (Rₙ − Rₙ₋₁)·Pₙ over the distinct scores as thresholds, from the definition."""
    positives = sum(labels)
    ap, previous_recall = 0.0, 0.0
    for threshold in sorted(set(scores), reverse=True):
        predicted = [label for score, label in zip(scores, labels) if score >= threshold]
        precision, recall = sum(predicted) / len(predicted), sum(predicted) / positives
        ap += (recall - previous_recall) * precision
        previous_recall = recall
    return ap


def test_per_image_metrics_hand_computed():
    metrics = per_image_metrics(PROBS, MASKS)
    assert set(metrics) == set(METRICS)
    for name, expected in EXPECTED.items():
        assert metrics[name].shape == (4,)
        assert metrics[name].tolist() == pytest.approx(expected, abs=1e-12), name


def test_channel_dimension_is_accepted():
    metrics = per_image_metrics(PROBS[:, None], MASKS[:, None].float())
    assert metrics["dice"].tolist() == pytest.approx(EXPECTED["dice"])


def test_threshold_is_inclusive_and_configurable():
    probs, masks = torch.tensor([[[0.5, 0.3]]]), torch.tensor([[[1, 0]]])
    assert per_image_metrics(probs, masks)["dice"].item() == 1.0
    assert per_image_metrics(probs, masks, threshold=0.25)["precision"].item() == 0.5


def test_pooled_metrics_hand_computed_over_batches():
    pooled = PooledMetrics()
    pooled.update(PROBS[:3], MASKS[:3])
    pooled.update(PROBS[3:], MASKS[3:])
    result = pooled.compute()
    # over all 16 pixels: TP 1, FP 2, FN 2, TN 11
    assert result["accuracy"] == pytest.approx(12 / 16)
    assert result["dice"] == pytest.approx(2 / 6)
    assert result["iou"] == pytest.approx(1 / 5)
    assert result["precision"] == pytest.approx(1 / 3)
    assert result["recall"] == pytest.approx(1 / 3)
    scores, labels = PROBS.flatten().tolist(), MASKS.flatten().tolist()
    assert result["ap"] == pytest.approx(brute_force_ap(scores, labels), abs=1e-12)


def test_pooled_empty_vs_empty_is_one_and_a_false_positive_zero():
    pooled = PooledMetrics()
    pooled.update(PROBS[1:2], MASKS[1:2])
    assert pooled.compute() == {name: 1.0 for name in METRICS}
    pooled.update(PROBS[2:3], MASKS[2:3])
    result = pooled.compute()
    assert result["accuracy"] == 7 / 8
    assert all(result[name] == 0.0 for name in ("dice", "iou", "precision", "recall", "ap"))


def test_average_precision_with_ties_hand_computed():
    # threshold 0.5: TP 1 of 3 predicted (P 1/3, R 1/2); threshold 0.2: P 2/4, R 1
    expected = 1 / 2 * 1 / 3 + 1 / 2 * 2 / 4
    for order in ([0, 1, 2, 3], [2, 1, 0, 3], [3, 1, 2, 0]):
        scores = torch.tensor([0.5, 0.5, 0.5, 0.2])[order]
        labels = torch.tensor([1, 0, 0, 1])[order]
        assert average_precision(scores, labels) == pytest.approx(expected, abs=1e-12)


def test_average_precision_without_positives_is_undefined():
    assert math.isnan(average_precision(torch.tensor([0.9, 0.1]), torch.tensor([0, 0])))


@pytest.mark.parametrize("seed", range(5))
def test_average_precision_matches_brute_force_with_ties(seed):
    generator = torch.Generator().manual_seed(seed)
    scores = (torch.rand(3, 60, generator=generator) * 10).round() / 10  # many ties
    labels = (torch.rand(3, 60, generator=generator) < 0.3).long()
    labels[:, 0] = 1
    metrics = per_image_metrics(scores.view(3, 6, 10), labels.view(3, 6, 10))
    pooled = PooledMetrics()
    pooled.update(scores.view(3, 6, 10), labels.view(3, 6, 10))
    for row in range(3):
        reference = brute_force_ap(scores[row].tolist(), labels[row].tolist())
        assert average_precision(scores[row], labels[row]) == pytest.approx(reference, abs=1e-12)
        assert metrics["ap"][row].item() == pytest.approx(reference, abs=1e-12)
    reference = brute_force_ap(scores.flatten().tolist(), labels.flatten().tolist())
    assert pooled.compute()["ap"] == pytest.approx(reference, abs=1e-12)


def test_per_image_mean_and_pooled_differ_as_defined():
    metrics = per_image_metrics(PROBS, MASKS)
    pooled = PooledMetrics()
    pooled.update(PROBS, MASKS)
    assert metrics["dice"].mean().item() == pytest.approx(1.5 / 4)
    assert pooled.compute()["dice"] == pytest.approx(2 / 6)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="shape"):
        per_image_metrics(torch.zeros(2, 4, 4), torch.zeros(2, 4, 5))
    with pytest.raises(ValueError, match="update"):
        PooledMetrics().compute()
