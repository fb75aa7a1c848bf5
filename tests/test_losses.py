import math

import pytest
import torch

from segpipe import SegpipeError
from segpipe.losses import EPS, build_loss
from segpipe.spec import check_definition

torch.set_num_threads(1)
LN3 = math.log(3.0)  # sigmoid(ln 3) = 3/4, sigmoid(-ln 3) = 1/4, sigmoid(0) = 1/2


def batch(*rows: list[float]) -> torch.Tensor:
    """(N, 1, 2, 2) tensor from N rows of four values."""
    return torch.tensor(rows, dtype=torch.float32).view(len(rows), 1, 2, 2)


def test_bce_hand_computed():
    logits, target = torch.tensor([[[[0.0, LN3]]]]), torch.tensor([[[[1.0, 0.0]]]])
    # -log(1/2) for the positive at p = 1/2, -log(1 - 3/4) for the negative at p = 3/4
    assert build_loss({"bce": 1.0})(logits, target).item() == pytest.approx(1.5 * math.log(2))
    weighted = build_loss({"bce": 1.0, "pos_weight": 5.0})(logits, target).item()
    assert weighted == pytest.approx((5 * math.log(2) + 2 * math.log(2)) / 2)


def test_soft_dice_per_sample_hand_computed():
    logits = batch([LN3, -LN3, 0.0, 0.0], [-LN3] * 4)
    target = batch([1, 0, 1, 0], [0, 0, 0, 0])
    # sample 1: p = (3/4, 1/4, 1/2, 1/2), Σpg = 5/4, Σp = 2, Σg = 2; sample 2: Σp = 1, Σg = 0
    first = 1 - (2 * 1.25 + EPS) / (2 + 2 + EPS)
    second = 1 - EPS / (1 + EPS)
    loss = build_loss({"dice": 1.0})(logits, target).item()
    assert loss == pytest.approx((first + second) / 2, rel=1e-6)


def test_dice_empty_vs_empty_costs_nothing():
    logits, target = torch.full((1, 1, 4, 4), -200.0), torch.zeros(1, 1, 4, 4)
    assert build_loss({"dice": 1.0})(logits, target).item() == 0.0


def test_focal_tversky_weighs_false_negatives_with_alpha():
    logits, target = batch([LN3, -LN3, -LN3, -LN3]), batch([1, 1, 0, 0])
    # TP = 3/4 + 1/4 = 1, FN = 1/4 + 3/4 = 1, FP = 1/4 + 1/4 = 1/2
    tversky = (1 + EPS) / (1 + 0.7 * 1 + 0.3 * 0.5 + EPS)
    loss = build_loss({"focal_tversky": 1.0})(logits, target).item()
    assert loss == pytest.approx((1 - tversky) ** 0.75, rel=1e-6)
    custom = build_loss({"focal_tversky": 1.0, "tversky_alpha": 0.2, "tversky_beta": 0.8,
                         "tversky_gamma": 2.0})(logits, target).item()
    assert custom == pytest.approx((1 - (1 + EPS) / (1 + 0.2 + 0.4 + EPS)) ** 2, rel=1e-6)


def test_identities_between_losses():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 8, 8, generator=generator)
    target = (torch.rand(3, 1, 8, 8, generator=generator) > 0.6).float()
    bce = build_loss({"bce": 1.0})(logits, target)
    dice = build_loss({"dice": 1.0})(logits, target)
    assert build_loss({"bce": 1.0, "dice": 0.0})(logits, target) == bce  # alpha = 0
    assert build_loss({"bce": 0.0, "dice": 1.0})(logits, target) == dice  # alpha = 1
    mixed = build_loss({"bce": 0.3, "dice": 0.7})(logits, target)
    assert mixed.item() == pytest.approx(0.7 * dice.item() + 0.3 * bce.item(), rel=1e-6)
    tversky_as_dice = build_loss({"focal_tversky": 1.0, "tversky_alpha": 0.5,
                                  "tversky_beta": 0.5, "tversky_gamma": 1.0})
    assert tversky_as_dice(logits, target).item() == pytest.approx(dice.item(), abs=1e-6)


def test_deep_supervision_is_the_mean_over_outputs():
    loss = build_loss({"bce": 0.5, "dice": 0.5})
    target = batch([1, 0, 1, 0])
    first, second = batch([2.0, -1.0, 0.5, 0.0]), batch([-3.0, 1.0, 0.0, 4.0])
    expected = (loss(first, target) + loss(second, target)) / 2
    assert loss([first, second], target).item() == pytest.approx(expected.item(), rel=1e-6)


def test_half_precision_logits_give_a_float32_loss():
    logits, target = batch([LN3, -LN3, 0.0, 0.0]), batch([1, 0, 1, 0])
    for definition in ({"bce": 1.0}, {"dice": 1.0}, {"focal_tversky": 1.0}):
        loss = build_loss(definition)
        reference = loss(logits.half().float(), target)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = loss(logits.half().requires_grad_(), target)
        assert low.dtype == torch.float32
        assert low.item() == reference.item()


def test_focal_tversky_gradient_is_finite_at_a_perfect_prediction():
    target = batch([1, 0, 1, 0])
    logits = torch.where(target > 0, 50.0, -200.0).requires_grad_()  # sigmoid exactly 0 or 1
    loss = build_loss({"focal_tversky": 1.0})(logits, target)
    loss.backward()
    assert loss.item() < 1e-8
    assert torch.isfinite(logits.grad).all()


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="shape"):
        build_loss({"dice": 1.0})(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 1))


@pytest.mark.parametrize("definition, message", [
    ({"bce": 1.0, "lovasz": 1.0}, r"lovasz: unknown key \(allowed: bce, dice, focal_tversky, "),
    ({"bce": -0.5, "dice": 1.0}, "bce: -0.5 is less than the minimum of 0"),
    ({"dice": "1"}, "dice: '1' is not of type 'number'"),
    ({"dice": True}, "dice: True is not of type 'number'"),
    ({"dice": float("inf")}, "dice: inf is not of type 'number'"),
    ({}, r"needs a term \(bce, dice or focal_tversky\) with a weight > 0"),
    ({"bce": 0.0, "dice": 0}, "needs a term"),
    ({"dice": 1.0, "pos_weight": 2.0}, "pos_weight: applies to bce, which is not set"),
    ({"bce": 1.0, "pos_weight": 0}, "pos_weight: 0 is less than or equal to the minimum of 0"),
    ({"dice": 1.0, "tversky_gamma": 2.0}, "tversky_gamma: applies to focal_tversky"),
    ({"focal_tversky": 1.0, "tversky_gamma": 0}, "tversky_gamma: 0 is less than or equal"),
])
def test_bad_definitions_name_the_key(definition, message):
    with pytest.raises(SegpipeError, match=f"^loss definition: {message}"):
        check_definition("loss", definition)
