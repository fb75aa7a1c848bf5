"""Where an image's pixels are while segpipe works on them: the *working resolution*.

A study fixes it once (``data.size`` or ``data.scale``), rasterise records it in the cache,
training copies it into the checkpoint, and evaluation and prediction use it again, as nnU-Net
records each case's geometry at preprocessing and uses it at export (Isensee et al. 2021):

- ``size`` [H, W]: every image squashed to one size (aspect ratio lost); the model sees the
  whole image at once;
- ``scale`` s: every image at s times its own size, aspect kept (1: the photo's own pixels);
  the model sees patches in training and sliding windows at inference.

Images go to the working resolution by area interpolation (:func:`to_working`); probabilities
come back to the original size bilinearly (:func:`to_original`). Masks are not resized: they
are drawn at each resolution from the polygons (:func:`segpipe.data.labelme.rasterise`).
Torch-free: the workflow's start checks import it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from segpipe import SegpipeError


@dataclass(frozen=True)
class Geometry:
    """The working resolution of a study: ``size`` (H, W) or ``scale`` (exactly one)."""

    size: tuple[int, int] | None = None
    scale: float | None = None

    def __post_init__(self) -> None:
        if (self.size is None) == (self.scale is None):
            raise SegpipeError("a geometry has either a size or a scale")
        if self.scale is not None and not 0 < self.scale <= 1:
            raise SegpipeError(f"scale must be in (0, 1], got {self.scale}")

    @property
    def native(self) -> bool:
        """Whether images keep their aspect (``scale``): trained on patches, predicted by
        sliding windows."""
        return self.scale is not None

    def working_size(self, original: Sequence[int]) -> tuple[int, int]:
        """(h, w) of an image of ``original`` size (H, W) at the working resolution."""
        if self.size is not None:
            return int(self.size[0]), int(self.size[1])
        return tuple(max(1, round(side * self.scale)) for side in original)

    def attrs(self) -> dict:
        """The cache attributes and checkpoint keys that record it."""
        return {"size": list(self.size)} if self.size is not None else {"scale": self.scale}

    @classmethod
    def from_attrs(cls, attrs) -> Geometry:
        """The geometry :meth:`attrs` recorded (a cache's attributes)."""
        if "scale" in attrs:
            return cls(scale=float(attrs["scale"]))
        return cls(size=tuple(int(v) for v in attrs["size"]))

    def describe(self) -> str:
        return ("x".join(map(str, self.size)) if self.size is not None
                else f"scale {self.scale:g} of each image's own size")


def to_working(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """An image (H, W, 3) uint8 at ``size`` (h, w), by area interpolation; itself at its own
    size."""
    if tuple(image.shape[:2]) == tuple(size):
        return image
    return cv2.resize(image, (int(size[1]), int(size[0])), interpolation=cv2.INTER_AREA)


def to_original(probs: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Probabilities (C, h, w) float32 resized bilinearly to (C, H, W) = ``size``; themselves
    at their own size."""
    if tuple(probs.shape[1:]) == tuple(size):
        return probs
    return np.stack([cv2.resize(p, (int(size[1]), int(size[0])), interpolation=cv2.INTER_LINEAR)
                     for p in probs])
