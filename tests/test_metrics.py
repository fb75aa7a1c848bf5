import math

import pytest
import torch

import numpy as np

from segpipe.labels import IGNORE, Labels
from segpipe.metrics import (METRICS, PooledClassMetrics, PooledMetrics,
                             per_image_class_metrics, per_image_metrics)

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
        ap = per_image_metrics(scores.view(1, 1, 4), labels.view(1, 1, 4))["ap"][0].item()
        assert ap == pytest.approx(expected, abs=1e-12)


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


# --------------------------------------------------------------------------- several classes

def one_hot_probs(pred: np.ndarray, classes: int, seed: int) -> torch.Tensor:
    """Softmax-like probabilities (N, C, H, W) whose argmax is ``pred`` (N, H, W)."""
    rng = np.random.default_rng(seed)
    probs = rng.random((*pred.shape[:1], classes, *pred.shape[1:])) * 0.5
    np.put_along_axis(probs, pred[:, None], 1.0, axis=1)
    return torch.from_numpy(probs / probs.sum(1, keepdims=True))


def test_per_class_metrics_hand_computed():
    """Two 1x4 images, classes a (1) and b (2). Image 0: truth a a b 0, prediction a b b b;
    image 1: truth 0 0 0 0, prediction 0 0 b 0 (no class in the truth)."""
    labels = Labels(("a", "b"), configured=True)
    truth = torch.tensor([[1, 1, 2, 0], [0, 0, 0, 0]]).view(2, 1, 4)
    pred = np.array([[1, 2, 2, 2], [0, 0, 2, 0]]).reshape(2, 1, 4)
    m = per_image_class_metrics(one_hot_probs(pred, 3, 0), truth, labels)
    # a on image 0: TP 1, FP 0, FN 1 -> Dice 2/3; b: TP 1, FP 2, FN 0 -> Dice 2/4
    assert m["dice.a"][0].item() == pytest.approx(2 / 3) and m["dice.b"][0].item() == 0.5
    assert m["precision.b"][0].item() == pytest.approx(1 / 3) and m["recall.a"][0] == 0.5
    assert m["dice"][0].item() == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert m["accuracy"][0].item() == 0.5
    assert [m[f"{c}.b"][0].item() for c in ("tp", "fp", "fn", "ref", "pred")] == [1, 2, 0, 1, 3]
    # image 1: every class undefined, its false positive recorded, the image scores 0
    assert torch.isnan(m["dice.a"][1]) and torch.isnan(m["dice.b"][1])
    assert m["fp.b"][1].item() == 1 and m["dice"][1].item() == 0.0
    empty = per_image_class_metrics(one_hot_probs(np.zeros((1, 1, 4), int), 3, 1),
                                    torch.zeros(1, 1, 4, dtype=torch.long), labels)
    assert empty["dice"].item() == 1.0 and empty["iou"].item() == 1.0  # empty vs empty


@pytest.mark.parametrize("seed", range(4))
def test_per_class_metrics_equal_sklearn(seed):
    from sklearn.metrics import (average_precision_score, confusion_matrix, f1_score,
                                 jaccard_score, precision_score, recall_score)

    labels = Labels(("a", "b", "c"), configured=True)
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 4, (3, 6, 5))
    truth[1][truth[1] == 3] = 0  # class c absent from image 1
    truth[2, :2] = IGNORE
    logits = torch.from_numpy(rng.normal(size=(3, 4, 6, 5)) * 2)
    probs = torch.softmax(logits, 1)
    m = per_image_class_metrics(probs, torch.from_numpy(truth), labels)
    pred = probs.argmax(1).numpy()
    for i in range(3):
        valid = truth[i] != IGNORE
        t, p = truth[i][valid], pred[i][valid]
        f1 = f1_score(t, p, labels=[1, 2, 3], average=None, zero_division=0)
        iou = jaccard_score(t, p, labels=[1, 2, 3], average=None, zero_division=0)
        precision = precision_score(t, p, labels=[1, 2, 3], average=None, zero_division=0)
        recall = recall_score(t, p, labels=[1, 2, 3], average=None, zero_division=0)
        for c, name in enumerate(labels.names):
            if (t == c + 1).any():
                assert m[f"dice.{name}"][i].item() == pytest.approx(f1[c])
                assert m[f"iou.{name}"][i].item() == pytest.approx(iou[c])
                assert m[f"precision.{name}"][i].item() == pytest.approx(precision[c])
                assert m[f"recall.{name}"][i].item() == pytest.approx(recall[c])
                ap = average_precision_score(t == c + 1, probs[i, c + 1].numpy()[valid])
                assert m[f"ap.{name}"][i].item() == pytest.approx(ap)
            else:
                assert math.isnan(m[f"dice.{name}"][i].item())
        present = [c for c in range(3) if (t == c + 1).any()]
        assert m["dice"][i].item() == pytest.approx(np.mean(f1[present]))
    pooled = PooledClassMetrics(labels)
    pooled.update(probs[:2], torch.from_numpy(truth[:2]))
    pooled.update(probs[2:], torch.from_numpy(truth[2:]))
    valid = truth != IGNORE
    t, p = truth[valid], pred[valid]
    np.testing.assert_array_equal(pooled.confusion().numpy(),
                                  confusion_matrix(t, p, labels=[0, 1, 2, 3]))
    result = pooled.compute()
    iou = jaccard_score(t, p, labels=[1, 2, 3], average=None)
    assert result["iou"] == pytest.approx(iou.mean())  # the macro mIoU over the classes
    assert result["pooled_dice.b"] == pytest.approx(f1_score(t, p, labels=[2], average=None)[0])
    scores = probs.permute(1, 0, 2, 3).numpy()[:, valid]
    assert result["pooled_ap.c"] == pytest.approx(average_precision_score(t == 3, scores[3]))
    assert result["accuracy"] == pytest.approx((t == p).mean())


def test_binary_metrics_leave_ignored_pixels_out():
    """TP 0.9, TN 0.2, FP 0.6; the two ignored pixels (0.8, 0.1) count nowhere."""
    probs = torch.tensor([[0.9, 0.2, 0.8, 0.1, 0.6]]).view(1, 1, 5)
    masks = torch.tensor([[1, 0, IGNORE, IGNORE, 0]], dtype=torch.uint8).view(1, 1, 5)
    m = per_image_metrics(probs, masks)
    assert m["accuracy"].item() == pytest.approx(2 / 3) and m["dice"].item() == pytest.approx(2 / 3)
    assert m["ap"].item() == 1.0 and m["precision"].item() == 0.5
    pooled = PooledMetrics()
    pooled.update(probs, masks)
    assert pooled.compute() == pytest.approx({k: m[k].item() for k in METRICS})


def test_pooled_ap_ties_a_bin_and_bounds_its_error_by_hand():
    """A positive at 0.95005 and a negative at 0.95 share the bin [0.95, 0.9501): the pooled AP
    ties them (precision 1/2 at the end of the bin), the exact AP ranks the positive first (1);
    the bound, hi − lo = 1/1 − 1/2, is exactly the error."""
    pooled = PooledMetrics()
    pooled.update(torch.tensor([[0.95005, 0.95]]), torch.tensor([[1, 0]]))
    assert pooled.compute()["ap"] == pytest.approx(0.5)
    assert pooled.ap_bound() == pytest.approx(0.5)
    apart = PooledMetrics()  # in bins of their own: exact, and a bound of 0
    apart.update(torch.tensor([[0.96, 0.95]]), torch.tensor([[1, 0]]))
    assert apart.compute()["ap"] == 1.0 and apart.ap_bound() == 0.0


@pytest.mark.parametrize("seed", [0, 1])
def test_pooled_ap_is_sklearns_within_its_bound(seed):
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(seed)
    truth = rng.random((4, 1, 100, 120)) < 0.3
    logits = rng.normal(0, 2, truth.shape) + 2.5 * truth  # informative, not perfect
    probs = torch.from_numpy(1 / (1 + np.exp(-logits))).float()
    binary, classes = PooledMetrics(), PooledClassMetrics(Labels.from_config(["a", "b"]))
    for k in range(4):
        p = probs[k:k + 1]
        binary.update(p, torch.from_numpy(truth[k:k + 1]))
        classes.update(torch.cat([(1 - p) / 2, p, (1 - p) / 2], 1),
                       torch.from_numpy(truth[k:k + 1, 0]).to(torch.uint8))
    exact = average_precision_score(truth.ravel(), probs.numpy().ravel())
    assert abs(binary.compute()["ap"] - exact) <= binary.ap_bound() < 5e-3
    assert abs(classes.compute()["pooled_ap.a"] - exact) <= classes.ap_bound() < 5e-3
