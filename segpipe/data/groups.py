"""Which images of a folder belong together: the groups that no split may divide.

An image's group is its name's key under ``data.group`` (:func:`group_keys`), and the images
of one photo (however stored, :func:`segpipe.data.identity.same_photos`) share one group
whatever their names (:func:`merge_identical`): a photo saved twice must not be trained on and
tested.
:func:`check_group_count` says whether the groups suffice for the folds or the validation
split. Standard library only: the workflow's start checks use it before any job.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from segpipe import SegpipeError


def group_keys(names: Sequence[str], pattern: str | None) -> list[str]:
    """The group of each name: the first capture group of ``re.search(pattern, name)``, or the
    whole match when the pattern has no group. A name the pattern does not match (or whose
    group takes no part in the match) is its own group; so is every name without a pattern.

    Raises :class:`SegpipeError` naming ``data.group`` for an invalid pattern, or one that
    matches no name at all (a pattern that groups nothing is a mistake, not a choice)."""
    if pattern is None:
        return list(names)
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise SegpipeError(f"data.group = {pattern!r}: not a regular expression ({exc})") from None
    matches = [regex.search(name) for name in names]
    if names and not any(matches):
        raise SegpipeError(f"data.group = {pattern!r}: matches none of the {len(names)} names "
                           f"(e.g. {names[0]!r})")
    keys = [m.group(1 if regex.groups else 0) if m else None for m in matches]
    return [name if key is None else key for name, key in zip(names, keys)]


def merge_identical(keys: Sequence[str], same: Sequence[Sequence[int]]) -> list[str]:
    """``keys`` with the groups of the images of one photo joined (``same``: the positions of
    each photo's images): every image of a joined group takes the key, among the joined ones,
    that occurs first (joining is transitive)."""
    order = {key: i for i, key in reversed(list(enumerate(keys)))}
    parent = {key: key for key in keys}

    def root(key: str) -> str:
        while parent[key] != key:
            parent[key] = key = parent[parent[key]]
        return key

    for positions in same:
        for i in positions[1:]:
            a, b = root(keys[positions[0]]), root(keys[i])
            if a != b:
                first, second = sorted((a, b), key=order.__getitem__)
                parent[second] = first
    return [root(key) for key in keys]


def check_group_count(groups: int, folds: int | None = None, val_fraction: float = 0.0) -> None:
    """Raise :class:`SegpipeError` unless ``groups`` groups make ``folds`` folds (at least 3,
    one group each) or, without folds, a validation split of ``val_fraction`` > 0 (2 groups:
    one for validation, one for training)."""
    if folds is not None:
        if folds < 3:
            raise SegpipeError(f"folds = {folds}: expected at least 3 (a fold tests, the next "
                               "validates, the others train)")
        if groups < folds:
            raise SegpipeError(f"{folds} folds need at least {folds} groups, got {groups}")
    elif val_fraction > 0 and groups < 2:
        raise SegpipeError(f"a validation split needs at least 2 groups of images, got {groups}")
