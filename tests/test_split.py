"""Groups, folds and the validation split: deterministic, balanced, and no group crosses a
boundary; without groups the validation split is the one segpipe always drew."""

from __future__ import annotations

import numpy as np
import pytest

from segpipe import SegpipeError
from segpipe.data.groups import check_group_count, group_keys, merge_identical
from segpipe.data.split import assign_folds, cv_split, group_ids, split_validation

# Augmented copies of photos, named as Roboflow exports them; a photo without copies.
NAMES = ["IMG_1.rf.a1", "IMG_1.rf.b2", "IMG_10.rf.c3", "IMG_2.rf.d4", "IMG_2.rf.e5",
         "IMG_2.rf.f6", "IMG_3", "IMG_4.rf.g7"]
PATTERN = r"^(.*)\.rf\."


def test_group_keys_capture_group_whole_match_and_unmatched_names():
    assert group_keys(NAMES, PATTERN) == ["IMG_1", "IMG_1", "IMG_10", "IMG_2", "IMG_2", "IMG_2",
                                          "IMG_3", "IMG_4"]  # IMG_3 is not matched: its own
    assert group_keys(["a_01", "a_02", "b_01"], r"^[a-z]+") == ["a", "a", "b"]  # no group: match
    # a group that takes no part in the match leaves the name on its own
    assert group_keys(["x-1", "y"], r"^(x)-|^y") == ["x", "y"]
    assert group_keys(["b", "a"], None) == ["b", "a"]


def test_group_keys_errors_name_the_setting():
    with pytest.raises(SegpipeError, match=r"data.group = '\(IMG': not a regular expression"):
        group_keys(NAMES, "(IMG")
    with pytest.raises(SegpipeError, match=r"data.group = 'frame_': matches none of the 8 names"):
        group_keys(NAMES, "frame_")


def test_identical_images_join_their_groups_transitively():
    keys = ["v1", "v1", "v2", "v2", "x", "y", "z"]
    same = [[1, 4], [3, 5]]  # x is a frame of v1, y one of v2
    assert merge_identical(keys, same) == ["v1"] * 2 + ["v2"] * 2 + ["v1", "v2", "z"]
    keys = ["v1", "v1", "v2", "v2", "w", "w"]
    same = [[1, 4], [2, 5]]  # w holds a frame of v1 and one of v2
    assert merge_identical(keys, same) == ["v1"] * 6


def test_group_count_needed_by_folds_and_the_validation_split():
    check_group_count(3, folds=3)
    check_group_count(2, val_fraction=0.5)
    check_group_count(1, val_fraction=0.0)
    with pytest.raises(SegpipeError, match="^13 folds need at least 13 groups, got 12$"):
        check_group_count(12, folds=13)
    with pytest.raises(SegpipeError, match="validation split needs at least 2 groups"):
        check_group_count(1, val_fraction=0.2)


def test_groups_are_numbered_in_order_of_first_appearance():
    np.testing.assert_array_equal(group_ids(["b", "a", "b", "c", "a"]), [0, 1, 0, 2, 1])


@pytest.mark.parametrize(("count", "fraction", "seed"), [(10, 0.2, 0), (7, 0.34, 3), (5, 0.99, 1)])
def test_without_groups_the_validation_split_is_unchanged(count, fraction, seed):
    """One image per group: the first round(fraction·count) images of the seeded permutation,
    as segpipe drew the split before groups existed (so old caches stay valid)."""
    n_val = min(max(round(fraction * count), 1), count - 1)
    expected = np.zeros(count, bool)
    expected[np.random.default_rng(seed).permutation(count)[:n_val]] = True
    np.testing.assert_array_equal(split_validation(np.arange(count), fraction, seed), expected)


def test_validation_split_counts_and_seed():
    singletons = np.arange(10)
    assert split_validation(singletons, 0.2, 0).sum() == 2
    assert split_validation(singletons, 0.01, 0).sum() == 1  # at least one validation image
    assert split_validation(singletons, 0.99, 0).sum() == 9  # at least one training image
    assert split_validation(singletons, 0.0, 0).sum() == 0
    np.testing.assert_array_equal(split_validation(singletons, 0.5, 7),
                                  split_validation(singletons, 0.5, 7))
    assert not np.array_equal(split_validation(singletons, 0.5, 7),
                              split_validation(singletons, 0.5, 8))
    with pytest.raises(SegpipeError, match="at least 2 groups of images, got 1"):
        split_validation(np.zeros(5, np.int64), 0.2, 0)


@pytest.mark.parametrize("seed", range(20))
def test_validation_takes_whole_groups_and_leaves_training_one(seed):
    rng = np.random.default_rng(100 + seed)
    groups = np.repeat(np.arange(8), rng.integers(1, 6, 8))
    is_val = split_validation(groups, 0.3, seed)
    for group in range(8):
        assert len(set(is_val[groups == group])) == 1  # a group is on one side
    target = round(0.3 * len(groups))
    assert is_val.sum() >= target and (~is_val).any()
    # two groups and a target of 3 images: one group, whichever is drawn, never both
    assert 0 < split_validation(np.array([0, 1, 1, 1]), 0.9, seed).sum() < 4


def test_folds_of_a_hand_computed_case():
    """Group 0 (3 images) is placed first, into fold 0; the three single images fill folds 1
    and 2, and the last one goes to fold 1, the lowest of the two with the fewest images."""
    groups = np.array([1, 0, 2, 0, 3, 0])
    for seed in range(5):
        folds = assign_folds(groups, 3, seed)
        assert list(folds[groups == 0]) == [0, 0, 0]
        assert list(np.bincount(folds)) == [3, 2, 1]


@pytest.mark.parametrize("seed", range(20))
def test_folds_are_deterministic_balanced_and_keep_groups_together(seed):
    rng = np.random.default_rng(seed)
    groups = rng.permutation(np.repeat(np.arange(15), rng.integers(1, 5, 15)))
    folds = assign_folds(groups, 5, seed)
    np.testing.assert_array_equal(folds, assign_folds(groups, 5, seed))
    for group in range(15):
        assert len(set(folds[groups == group])) == 1
    sizes = np.bincount(folds, minlength=5)
    assert sizes.min() >= 1 and sizes.max() - sizes.min() <= np.bincount(groups).max()
    singles = assign_folds(np.arange(23), 5, seed)  # without groups: sizes 5, 5, 5, 4, 4
    assert sorted(np.bincount(singles)) == [4, 4, 5, 5, 5]


def test_the_seed_changes_the_folds():
    groups = np.arange(30)
    assert not np.array_equal(assign_folds(groups, 3, 0), assign_folds(groups, 3, 1))


def test_fold_errors():
    with pytest.raises(SegpipeError, match="folds = 2: expected at least 3"):
        assign_folds(np.arange(10), 2, 0)
    with pytest.raises(SegpipeError, match="5 folds need at least 5 groups, got 4"):
        assign_folds(np.array([0, 0, 1, 2, 3]), 5, 0)


def test_inside_a_fold_its_images_test_and_the_next_fold_validates():
    fold_of = assign_folds(np.arange(11), 4, 0)
    tested, validated = np.zeros(11, int), np.zeros(11, int)
    for fold in range(4):
        train, val, test = cv_split(fold_of, fold)
        assert sorted([*train, *val, *test]) == list(range(11))
        assert set(fold_of[test]) == {fold} and set(fold_of[val]) == {(fold + 1) % 4}
        assert set(fold_of[train]) == set(range(4)) - {fold, (fold + 1) % 4}
        tested[test] += 1
        validated[val] += 1
    assert (tested == 1).all() and (validated == 1).all()  # every image once in each role
    with pytest.raises(SegpipeError, match=r"fold 4: expected 0..3 \(4 folds\)"):
        cv_split(fold_of, 4)
