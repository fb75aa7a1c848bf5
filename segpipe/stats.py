"""Statistics of an experiment: bootstrap intervals, paired Wilcoxon tests with Holm's
correction and bootstrap ranks, reported the way challengeR does (Wiesenfarth et al. 2021,
Sci. Rep. 11:2369).

The cases are the test images: every run of an experiment is scored on the same images, so a
group's per-image scores form a matrix ``values[s, i]`` (seed s, test image i) and two groups
are compared image by image (paired).

* Bootstrap (Efron & Tibshirani 1993), two-level: each of ``N_RESAMPLES`` resamples draws the
  test images with replacement and, independently, the seeds with replacement; a statistic is
  the mean of the resampled matrix. The interval is the percentile interval, the α/2 and
  1 − α/2 quantiles of the resampled means (α = ``ALPHA``). All groups are resampled with the
  same images, and groups with as many seeds with the same seed positions, so differences and
  ranks are paired. With one seed only the images are resampled. The generator is seeded
  (``SEED``): the same scores give the same intervals.
* Wilcoxon signed-rank test (Wilcoxon 1945), ``scipy.stats.wilcoxon`` with its defaults: zero
  differences are dropped; the exact null distribution without ties or zeros (up to 50 images),
  with them an exhaustive permutation test up to 13 images, beyond that the normal
  approximation with continuity correction. When all differences are zero, p = 1.
* Seeds × images test, the multi-reader multi-case analysis of radiology (Dorfman, Berbaum &
  Metz 1992, Invest. Radiol. 27:723; Hillis, Berbaum & Metz 2008, Acad. Radiol. 15:647) with
  seeds as readers and test images as cases: the paired differences ``d[s, i]`` are a two-way
  layout with random seed and image effects, so a training run that went well or badly counts
  as the chance it is, which the Wilcoxon test on seed-averaged differences ignores
  (:func:`mrmc_p`).
* Holm's step-down correction (Holm 1979) over the tests of one experiment.
* The reference, chosen on validation Dice with the one-standard-error rule (Breiman et al.
  1984; Hastie, Tibshirani & Friedman 2009, §7.10) in favour of the experiment's baseline
  (:func:`choose_reference`).
* Per-run statistics without per-image values (pooled metrics, validation Dice, …): mean over
  seeds ± the half-width of the Student t 95 % interval (``mean_ci95``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.stats

N_RESAMPLES = 2000
SEED = 0
ALPHA = 0.05


@dataclass(frozen=True)
class Scores:
    """One group's per-image scores of one metric: ``values[s, i]`` is the score of the run
    with seed ``seeds[s]`` on test image i."""

    seeds: tuple[int, ...]
    values: np.ndarray

    def mean(self) -> float:
        return float(self.values.mean())

    def on_seeds(self, seeds: Sequence[int]) -> Scores:
        """The rows of ``seeds`` (each must be one of this group's seeds)."""
        return Scores(tuple(seeds), self.values[[self.seeds.index(s) for s in seeds]])


def paired_difference(a: Scores, b: Scores) -> Scores:
    """``a − b`` image by image on the seeds both have (ascending)."""
    shared = sorted(set(a.seeds) & set(b.seeds))
    if not shared:
        raise ValueError("the two groups share no seed")
    return Scores(tuple(shared), a.on_seeds(shared).values - b.on_seeds(shared).values)


class Bootstrap:
    """Two-level resamples of the seeds × images matrices of one experiment (module docstring).

    A resample is a pair of count vectors — how often each seed and each image is drawn — so
    the mean of a resampled matrix is a weighted mean, computed for all resamples at once."""

    def __init__(self, n_images: int, n_resamples: int = N_RESAMPLES, seed: int = SEED):
        self.n_resamples = n_resamples
        self._rng = np.random.default_rng(seed)
        self.image_counts = self._counts(n_images)
        self._seed_counts: dict[int, np.ndarray] = {}

    def _counts(self, n: int) -> np.ndarray:
        """(n_resamples, n): how often each of n items is drawn in n draws with replacement."""
        return self._rng.multinomial(n, np.full(n, 1 / n), size=self.n_resamples)

    def seed_counts(self, n_seeds: int) -> np.ndarray:
        """Seed counts (n_resamples, n_seeds), drawn once per number of seeds and then shared."""
        if n_seeds not in self._seed_counts:
            self._seed_counts[n_seeds] = self._counts(n_seeds)
        return self._seed_counts[n_seeds]

    def means(self, scores: Scores) -> np.ndarray:
        """The mean of every resampled matrix, (n_resamples,)."""
        n_seeds, n_images = scores.values.shape
        if n_images != self.image_counts.shape[1]:
            raise ValueError(f"scores of {n_images} images, resamples of "
                             f"{self.image_counts.shape[1]}")
        by_image = self.seed_counts(n_seeds) @ scores.values  # (n_resamples, n_images)
        return (by_image * self.image_counts).sum(axis=1) / (n_seeds * n_images)

    def interval(self, scores: Scores, alpha: float = ALPHA) -> tuple[float, float]:
        """Percentile interval of the mean of ``scores`` at level 1 − ``alpha``."""
        lo, hi = np.quantile(self.means(scores), [alpha / 2, 1 - alpha / 2])
        return float(lo), float(hi)

    def ranks(self, groups: Sequence[Scores]) -> np.ndarray:
        """Rank of each group by mean score in every resample, (n_resamples, groups)."""
        return rank_descending(np.stack([self.means(g) for g in groups], axis=-1))


def rank_descending(values: np.ndarray) -> np.ndarray:
    """Ranks along the last axis, 1 = highest; ties share the best of their ranks."""
    return scipy.stats.rankdata(-np.asarray(values), method="min", axis=-1).astype(int)


def wilcoxon_p(differences: np.ndarray, alternative: str = "two-sided") -> float:
    """p-value of the Wilcoxon signed-rank test that ``differences`` are centred on 0
    (``alternative``: 'two-sided', or 'greater' / 'less' than 0); 1 when all are 0."""
    d = np.asarray(differences, dtype=float)
    if not d.any():
        return 1.0
    return float(scipy.stats.wilcoxon(d, alternative=alternative).pvalue)


def mrmc_p(differences: Scores, alternative: str = "two-sided") -> float:
    """p-value of the test that the mean of ``differences`` (seeds × images) is 0
    (``alternative``: 'two-sided', or 'greater' / 'less' than 0), with seeds and images both
    random (module docstring); NaN with fewer than 2 seeds or 2 images.

    With the mean squares of the two-way layout — seeds MS_S (n_s − 1 degrees of freedom),
    images MS_I (n_i − 1), residual MS_E — the variance of the mean difference is
    (MS_S + max(MS_I − MS_E, 0)) / (n_s·n_i) (the denominator of Hillis et al. 2008), and
    t = mean / √variance has the Satterthwaite (1946) degrees of freedom of that sum,
    (MS_S + M_I)² / (MS_S²/(n_s − 1) + M_I²/(n_i − 1)) with M_I = max(MS_I − MS_E, 0).
    Differences constant over images reduce it to the one-sample t-test of the seed means,
    differences constant over seeds to that of the image means. Zero variance: the p-value of
    a t of ±∞ (0 or 1), or 1 when the mean is 0 too."""
    d = np.asarray(differences.values, dtype=float)
    n_seeds, n_images = d.shape
    if n_seeds < 2 or n_images < 2:
        return math.nan
    mean = d.mean()
    seed_means, image_means = d.mean(axis=1), d.mean(axis=0)
    residual = d - seed_means[:, None] - image_means[None, :] + mean
    ms_seeds = n_images * seed_means.var(ddof=1)
    ms_images = n_seeds * image_means.var(ddof=1)
    ms_error = (residual**2).sum() / ((n_seeds - 1) * (n_images - 1))
    image_term = max(ms_images - ms_error, 0.0)
    total = ms_seeds + image_term
    if total <= 0:
        if mean == 0:
            return 1.0
        t, dof = math.copysign(math.inf, mean), 1.0
    else:
        dof = total**2 / (ms_seeds**2 / (n_seeds - 1) + image_term**2 / (n_images - 1))
        t = mean / math.sqrt(total / (n_seeds * n_images))
    if alternative == "two-sided":
        return float(min(1.0, 2 * scipy.stats.t.sf(abs(t), dof)))
    return float(scipy.stats.t.sf(t if alternative == "greater" else -t, dof))


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm-adjusted p-values (Holm 1979): with p₍₁₎ ≤ … ≤ p₍ₘ₎ sorted,
    p̃₍ₖ₎ = min(1, max_{j ≤ k} (m − j + 1)·p₍ⱼ₎), returned in the input order."""
    p = np.asarray(p_values, dtype=float)
    order = np.argsort(p, kind="stable")
    stepped = np.maximum.accumulate((len(p) - np.arange(len(p))) * p[order])
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(stepped, 1.0)
    return adjusted


def verdict(low: float, high: float, p_holm: float, p_mrmc_holm: float,
            alpha: float = ALPHA) -> str:
    """'better' or 'worse' where everything says so: the Holm-adjusted Wilcoxon p and
    seeds × images p are below ``alpha`` and the bootstrap interval [``low``, ``high``] of Δ
    excludes 0 (its side gives the direction); else 'no detectable difference'. A NaN
    ``p_mrmc_holm`` (one seed: no training variance to estimate) is not required.

    Each guards against its own mistake. The Wilcoxon test, free of any distribution, treats
    the images as the only source of variation, so with many images it calls a gap that one
    unlucky training run could reverse significant; the seeds × images test counts the runs as
    the random draws they are, but assumes normal errors; the interval keeps a verdict from
    contradicting the interval printed beside it."""
    seeds_agree = math.isnan(p_mrmc_holm) or p_mrmc_holm < alpha
    if p_holm < alpha and seeds_agree and (low > 0 or high < 0):
        return "better" if low > 0 else "worse"
    return "no detectable difference"


def compare_with_reference(reference: str, scores: Mapping[str, Mapping[str, Scores]],
                           bootstrap: Bootstrap, test_metric: str = "dice",
                           alpha: float = ALPHA) -> dict[str, dict[str, float | str]]:
    """Every group but ``reference`` against it, on the seeds both have.

    ``scores``: {metric: {group: Scores}}. Per group: for each metric ``delta_<metric>`` (mean
    paired difference group − reference) with its bootstrap interval ``delta_<metric>_lo``,
    ``delta_<metric>_hi``; on ``test_metric``, ``p_wilcoxon`` (two-sided, per-image differences
    averaged over the shared seeds), ``p_mrmc`` (:func:`mrmc_p`), each Holm-adjusted over these
    comparisons (``p_holm``, ``p_mrmc_holm``), and ``verdict`` (:func:`verdict`)."""
    groups = [g for g in scores[test_metric] if g != reference]
    result: dict[str, dict[str, float | str]] = {g: {} for g in groups}
    for metric, by_group in scores.items():
        for group in groups:
            diff = paired_difference(by_group[group], by_group[reference])
            lo, hi = bootstrap.interval(diff, alpha)
            result[group].update({f"delta_{metric}": diff.mean(), f"delta_{metric}_lo": lo,
                                  f"delta_{metric}_hi": hi})
            if metric == test_metric:
                result[group].update(p_wilcoxon=wilcoxon_p(diff.values.mean(axis=0)),
                                     p_mrmc=mrmc_p(diff))
    for test, adjusted in (("p_wilcoxon", "p_holm"), ("p_mrmc", "p_mrmc_holm")):
        for group, p in zip(groups, holm([result[g][test] for g in groups])):
            result[group][adjusted] = p
    for group in groups:
        row = result[group]
        row["verdict"] = verdict(row[f"delta_{test_metric}_lo"], row[f"delta_{test_metric}_hi"],
                                 row["p_holm"], row["p_mrmc_holm"], alpha)
    return result


def choose_reference(val_dice: Mapping[str, Mapping[int, float]],
                     baseline: str | None = None) -> str | None:
    """The reference of an experiment from ``val_dice`` ({group: {seed: validation Dice}}):
    the group with the highest mean, unless ``baseline`` (the experiment's default group) is
    within one standard error of it — the mean paired difference best − baseline over the
    seeds both have is at most its standard error (at least 2 shared seeds). None when no
    group has a validation Dice.

    The one-standard-error rule of model selection (Breiman et al. 1984; Hastie, Tibshirani &
    Friedman 2009, §7.10): a best-by-validation pick among groups closer than their noise is
    a coin flip, and every comparison of the experiment is made against it."""
    known = {g: {s: x for s, x in by_seed.items() if not math.isnan(x)}
             for g, by_seed in val_dice.items()}
    means = {g: float(np.mean(list(by_seed.values()))) for g, by_seed in known.items() if by_seed}
    if not means:
        return None
    best = max(means, key=means.get)
    if baseline not in means or baseline == best:
        return best
    shared = sorted(set(known[best]) & set(known[baseline]))
    if len(shared) < 2:
        return best
    gain = np.array([known[best][s] - known[baseline][s] for s in shared])
    return baseline if gain.mean() <= gain.std(ddof=1) / math.sqrt(len(gain)) else best


def significance(groups: Sequence[Scores]) -> np.ndarray:
    """challengeR's significance map with the verdicts' two tests: ``p[i, j]`` is the larger
    of two Holm-adjusted p-values (each over all ordered pairs) that group i is better than
    group j — the one-sided Wilcoxon signed-rank test on the per-image differences i − j
    averaged over their shared seeds, and the one-sided seeds × images test (:func:`mrmc_p`;
    left out with one shared seed) — so ``p[i, j] < α`` where both reject; the diagonal is
    NaN."""
    n = len(groups)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    differences = [paired_difference(groups[i], groups[j]) for i, j in pairs]
    wilcoxon = holm([wilcoxon_p(d.values.mean(axis=0), "greater") for d in differences])
    seeds_images = holm([mrmc_p(d, "greater") for d in differences])
    matrix = np.full((n, n), np.nan)
    for (i, j), p in zip(pairs, np.fmax(wilcoxon, seeds_images)):
        matrix[i, j] = p
    return matrix


def rank_interval(ranks: np.ndarray, alpha: float = ALPHA) -> tuple[np.ndarray, np.ndarray]:
    """Per column of bootstrap ``ranks`` (n_resamples, groups): the α/2 and 1 − α/2 quantiles,
    each an observed rank (the smallest rank whose cumulative frequency reaches the level)."""
    lo, hi = np.quantile(ranks, [alpha / 2, 1 - alpha / 2], axis=0, method="inverted_cdf")
    return lo.astype(int), hi.astype(int)


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width t_{0.975, n−1} · s / √n of the Student t 95 % interval of
    ``values`` (s the sample standard deviation); the half-width is NaN when n = 1."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("no values")
    if x.size == 1:
        return float(x[0]), math.nan
    t = scipy.stats.t.ppf(0.975, x.size - 1)
    return float(x.mean()), float(t * x.std(ddof=1) / math.sqrt(x.size))
