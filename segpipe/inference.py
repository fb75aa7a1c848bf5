"""One way an image goes through models: class probabilities at the image's own size.

:class:`Predictor`: models (an ensemble), optional mirrors (test-time augmentation) and the
working resolution their checkpoints record (:mod:`segpipe.data.geometry`): a squashed
study's models see the whole image resized to their size, a native study's see tiles by
sliding windows. Training's validation, evaluation and prediction all call it;
:func:`segpipe.data.geometry.to_original` brings the probabilities to the image's own size.

Sliding windows: :func:`sliding_window` predicts an image of any size tile by tile at the
origins of :func:`window_starts` and blends the tiles with the Gaussian importance map of
:func:`gaussian_importance` — the scan, weights and padding of MONAI's
``sliding_window_inference(mode="gaussian")`` (tests/test_inference.py checks they agree),
accumulated tile batch by tile batch so that memory stays bounded on large photos.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segpipe import SegpipeError
from segpipe.checkpoint import checkpoint_geometry, checkpoint_labels, load_checkpoint
from segpipe.data.geometry import Geometry, to_working
from segpipe.labels import Labels
from segpipe.runtime import forward_logits, probabilities
from segpipe.spec import default

MIN_IMPORTANCE = 1e-3
"""Floor of the Gaussian importance map (MONAI's), so that no pixel's weight is ~0."""


def _is_positive_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0


def _check_tile(tile: Sequence[int]) -> tuple[int, int]:
    if not isinstance(tile, Sequence) or len(tile) != 2 or not all(map(_is_positive_int, tile)):
        raise SegpipeError(f"tile must be two positive integers (height, width), got {tile!r}")
    return int(tile[0]), int(tile[1])


def _check_overlap(overlap: float) -> float:
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) \
            or not 0 <= overlap < 1:
        raise SegpipeError(f"overlap must be a number in [0, 1), got {overlap!r}")
    return float(overlap)


def gaussian_importance(tile: tuple[int, int], sigma_scale: float = 0.125) -> Tensor:
    """The weight of each pixel of a (th, tw) tile in a blend, float32: the product of one
    Gaussian per axis centred on the tile, σ = ``sigma_scale`` × that side (⅛: nnU-Net, Isensee
    et al. 2021, Nat. Methods 18:203), not normalised, floored at max(its minimum,
    :data:`MIN_IMPORTANCE`). The values of MONAI's ``compute_importance_map(tile,
    mode="gaussian", sigma_scale=sigma_scale)``."""
    tile = _check_tile(tile)
    if isinstance(sigma_scale, bool) or not isinstance(sigma_scale, (int, float)) \
            or not sigma_scale > 0:
        raise SegpipeError(f"sigma_scale must be a positive number, got {sigma_scale!r}")
    rows, cols = (torch.exp(torch.arange(-(side - 1) / 2.0, (side - 1) / 2.0 + 1) ** 2
                            / (-2 * (side * sigma_scale) ** 2)) for side in tile)
    importance = rows[:, None] * cols[None, :]
    return importance.clamp_(min=max(importance.min().item(), MIN_IMPORTANCE))


def window_starts(length: int, tile: int, overlap: float) -> list[int]:
    """The origins of the tiles along an axis of ``length`` >= ``tile`` pixels: every ``step``
    = ⌊tile·(1 − overlap)⌋ (at least 1) pixels from 0, the last moved back to end at the
    edge; one tile when it fits exactly. MONAI's scan (``_get_scan_interval`` and
    ``dense_patch_slices``)."""
    if not _is_positive_int(tile):
        raise SegpipeError(f"window_starts: tile must be a positive integer, got {tile!r}")
    overlap = _check_overlap(overlap)
    if not isinstance(length, numbers.Integral) or length < tile:
        raise SegpipeError(f"window_starts: length {length!r} must be an integer >= the tile "
                           f"{tile} (pad smaller images first)")
    if length == tile:
        return [0]
    length, tile, step = int(length), int(tile), max(int(tile * (1 - overlap)), 1)
    count = -(-(length - tile) // step) + 1  # the first tile reaching the end is the last
    return [min(i * step, length - tile) for i in range(count)]


@torch.no_grad()
def sliding_window(predict: Callable[[Tensor], Tensor], image: Tensor, tile: tuple[int, int],
                   overlap: float = 0.5, sigma_scale: float = 0.125,
                   batch_size: int = 4) -> Tensor:
    """Class probabilities (C, h, w), float32 on the CPU, of a uint8 image (3, h, w) of any
    size, predicted by overlapping tiles.

    ``predict`` maps a uint8 batch (n, 3, th, tw) of tiles to probabilities (n, C, th, tw) on
    any device; it sees at most ``batch_size`` tiles at a time, at the origins
    :func:`window_starts` gives along each axis (row by row). Each output pixel is the average
    of the tiles covering it weighted by :func:`gaussian_importance` (σ = ``sigma_scale`` ×
    tile), so tile borders, where a model sees the least context, count least. An axis shorter
    than the tile is first padded with black (0) on both sides (the extra pixel after) and the
    result cropped back. Equal to MONAI's ``sliding_window_inference(image, tile, batch_size,
    predict, overlap, mode="gaussian", sigma_scale=sigma_scale, padding_mode="constant",
    cval=0)`` on the image as float.

    Probabilities are blended, not logits: an ensemble's members and mirrored predictions are
    averaged as probabilities too, so tiles, mirrors and members make one weighted linear average
    whose order does not matter — members averaged inside ``predict`` or over whole images give
    the same probabilities. Mirror inside ``predict``, tile by tile (nnU-Net's way): a mirrored
    image is cut into other tiles unless its tile grid is symmetric.

    Memory: the image, one (C, h, w) sum, one (h, w) weight map (computed once, before any
    tile) and one batch of tiles; the sum is divided in place and returned. Runs under
    ``torch.no_grad`` (``predict`` too), so no autograd graph builds up across tiles.
    """
    tile = _check_tile(tile)
    overlap = _check_overlap(overlap)
    if not _is_positive_int(batch_size):
        raise SegpipeError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(image, Tensor) or image.dtype != torch.uint8 or image.dim() != 3:
        raise SegpipeError("sliding_window: the image must be a uint8 tensor (3, h, w), got "
                           + (f"{image.dtype} {tuple(image.shape)}" if isinstance(image, Tensor)
                              else type(image).__name__))
    importance = gaussian_importance(tile, sigma_scale)
    size = image.shape[1:]
    pads = [max(t - s, 0) for s, t in zip(size, tile)]
    if any(pads):  # F.pad's order: last axis first, (before, after)
        image = F.pad(image, (pads[1] // 2, pads[1] - pads[1] // 2,
                              pads[0] // 2, pads[0] - pads[0] // 2))
    (th, tw), (height, width) = tile, image.shape[1:]
    origins = [(y, x) for y in window_starts(height, th, overlap)
               for x in window_starts(width, tw, overlap)]
    weight = torch.zeros(height, width)
    for y, x in origins:
        weight[y:y + th, x:x + tw] += importance
    total = None
    for first in range(0, len(origins), batch_size):
        batch = origins[first:first + batch_size]
        probabilities = predict(torch.stack([image[:, y:y + th, x:x + tw] for y, x in batch]))
        shape = tuple(probabilities.shape) if isinstance(probabilities, Tensor) else None
        if not shape or len(shape) != 4 or shape[0] != len(batch) or shape[2:] != tile \
                or (total is not None and shape[1] != total.shape[0]):
            raise SegpipeError(f"sliding_window: predict must return probabilities (n, C, {th}, "
                               f"{tw}) for n tiles, the same C for every batch; got "
                               f"{shape or type(probabilities).__name__} for {len(batch)} tiles")
        if total is None:
            total = torch.zeros(shape[1], height, width)
            importance = importance.to(probabilities.device)
        weighted = (probabilities.float() * importance).cpu()
        for (y, x), part in zip(batch, weighted):
            total[:, y:y + th, x:x + tw] += part
    total /= weight
    if any(pads):
        (h, w), top, left = size, pads[0] // 2, pads[1] // 2
        total = total[:, top:top + h, left:left + w].contiguous()
    return total


# ----------------------------------------------------------------------------- models


FLIPS = ((), (-1,), (-2,), (-2, -1))
"""Mirrors (test-time augmentation): none, horizontal, vertical and both (dims of N, C, H, W)."""


@dataclass(frozen=True)
class Predictor:
    """Models that predict together (an ensemble of one or more: nnU-Net predicts with its
    five folds, Isensee et al. 2021), each optionally on mirrored images, at the working
    resolution of ``geometry`` (:mod:`segpipe.data.geometry`): a squashed study's models see the
    whole image at ``size``; a native study's see tiles of ``size`` by :func:`sliding_window`.
    Every member (model × mirror) gives probabilities, and their mean is the prediction;
    :func:`segpipe.data.geometry.to_original` brings it to the image's own size."""

    models: tuple[nn.Module, ...]
    labels: Labels
    geometry: Geometry
    size: tuple[int, int]
    """The model's input: the training size, or the tile (the training patch)."""
    mean: tuple[float, ...]
    std: tuple[float, ...]
    device: torch.device
    mirrors: bool = False
    overlap: float = 0.5
    sigma_scale: float = 0.125
    batch_size: int = 4
    autocast: torch.dtype | None = None

    @classmethod
    def load(cls, paths: Sequence[Path], device: torch.device, mirrors: bool = False
             ) -> Predictor:
        """The ensemble of the checkpoints ``paths`` (:mod:`segpipe.checkpoint`) on ``device``
        (:meth:`of`)."""
        if not paths:
            raise SegpipeError("no checkpoint given")
        loaded = [load_checkpoint(path, device) for path in paths]
        return cls.of([m for m, _ in loaded], [c for _, c in loaded], device, mirrors, paths)

    @classmethod
    def of(cls, models: Sequence[nn.Module], checkpoints: Sequence[dict], device: torch.device,
           mirrors: bool = False, paths: Sequence[Path] | None = None) -> Predictor:
        """The ensemble of ``models`` loaded from ``checkpoints`` (read from ``paths``), which
        must agree on what they predict from what (:func:`checkpoint_facts`); raises
        :class:`SegpipeError` naming two that differ."""
        facts = [checkpoint_facts(checkpoint) for checkpoint in checkpoints]
        names = paths or [f"checkpoint {i}" for i in range(len(facts))]
        for name, fact in zip(names, facts):
            for key, value in fact.items():
                if value != facts[0][key]:
                    show = (lambda v: v.describe()) if key in ("classes", "geometry") else str
                    raise SegpipeError(
                        f"{name} and {names[0]} differ in their {key}: {show(value)} and "
                        f"{show(facts[0][key])}; an ensemble averages its models' "
                        "probabilities, so they must predict the same classes from the same input")
        first = facts[0]
        return cls(tuple(models), first["classes"], first["geometry"], first["input size"],
                   first["normalisation mean"], first["normalisation std"], device, mirrors,
                   *first["sliding windows"])

    def working(self, image: np.ndarray) -> np.ndarray:
        """An image (H, W, 3) uint8 at the working resolution."""
        return to_working(image, self.geometry.working_size(image.shape[:2]))

    def logits(self, model: nn.Module, batch: Tensor) -> Tensor:
        """A model's logits for a uint8 batch (N, 3, h, w) (:func:`segpipe.runtime.forward_logits`)."""
        return forward_logits(model, batch, self.device, self.mean, self.std, self.autocast)

    @torch.no_grad()
    def members(self, images: Tensor) -> Iterator[Tensor]:
        """The probabilities (N, C, h, w) float32 on the CPU of each member (model × mirror) for
        a uint8 batch (N, 3, h, w) of images at the working resolution: of one model pass each
        when squashed, by :func:`sliding_window` image by image at a native scale."""
        for model in self.models:
            for dims in FLIPS if self.mirrors else FLIPS[:1]:
                def predict(batch: Tensor, model=model, dims=dims) -> Tensor:
                    batch = batch.flip(dims) if dims else batch
                    probs = probabilities(self.logits(model, batch)).float()
                    return probs.flip(dims) if dims else probs
                if not self.geometry.native:
                    yield predict(images).cpu()
                    continue
                yield torch.stack([sliding_window(predict, image, self.size, self.overlap,
                                                  self.sigma_scale, self.batch_size)
                                   for image in images])

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        """The ensemble's probabilities (N, C, h, w) float32 on the CPU: the mean of its
        members' (:meth:`members`)."""
        total, count = None, 0
        for probs in self.members(images):
            total = probs if total is None else total + probs
            count += 1
        return total if count == 1 else total / count


def checkpoint_facts(checkpoint: dict) -> dict:
    """What a checkpoint's model predicts from what: its classes, working resolution, input
    size, normalisation and sliding-window settings (overlap, σ scale, tiles per batch)."""
    train = {**{key: default(f"train.{key}") for key in ("tile_overlap", "tile_sigma",
                                                          "batch_size")},
             **checkpoint["spec"].get("train", {})}
    return {"classes": checkpoint_labels(checkpoint),
            "input size": tuple(checkpoint["size"]),
            "geometry": checkpoint_geometry(checkpoint),
            "normalisation mean": tuple(checkpoint["mean"]),
            "normalisation std": tuple(checkpoint["std"]),
            "sliding windows": (train["tile_overlap"], train["tile_sigma"], train["batch_size"])}


def image_batch(images: Sequence[np.ndarray]) -> Tensor:
    """uint8 images (h, w, 3) of one size as a batch (N, 3, h, w)."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
