"""Statistics: hand-computed Holm, Wilcoxon and bootstrap cases, and agreement with scipy."""

import math

import numpy as np
import pytest
import scipy.stats

from segpipe.stats import (
    Bootstrap,
    Scores,
    choose_reference,
    compare_with_reference,
    holm,
    mean_ci95,
    mrmc_p,
    paired_difference,
    rank_descending,
    rank_interval,
    significance,
    verdict,
    wilcoxon_p,
)


def test_holm_hand_computed():
    # sorted 0.01, 0.03, 0.04 → 3·0.01 = 0.03, 2·0.03 = 0.06, max(0.06, 1·0.04) = 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    # sorted 0.2, 0.5 → 2·0.2 = 0.4, max(0.4, 0.5) = 0.5
    assert holm([0.5, 0.2]) == pytest.approx([0.5, 0.4])
    assert holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])  # 2·0.6 capped at 1
    assert holm([0.3]) == pytest.approx([0.3])
    assert holm([]).size == 0


def test_wilcoxon_exact_p_hand_computed():
    """d = (0.1, 0.2, −0.3, 0.4): ranks 1..4, R+ = 1 + 2 + 4 = 7. Of the 16 equally likely
    sign patterns, R+ ≥ 7 for {3,4}, {1,2,4}, {1,3,4}, {2,3,4}, {1,2,3,4}: P = 5/16; R+ ≤ 7
    for all but the 3 with R+ ≥ 8: P = 13/16."""
    d = [0.1, 0.2, -0.3, 0.4]
    assert wilcoxon_p(d, "greater") == pytest.approx(5 / 16)
    assert wilcoxon_p(d, "less") == pytest.approx(13 / 16)
    assert wilcoxon_p(d) == pytest.approx(2 * 5 / 16)
    # all four positive: only the all-plus pattern reaches R+ = 10
    assert wilcoxon_p([0.1, 0.2, 0.3, 0.4], "greater") == pytest.approx(1 / 16)
    assert wilcoxon_p([0.1, 0.2, 0.3, 0.4]) == pytest.approx(2 / 16)


def test_wilcoxon_agrees_with_scipy_and_all_zero_differences_give_one():
    rng = np.random.default_rng(0)
    for d in (rng.normal(0.02, 0.05, 30), np.round(rng.normal(0.01, 0.05, 70), 2)):
        for alternative in ("two-sided", "greater", "less"):
            assert wilcoxon_p(d, alternative) == scipy.stats.wilcoxon(
                d, alternative=alternative).pvalue
    for alternative in ("two-sided", "greater", "less"):
        assert wilcoxon_p(np.zeros(5), alternative) == 1.0


def test_bootstrap_of_a_constant_matrix_is_that_constant():
    bootstrap = Bootstrap(n_images=7)
    lo, hi = bootstrap.interval(Scores((0, 1, 2), np.full((3, 7), 0.7)))
    assert lo == pytest.approx(0.7, abs=1e-12) and hi == pytest.approx(0.7, abs=1e-12)


def test_bootstrap_means_are_the_means_of_resampled_matrices():
    """Each resample's mean equals the mean of the matrix with its seeds and images repeated
    as often as they were drawn; each resample draws as many items as there are."""
    values = np.random.default_rng(1).random((3, 5))
    bootstrap = Bootstrap(n_images=5, n_resamples=50, seed=3)
    means = bootstrap.means(Scores((0, 1, 2), values))
    seeds, images = bootstrap.seed_counts(3), bootstrap.image_counts
    assert (seeds.sum(axis=1) == 3).all() and (images.sum(axis=1) == 5).all()
    for b in range(50):
        resampled = np.repeat(np.repeat(values, seeds[b], axis=0), images[b], axis=1)
        assert resampled.shape == (3, 5)
        assert means[b] == pytest.approx(resampled.mean())
    assert not np.allclose(means, means[0])  # the resamples differ


def test_two_level_bootstrap_resamples_seeds_and_images_independently():
    """For scores a_s + b_i, the resampled mean is a weighted mean of a plus one of b, so its
    variance is var(a)/S + var(b)/N (population variances)."""
    a, b = np.array([0.0, 0.1, 0.3]), np.random.default_rng(2).normal(0, 0.2, 40)
    means = Bootstrap(n_images=40, n_resamples=20000).means(Scores((0, 1, 2),
                                                                  a[:, None] + b[None, :]))
    expected = a.var() / 3 + b.var() / 40
    assert means.var() == pytest.approx(expected, rel=0.05)
    assert means.mean() == pytest.approx(a.mean() + b.mean(), abs=0.01)


def test_one_seed_bootstrap_agrees_with_scipy():
    """With one seed only the images are resampled: scipy's percentile bootstrap of the
    mean over images gives the same interval up to Monte Carlo error (here ~0.03 SE)."""
    x = np.random.default_rng(3).normal(0.6, 0.1, 30)
    ours = Bootstrap(n_images=30, n_resamples=20000).interval(Scores((0,), x[None, :]))
    theirs = scipy.stats.bootstrap((x,), np.mean, method="percentile", n_resamples=20000,
                                   rng=np.random.default_rng(0)).confidence_interval
    standard_error = x.std() / math.sqrt(len(x))
    assert ours == pytest.approx((theirs.low, theirs.high), abs=0.15 * standard_error)


def test_paired_difference_of_a_known_matrix():
    """a = b + 0.1 on every image: Δ = 0.1 exactly with a degenerate paired interval,
    although each group alone varies widely over images."""
    b_values = np.random.default_rng(4).random((2, 9))
    a, b = Scores((0, 1), b_values + 0.1), Scores((0, 1), b_values)
    diff = paired_difference(a, b)
    bootstrap = Bootstrap(n_images=9)
    assert diff.mean() == pytest.approx(0.1)
    assert bootstrap.interval(diff) == pytest.approx((0.1, 0.1))
    lo, hi = bootstrap.interval(b)
    assert hi - lo > 0.2


def test_paired_difference_uses_the_shared_seeds():
    a = Scores((0, 1, 2), np.array([[0.5, 0.6], [0.7, 0.8], [0.9, 1.0]]))
    b = Scores((1, 2, 3), np.array([[0.1, 0.2], [0.3, 0.4], [0.0, 0.0]]))
    diff = paired_difference(a, b)
    assert diff.seeds == (1, 2)
    assert diff.values == pytest.approx(np.array([[0.6, 0.6], [0.6, 0.6]]))
    with pytest.raises(ValueError, match="share no seed"):
        paired_difference(a, Scores((5,), np.zeros((1, 2))))


REFERENCE = np.array([0.50, 0.60, 0.70, 0.80, 0.55, 0.65, 0.75, 0.85])
STEPS = np.arange(1, 9) / 100  # 0.01 … 0.08: distinct, so the exact test applies


def test_comparisons_with_the_reference_hand_computed():
    """b is worse on all 8 images: R+ = 0, exact two-sided p = 2/2⁸. c alternates
    +0.01, −0.02, …, −0.08: R+ = 1 + 3 + 5 + 7 = 16, p from scipy. Holm over the two:
    2 · 2/256, then max(that, p_c)."""
    signs = np.array([1, -1] * 4)
    dice = {"ref": REFERENCE, "b": REFERENCE - STEPS, "c": REFERENCE + signs * STEPS}
    scores = {"dice": {g: Scores((0,), v[None, :]) for g, v in dice.items()},
              "iou": {g: Scores((0,), v[None, :] / 2) for g, v in dice.items()}}
    result = compare_with_reference("ref", scores, Bootstrap(n_images=8))
    assert set(result) == {"b", "c"}
    b, c = result["b"], result["c"]
    p_c = scipy.stats.wilcoxon(signs * STEPS).pvalue
    assert b["p_wilcoxon"] == pytest.approx(2 / 256) and c["p_wilcoxon"] == pytest.approx(p_c)
    assert b["p_holm"] == pytest.approx(4 / 256) and c["p_holm"] == pytest.approx(p_c)
    assert (b["verdict"], c["verdict"]) == ("worse", "no detectable difference")
    assert b["delta_dice"] == pytest.approx(-0.045) and b["delta_iou"] == pytest.approx(-0.0225)
    assert -0.08 <= b["delta_dice_lo"] < -0.045 < b["delta_dice_hi"] <= -0.01
    assert c["delta_dice"] == pytest.approx(-0.005)
    assert c["delta_dice_lo"] < 0 < c["delta_dice_hi"]


def test_identical_groups_are_no_detectable_difference():
    scores = {"dice": {g: Scores((0, 1), np.tile(REFERENCE, (2, 1))) for g in ("a", "b")}}
    result = compare_with_reference("a", scores, Bootstrap(n_images=8))["b"]
    assert result["p_wilcoxon"] == 1.0 and result["p_holm"] == 1.0
    assert result["verdict"] == "no detectable difference"
    assert (result["delta_dice"], result["delta_dice_lo"], result["delta_dice_hi"]) == (0, 0, 0)
    assert compare_with_reference("a", {"dice": {"a": scores["dice"]["a"]}},
                                  Bootstrap(n_images=8)) == {}


def test_verdict_rule():
    """A verdict needs both Holm p < 0.05 and an interval of Δ on one side of 0; a NaN seeds ×
    images p (one seed) is not required."""
    assert verdict(0.01, 0.05, 0.01, 0.04) == "better"
    assert verdict(-0.05, -0.01, 0.049, 0.01) == "worse"
    assert verdict(-0.05, -0.01, 0.01, math.nan) == "worse"  # one seed
    assert verdict(0.01, 0.05, 0.05, 0.01) == "no detectable difference"  # Wilcoxon p = alpha
    assert verdict(0.01, 0.05, 0.01, 0.06) == "no detectable difference"  # seeds disagree
    assert verdict(-0.025, 0.01, 1e-8, 1e-8) == "no detectable difference"  # straddles 0
    assert verdict(0.0, 0.02, 0.001, 0.001) == "no detectable difference"  # touches 0


def test_mrmc_p_hand_computed():
    """d = [[.1, .3, .5], [.3, .3, .6]]: mean 0.35, seed means .3, .4, image means .2, .3, .55.
    MS_S = 3 · 0.005 = 0.015, MS_I = 2 · 0.065 / 2 = 0.065; residuals ±0.05 (four) and 0 (two),
    MS_E = 0.01 / 2 = 0.005. Variance (0.015 + 0.06) / 6 = 0.0125, t = 0.35 / √0.0125;
    df = 0.075² / (0.015² / 1 + 0.06² / 2) = 25/9."""
    d = Scores((0, 1), np.array([[0.1, 0.3, 0.5], [0.3, 0.3, 0.6]]))
    assert mrmc_p(d) == pytest.approx(2 * scipy.stats.t.sf(0.35 / math.sqrt(0.0125), 25 / 9))


def test_mrmc_p_reduces_to_t_tests_of_seed_or_image_means():
    rng = np.random.default_rng(3)
    seed_effects, image_effects = rng.normal(0.05, 0.1, 4), rng.normal(0.05, 0.1, 12)
    by_seed = Scores((0, 1, 2, 3), np.tile(seed_effects[:, None], (1, 12)))
    by_image = Scores((0, 1, 2, 3), np.tile(image_effects, (4, 1)))
    assert mrmc_p(by_seed) == pytest.approx(scipy.stats.ttest_1samp(seed_effects, 0).pvalue)
    assert mrmc_p(by_image) == pytest.approx(scipy.stats.ttest_1samp(image_effects, 0).pvalue)
    for alternative in ("greater", "less"):
        assert mrmc_p(by_seed, alternative) == pytest.approx(
            scipy.stats.ttest_1samp(seed_effects, 0, alternative=alternative).pvalue)
    assert math.isnan(mrmc_p(Scores((0,), image_effects[None, :])))  # one seed
    assert mrmc_p(Scores((0, 1), np.zeros((2, 5)))) == 1.0
    assert mrmc_p(Scores((0, 1), np.full((2, 5), 0.1))) == 0.0
    assert mrmc_p(Scores((0, 1), np.full((2, 5), 0.1)), "less") == 1.0


def test_a_gap_that_one_seed_reverses_is_no_detectable_difference():
    """Seeds 0 and 1 are 0.10 and 0.12 behind on every image, seed 2 0.05 ahead: averaged over
    seeds every image is behind, so the Wilcoxon test rejects (p = 2/2¹⁶), but the three runs
    disagree, and the seeds × images test does not (t over seed means −0.057 ± 0.054)."""
    noise = np.linspace(-0.01, 0.01, 16)
    reference = Scores((0, 1, 2), np.tile(0.6 + noise, (3, 1)))
    group = Scores((0, 1, 2), reference.values + np.array([[-0.10], [-0.12], [0.05]]) + noise)
    result = compare_with_reference("ref", {"dice": {"ref": reference, "g": group}},
                                    Bootstrap(n_images=16))["g"]
    assert result["p_holm"] == pytest.approx(2 / 2**16)
    assert result["p_mrmc_holm"] > 0.3
    assert result["verdict"] == "no detectable difference"


def test_significance_map_fills_where_both_tests_reject():
    """b beats a on every image of every seed (by 0.05 + noise); c beats a on every image when
    the seeds are averaged, but one of its three seeds is behind. Wilcoxon alone would fill
    both cells; the seeds × images test keeps c's empty."""
    noise = np.linspace(-0.01, 0.01, 16)
    a = Scores((0, 1, 2), np.tile(0.6 + noise, (3, 1)))
    b = Scores((0, 1, 2), a.values + np.array([[0.04], [0.05], [0.06]]) + noise[::-1])
    c = Scores((0, 1, 2), a.values + np.array([[0.10], [0.12], [-0.05]]) + noise[::-1])
    p = significance([b, c, a])
    assert p[0, 2] < 0.05 and p[1, 2] > 0.05
    assert wilcoxon_p((c.values - a.values).mean(axis=0), "greater") < 1e-4


def test_reference_by_validation_dice_with_the_one_standard_error_rule():
    val = {"base": {0: 0.70, 1: 0.60, 2: 0.75}, "b": {0: 0.72, 1: 0.70, 2: 0.72},
           "c": {0: 0.50, 1: 0.55, 2: 0.52}}
    # b − base = 0.02, 0.10, −0.03: mean 0.030, standard error 0.0379 → b is best, but base is
    # within one standard error of it and stays the reference; with b's seed 2 at 0.80 the
    # differences 0.02, 0.10, 0.05 (mean 0.057, standard error 0.023) make b the reference
    assert choose_reference(val) == "b" and choose_reference(val, "c") == "b"
    assert choose_reference({**val, "b": {0: 0.72, 1: 0.70, 2: 0.80}}, "base") == "b"
    assert choose_reference(val, "base") == "base"
    assert choose_reference(val, "b") == "b" and choose_reference(val, "unknown") == "b"
    # one shared seed: no standard error, the best is the reference
    assert choose_reference({"base": {0: 0.70}, "b": {0: 0.71}}, "base") == "b"
    # NaN validation Dice is ignored; no validation Dice at all: no reference
    assert choose_reference({"a": {0: math.nan}, "b": {0: 0.3}}, "a") == "b"
    assert choose_reference({"a": {0: math.nan}}) is None


def test_significance_map_hand_computed():
    """a > b > c on all 8 images: each 'better' test has R+ = 36 of 36, p = 1/2⁸; each
    reverse test p = 1. Holm over the 6 ordered pairs: 6/256, 5/256, 4/256 → all 6/256."""
    groups = [Scores((0,), (REFERENCE + shift)[None, :]) for shift in (2 * STEPS, STEPS, 0)]
    p = significance(groups)
    expected = np.array([[np.nan, 6 / 256, 6 / 256], [1, np.nan, 6 / 256], [1, 1, np.nan]])
    assert np.array_equal(np.isnan(p), np.isnan(expected))
    assert p[~np.isnan(p)] == pytest.approx(expected[~np.isnan(expected)])
    assert significance(groups[:1]).shape == (1, 1)


def test_ranks_and_rank_intervals():
    assert rank_descending(np.array([0.5, 0.7, 0.7, 0.1])).tolist() == [3, 1, 1, 4]
    # 40 resamples: rank 1 once, 2 38 times, 3 once → F(1) = 0.025, F(2) = 0.975
    ranks = np.array([1] + [2] * 38 + [3])[:, None]
    lo, hi = rank_interval(ranks)
    assert (lo.tolist(), hi.tolist()) == ([1], [2])
    # clearly separated groups keep their ranks in every resample
    groups = [Scores((0, 1), np.full((2, 8), level) + REFERENCE / 10) for level in (0.2, 0.9, 0.5)]
    bootstrap_ranks = Bootstrap(n_images=8).ranks(groups)
    assert bootstrap_ranks.shape == (2000, 3)
    assert (bootstrap_ranks == [3, 1, 2]).all()


def test_mean_ci95_is_the_student_t_interval():
    # s = 0.1, n = 3: t(0.975, 2) = 4.302653 → 4.302653 · 0.1 / √3 = 0.2484138
    mean, ci = mean_ci95([0.6, 0.7, 0.8])
    assert mean == pytest.approx(0.7) and ci == pytest.approx(0.2484138, abs=1e-7)
    x = [0.61, 0.7, 0.52, 0.66, 0.7]
    low, high = scipy.stats.t.interval(0.95, len(x) - 1, loc=np.mean(x),
                                       scale=scipy.stats.sem(x))
    mean, ci = mean_ci95(x)
    assert (mean - ci, mean + ci) == pytest.approx((low, high))
    mean, ci = mean_ci95([0.42])
    assert mean == 0.42 and math.isnan(ci)
