"""Training datasets over a cache (:class:`segpipe.data.cache.Cache`): whole images when the
study squashes them to one size, random patches at a native scale."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from segpipe import SegpipeError
from segpipe.data.cache import Cache
from segpipe.data.geometry import Geometry
from segpipe.data.split import cv_split
from segpipe.labels import Labels

Transform = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]


class _CacheDataset(Dataset):
    """Items ``(image uint8 (3, h, w), mask uint8 (1, h, w))`` drawn from the cache rows
    ``indices``. ``transform(image_hwc, mask_hw, rng)`` receives an ``rng`` seeded from
    ``(seed, epoch, item)`` only, so augmentation depends neither on the worker count nor on
    resuming. Call :meth:`set_epoch` before each epoch: the epoch lives in shared memory, so
    DataLoader workers see it, persistent ones too. The cache is opened once per process."""

    def __init__(self, path: str | Path, indices: Sequence[int] | np.ndarray | None = None,
                 transform: Transform | None = None, seed: int = 0) -> None:
        self.cache = Cache(path)
        self.labels: Labels = self.cache.labels
        count = len(self.cache)
        self.indices = np.arange(count) if indices is None else np.asarray(indices, dtype=np.int64)
        if self.indices.size and not (0 <= self.indices.min() and self.indices.max() < count):
            raise SegpipeError(f"{self.cache.path}: indices out of range for {count} images")
        self.transform = transform
        self.seed = seed
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def _item(self, image: np.ndarray, mask: np.ndarray, key: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.transform is not None:
            rng = np.random.default_rng([self.seed, int(self._epoch), key])
            image, mask = self.transform(image, mask, rng)
        image = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        return image, torch.from_numpy(np.ascontiguousarray(mask)[None])


class SegmentationH5Dataset(_CacheDataset):
    """The whole images of the cache rows ``indices`` at the working resolution, one item per
    row; the transform's ``rng`` is seeded from ``(seed, epoch, row)``."""

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor]:
        row = int(self.indices[item])
        return self._item(self.cache.image(row), self.cache.mask(row), row)


class PatchDataset(_CacheDataset):
    """``length`` random patches of ``patch`` (h, w) pixels per epoch from the images of the
    cache rows ``indices`` at their native scale, as nnU-Net trains (Isensee et al. 2021,
    Nat. Methods 18:203): item k draws its image uniformly and, when its place in the batch
    is among the last ``round(oversample · batch_size)``, centres the patch on a random pixel
    of a random foreground class the image holds (:meth:`segpipe.data.cache.Cache.locations`;
    nnU-Net's foreground oversampling, there 33 %), else places it uniformly. A patch may reach
    past an image smaller than itself: those pixels are black and background. The transform
    (augmentation) applies to the patch; its ``rng`` is seeded from ``(seed, epoch, k)``."""

    def __init__(self, path: str | Path, indices: Sequence[int] | np.ndarray | None,
                 patch: Sequence[int], length: int, batch_size: int, oversample: float,
                 transform: Transform | None = None, seed: int = 0) -> None:
        super().__init__(path, indices, transform, seed)
        if not len(self.indices):
            raise SegpipeError(f"{self.cache.path}: no images to draw patches from")
        self.patch = (int(patch[0]), int(patch[1]))
        self.length, self.batch_size = int(length), int(batch_size)
        self.forced = round(oversample * batch_size)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, int(self._epoch), item, 1])
        row = int(self.indices[rng.integers(len(self.indices))])
        window = self.window(row, rng, item % self.batch_size >= self.batch_size - self.forced)
        return self._item(self.cache.image(row, window), self.cache.mask(row, window), item)

    def window(self, row: int, rng: np.random.Generator, foreground: bool
               ) -> tuple[int, int, int, int]:
        """(y0, x0, y1, x1) of a patch of image ``row``: centred on a pixel of a random class
        it holds when ``foreground`` (and it holds one), else uniform among the placements
        inside the image (centred, when the image is smaller along an axis)."""
        (height, width), (ph, pw) = self.cache.shape[row], self.patch
        locations = self.cache.locations(row) if foreground else np.zeros((0, 3))
        if len(locations):
            classes = np.unique(locations[:, 0])
            chosen = locations[locations[:, 0] == classes[rng.integers(len(classes))]]
            _, y, x = chosen[rng.integers(len(chosen))]
            y0 = int(np.clip(y - ph // 2, min(0, height - ph), max(0, height - ph)))
            x0 = int(np.clip(x - pw // 2, min(0, width - pw), max(0, width - pw)))
        else:
            y0 = int(rng.integers(height - ph + 1)) if height >= ph else (height - ph) // 2
            x0 = int(rng.integers(width - pw + 1)) if width >= pw else (width - pw) // 2
        return y0, x0, y0 + ph, x0 + pw


def cache_facts(path: str | Path) -> tuple[Geometry, Labels]:
    """The working resolution of a cache and its classes: what a run spec is checked
    against."""
    with Cache(path) as cache:
        return cache.geometry, cache.labels


def split_indices(path: str | Path, fold: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cache rows of the training, validation and test split: without ``fold`` from
    ``is_val`` (no test rows: the test images are another cache), inside ``fold`` of a
    cross-validation cache from ``fold`` (:func:`segpipe.data.split.cv_split`)."""
    path = Path(path)
    with Cache(path) as cache:
        split = cache.split("is_val" if fold is None else "fold")
        has_folds = cache.split("fold") is not None
    if split is None and fold is None:
        hint = " (a cross-validation cache: train one of its folds)" if has_folds else ""
        raise SegpipeError(f"{path}: no validation split 'is_val'{hint}")
    if split is None:  # fold given
        raise SegpipeError(f"{path}: no cross-validation folds 'fold' for fold {fold} "
                           "(rasterise with --folds)")
    if fold is None:
        return np.flatnonzero(~split), np.flatnonzero(split), np.empty(0, np.int64)
    try:
        return cv_split(split, fold)
    except SegpipeError as exc:
        raise SegpipeError(f"{path}: {exc}") from None
