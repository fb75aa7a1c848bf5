"""Tests read a cache's file as it is written (docs/formats.md, layout 2): :func:`open_stacked`
shows each per-image group (``images``, ``masks``, ``truth``, ``locations``) as one array of its
images stacked in row order (a list when their shapes differ), every other dataset as h5py has
it."""

from __future__ import annotations

import contextlib

import h5py
import numpy as np


class Stacked:
    def __init__(self, h5: h5py.File) -> None:
        self.h5, self.attrs = h5, h5.attrs

    def __contains__(self, key: str) -> bool:
        return key in self.h5

    def __iter__(self):
        return iter(self.h5)

    def __getitem__(self, key: str):
        item = self.h5[key]
        if not isinstance(item, h5py.Group):
            return item
        arrays = [item[name][()] for name in sorted(item)]
        return np.stack(arrays) if len({a.shape for a in arrays}) == 1 else arrays


@contextlib.contextmanager
def open_stacked(path):
    with h5py.File(path, "r") as h5:
        yield Stacked(h5)
