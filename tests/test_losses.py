import math

import pytest
import torch

from segpipe import SegpipeError
from segpipe.columns import AXES
from segpipe.labels import IGNORE, Labels
from segpipe.losses import EPS, TERMS, build_loss
from segpipe.spec import check_spec, loss_errors, schema

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
    """Checked where a run enters (`segpipe train`'s spec; the workflow's start by the same
    schema), not by build_loss."""
    spec = {**{"run": "r", "seed": 0, "names": dict.fromkeys(AXES, "x"),
            "architecture": {"model": "unet"}, "backbone": {}, "loss": {"bce": 1.0},
            "augmentation": {}, "train": {}}, "loss": definition}
    with pytest.raises(SegpipeError, match=f"^run spec: loss[.:] ?{message}"):
        check_spec(spec)


# --------------------------------------------------------------------------- several classes

CLASSES = Labels(("a", "b", "c"), configured=True)  # 4 outputs: background, a, b, c


def random_multiclass(seed: int, n: int = 3, size: int = 6, ignore: bool = False):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, CLASSES.outputs, size, size, generator=generator) * 2
    target = torch.randint(0, CLASSES.outputs, (n, 1, size, size), generator=generator)
    if ignore:
        target[torch.rand(target.shape, generator=generator) < 0.2] = IGNORE
    return logits, target.float()


@pytest.mark.parametrize("seed", range(3))
def test_multiclass_terms_equal_monai_and_torch(seed):
    from monai.losses import DiceCELoss, DiceLoss

    logits, target = random_multiclass(seed)
    dice = DiceLoss(softmax=True, to_onehot_y=True, include_background=False,
                    smooth_nr=EPS, smooth_dr=EPS)(logits, target)
    assert build_loss({"dice": 1.0}, CLASSES)(logits, target).item() == pytest.approx(
        dice.item(), abs=1e-6)
    ce = torch.nn.functional.cross_entropy(logits, target[:, 0].long())
    assert build_loss({"bce": 1.0}, CLASSES)(logits, target).item() == pytest.approx(
        ce.item(), abs=1e-6)
    for alpha in (0.0, 0.3, 1.0):
        monai = DiceCELoss(softmax=True, to_onehot_y=True, include_background=False,
                           smooth_nr=EPS, smooth_dr=EPS, lambda_dice=alpha,
                           lambda_ce=1 - alpha)(logits, target)
        ours = build_loss({"bce": 1 - alpha, "dice": alpha}, CLASSES)(logits, target)
        assert ours.item() == pytest.approx(monai.item(), abs=1e-6)


def test_class_weights_and_pos_weight_weigh_the_cross_entropy():
    logits, target = random_multiclass(4)
    weights = [0.5, 1.0, 2.0, 3.0]
    expected = torch.nn.functional.cross_entropy(logits, target[:, 0].long(),
                                                 weight=torch.tensor(weights))
    loss = build_loss({"bce": 1.0, "class_weights": weights}, CLASSES)(logits, target)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    expected = torch.nn.functional.cross_entropy(logits, target[:, 0].long(),
                                                 weight=torch.tensor([1.0, 4.0, 4.0, 4.0]))
    loss = build_loss({"bce": 1.0, "pos_weight": 4.0}, CLASSES)(logits, target)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    # the rule between a loss and the classes, checked where a spec enters, not by build_loss
    assert loss_errors({"bce": 1.0, "class_weights": [1, 2]}, CLASSES) == [
        "loss.class_weights: 2 weights, but the study has 4 classes (background, a, b, c)"]
    assert loss_errors({"bce": 1.0, "class_weights": [1, 2]}, Labels())[0].startswith(
        "loss.class_weights: applies with several classes")
    assert loss_errors({"bce": 1.0, "class_weights": [1, 2, 3, 4]}, CLASSES) == []


def test_ignored_pixels_count_in_no_multiclass_term():
    """Changing the logits of ignored pixels changes no term; each term equals itself on the
    pixels that are not ignored (cross-entropy: torch's ignore_index)."""
    labels = Labels(("a", "b", "c"), ignore=("void",), configured=True)
    logits, target = random_multiclass(5, ignore=True)
    ignored = target.expand_as(logits) == IGNORE
    other = logits.where(~ignored, torch.randn_like(logits) * 10)
    for definition in ({"bce": 1.0}, {"dice": 1.0}, {"focal_tversky": 1.0}):
        loss = build_loss(definition, labels)
        assert loss(other, target).item() == pytest.approx(loss(logits, target).item(), abs=1e-6)
    expected = torch.nn.functional.cross_entropy(logits, target[:, 0].long(), ignore_index=IGNORE)
    assert build_loss({"bce": 1.0}, labels)(logits, target).item() == pytest.approx(
        expected.item(), abs=1e-6)


def test_multiclass_focal_tversky_hand_computed():
    """One image, two pixels, truth (a, background); class b absent and nearly never predicted.
    Class a: TP = p_a(1), FN = 1 − p_a(1), FP = p_a(2); TI = (TP + ε)/(TP + 0.7 FN + 0.3 FP + ε);
    class b: TI = ε/(0.3 FP + ε); the loss is the mean of (1 − TI)^0.75 over a and b."""
    labels = Labels(("a", "b"), configured=True)
    logits = torch.stack([torch.tensor([0.0, LN3]), torch.tensor([LN3, 0.0]),
                          torch.tensor([-50.0, -50.0])]).view(1, 3, 1, 2)
    target = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    p_a = torch.softmax(logits, 1)[0, 1, 0]
    tp, fn, fp = p_a[0], 1 - p_a[0], p_a[1]
    ti_a = (tp + EPS) / (tp + 0.7 * fn + 0.3 * fp + EPS)
    p_b = torch.softmax(logits, 1)[0, 2, 0]
    ti_b = EPS / (0.3 * p_b.sum() + EPS)
    expected = ((1 - ti_a) ** 0.75 + (1 - ti_b).clamp_min(1e-12) ** 0.75) / 2
    loss = build_loss({"focal_tversky": 1.0}, labels)(logits, target)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_binary_ignore_leaves_ignored_pixels_out():
    labels = Labels(ignore=("void",))
    logits = batch([LN3, -LN3, 5.0, -5.0])
    target = batch([1, 0, IGNORE, IGNORE])
    plain = build_loss({"bce": 1.0, "dice": 1.0})(logits[..., :1, :], target[..., :1, :])
    assert build_loss({"bce": 1.0, "dice": 1.0}, labels)(logits, target).item() == pytest.approx(
        plain.item(), rel=1e-6)


def test_the_schema_lists_every_registered_term_and_its_options():
    """The one check between losses.TERMS and $defs.loss.terms of the config contract (from
    which the schema's term rules are made): every option of a term is typed there."""
    terms = schema()["$defs"]["loss"]["terms"]
    assert list(terms) == list(TERMS)
    properties = schema()["$defs"]["loss"]["properties"]
    options = {option for options in terms.values() for option in options}
    assert set(properties) == {*terms, *options}
