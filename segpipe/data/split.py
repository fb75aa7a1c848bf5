"""How the images of a training folder are divided: groups, cross-validation folds and the
validation split. Pure functions of the names and seeds; :mod:`segpipe.data.cache` stores
their result in the cache, so a split never changes while its inputs do not.

A *group* is a set of images that must stay on one side of every boundary — the augmented
copies ``IMG_12.rf.<hash>`` of one photo, the frames of one video, identical images — so that
no near-duplicate of a test or validation image is trained on (:mod:`segpipe.data.groups`).
Groups are numbered in order of first appearance.

* Fixed test folder: :func:`split_validation` draws whole groups into the validation split.
* Cross-validation (``data.folds: k``): :func:`assign_folds` puts every group into one of k
  folds; inside fold f, :func:`cv_split` tests on fold f, selects the model on fold
  (f + 1) mod k and trains on the other k − 2 folds, so each image is tested exactly once and
  the held-out fold is never used for selection.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from segpipe import SegpipeError
from segpipe.data.groups import check_group_count


def group_ids(keys: Sequence[str]) -> np.ndarray:
    """Group number (N,) of each image, groups numbered in order of first appearance."""
    numbers: dict[str, int] = {}
    return np.array([numbers.setdefault(key, len(numbers)) for key in keys], dtype=np.int64)


def group_count(groups: np.ndarray) -> int:
    """How many groups the ids of :func:`group_ids` (0, 1, …) name; 0 without images."""
    return int(groups.max()) + 1 if len(groups) else 0


def split_validation(groups: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean (N,) marking the validation images of the fixed test-folder mode.

    The target is ``round(val_fraction·N)`` images, at least 1 and at most N − 1 when
    ``val_fraction > 0``. Whole groups are taken in the order of
    ``np.random.default_rng(seed).permutation(n_groups)`` while validation holds fewer images
    than the target; the last group of that order is never taken, so training keeps one. With
    one image per group this is the first ``round(val_fraction·N)`` images of the permutation.
    """
    count, n_groups = len(groups), group_count(groups)
    n_val = round(val_fraction * count)
    check_group_count(n_groups, val_fraction=val_fraction)
    if val_fraction > 0:
        n_val = min(max(n_val, 1), count - 1)
    sizes = np.bincount(groups, minlength=n_groups)
    taken, chosen = 0, []
    for group in np.random.default_rng(seed).permutation(n_groups)[:-1]:
        if taken >= n_val:
            break
        chosen.append(group)
        taken += sizes[group]
    return np.isin(groups, chosen)


def assign_folds(groups: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold (N,) in 0..folds − 1 of each image, the same for all images of a group.

    The groups are shuffled by ``np.random.default_rng(seed)``, ordered by size, largest first
    (a stable sort: equal sizes keep the shuffled order), and each is put in turn into the fold
    holding the fewest images so far (the lowest such fold on ties). So the folds differ in
    size by at most the largest group, by at most one image without groups."""
    n_groups = group_count(groups)
    check_group_count(n_groups, folds)
    sizes = np.bincount(groups, minlength=n_groups)
    order = np.random.default_rng(seed).permutation(n_groups)
    order = order[np.argsort(-sizes[order], kind="stable")]
    fold_of_group, filled = np.empty(n_groups, dtype=np.int64), np.zeros(folds, dtype=np.int64)
    for group in order:
        fold = int(np.argmin(filled))
        fold_of_group[group] = fold
        filled[fold] += sizes[group]
    return fold_of_group[groups]


def cv_split(fold_of: np.ndarray, fold: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows (training, validation, test) inside ``fold`` of a k-fold assignment ``fold_of``:
    test = fold ``fold``, validation = fold (fold + 1) mod k, training = the other folds."""
    folds = int(fold_of.max()) + 1
    if not 0 <= fold < folds:
        raise SegpipeError(f"fold {fold}: expected 0..{folds - 1} ({folds} folds)")
    test, val = fold_of == fold, fold_of == (fold + 1) % folds
    return np.flatnonzero(~(test | val)), np.flatnonzero(val), np.flatnonzero(test)
