"""Training dataset over the HDF5 cache written by :mod:`segpipe.data.cache`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from segpipe import SegpipeError
from segpipe.data.split import cv_split
from segpipe.labels import Labels

Transform = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]


class SegmentationH5Dataset(Dataset):
    """Items ``(image uint8 (3, H, W), mask uint8 (1, H, W))`` of the cache rows ``indices``;
    ``labels``: the cache's classes (:class:`segpipe.labels.Labels`).

    The file is opened lazily, once per process (a DataLoader worker opens its own handle).
    ``transform(image_hwc, mask_hw, rng)`` receives ``rng = np.random.default_rng([seed,
    epoch, row])`` with ``row`` the cache row, so augmentation depends neither on the worker
    count nor on resuming. Call :meth:`set_epoch` before each epoch: the epoch lives in shared
    memory, so DataLoader workers see it, persistent ones too.
    """

    def __init__(
        self,
        path: str | Path,
        indices: Sequence[int] | np.ndarray | None = None,
        transform: Transform | None = None,
        seed: int = 0,
    ) -> None:
        self.path = Path(path)
        with _open_cache(self.path) as h5:
            count = len(h5["images"])
            self.labels = Labels.from_attrs(h5.attrs)
        self.indices = np.arange(count) if indices is None else np.asarray(indices, dtype=np.int64)
        if self.indices.size and not (0 <= self.indices.min() and self.indices.max() < count):
            raise SegpipeError(f"{self.path}: indices out of range for {count} images")
        self.transform = transform
        self.seed = seed
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._file: h5py.File | None = None
        self._pid: int | None = None

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._pid != os.getpid():
            self._file, self._pid = _open_cache(self.path), os.getpid()
        row = int(self.indices[item])
        image, mask = self._file["images"][row], self._file["masks"][row]
        if self.transform is not None:
            rng = np.random.default_rng([self.seed, int(self._epoch), row])
            image, mask = self.transform(image, mask, rng)
        image = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        return image, torch.from_numpy(np.ascontiguousarray(mask)[None])

    def __getstate__(self) -> dict:
        # An open h5py handle cannot be pickled (spawned workers): each process reopens.
        return {**self.__dict__, "_file": None, "_pid": None}


def cache_facts(path: str | Path) -> tuple[list[int], Labels]:
    """The image size [H, W] of a cache and its classes: what a run spec is checked against."""
    with _open_cache(Path(path)) as h5:
        return list(h5["images"].shape[1:3]), Labels.from_attrs(h5.attrs)


def split_indices(path: str | Path, fold: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cache rows of the training, validation and test split: without ``fold`` from
    ``is_val`` (no test rows: the test images are another cache), inside ``fold`` of a
    cross-validation cache from ``fold`` (:func:`segpipe.data.split.cv_split`)."""
    path = Path(path)
    key = "is_val" if fold is None else "fold"
    with _open_cache(path) as h5:
        if key not in h5 and fold is None:
            hint = " (a cross-validation cache: train one of its folds)" if "fold" in h5 else ""
            raise SegpipeError(f"{path}: no validation split 'is_val'{hint}")
        if key not in h5:  # fold given
            raise SegpipeError(f"{path}: no cross-validation folds 'fold' for fold {fold} "
                               "(rasterise with --folds)")
        split = h5[key][()]
    if fold is None:
        return np.flatnonzero(~split), np.flatnonzero(split), np.empty(0, np.int64)
    try:
        return cv_split(split, fold)
    except SegpipeError as exc:
        raise SegpipeError(f"{path}: {exc}") from None


def _open_cache(path: Path) -> h5py.File:
    try:
        h5 = h5py.File(path, "r")
    except (OSError, FileNotFoundError) as exc:
        raise SegpipeError(f"{path}: cannot open HDF5 cache ({exc})") from None
    missing = {"images", "masks"} - set(h5)
    if missing:
        h5.close()
        raise SegpipeError(f"{path}: not a segpipe cache (missing {sorted(missing)})")
    return h5
