"""Training augmentation on numpy images, named in config by its definition.

Keys of a definition (all optional; ``{}`` is no augmentation):

    crop:   {min_scale: s}  mask-aware random crop, side fraction in [s, 1] (s in (0, 1],
                            default 0.5), resized back to the training size
    hflip:  p               horizontal flip with probability p
    vflip:  p               vertical flip with probability p
    rotate: d               rotation by an angle uniform in [-d, d] degrees (0 <= d <= 180)
    jitter: j               brightness, contrast and saturation factors uniform in
                            [1 - j, 1 + j] (0 <= j <= 1), image only
    erase:  p               random erasing with probability p, image only

They apply in this order. Geometric operations (crop, flips, rotation) move image and mask
together: the image is interpolated bilinearly, the mask by nearest neighbour so it stays in
{0, 1}; rotation reflects the border (OpenCV ``BORDER_REFLECT_101``) in both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from segpipe.spec import check_definition

_ERASE_AREA = (0.02, 0.33)
_ERASE_ASPECT = (0.3, 1 / 0.3)


@dataclass(frozen=True)
class Augmentation:
    """A random transform ``(image uint8 (H, W, 3), mask uint8 (H, W), rng) -> (image,
    mask)`` of the same shapes and dtypes; all randomness comes from ``rng``. A class rather
    than a closure so that it pickles into DataLoader workers."""

    size: tuple[int, int]
    crop_min_scale: float | None = None  # None: no crop
    hflip: float = 0.0
    vflip: float = 0.0
    rotate: float = 0.0
    jitter: float = 0.0
    erase: float = 0.0

    def __call__(
        self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        if image.shape[:2] != self.size or mask.shape != self.size:
            raise ValueError(f"augmentation for size {self.size} got image {image.shape} "
                             f"and mask {mask.shape}")
        if self.crop_min_scale is not None:
            image, mask = self._crop(image, mask, rng)
        if rng.random() < self.hflip:
            image, mask = cv2.flip(image, 1), cv2.flip(mask, 1)
        if rng.random() < self.vflip:
            image, mask = cv2.flip(image, 0), cv2.flip(mask, 0)
        if self.rotate > 0:
            image, mask = self._rotate(image, mask, rng.uniform(-self.rotate, self.rotate))
        if self.jitter > 0:
            image = self._jitter(image, rng)
        if rng.random() < self.erase:
            image = self._erase(image, rng)
        return image, mask

    def _crop(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator):
        """A crop of side fraction s ~ U(crop_min_scale, 1) that contains the bounding box of the
        foreground along each axis where it fits, else is centred on it; a random crop when
        the mask is empty. Resized back to ``size``."""
        height, width = self.size
        scale = rng.uniform(self.crop_min_scale, 1.0)
        crop_h, crop_w = max(1, round(scale * height)), max(1, round(scale * width))
        top = _crop_start(np.flatnonzero(mask.any(1)), height, crop_h, rng)
        left = _crop_start(np.flatnonzero(mask.any(0)), width, crop_w, rng)
        image = image[top:top + crop_h, left:left + crop_w]
        mask = mask[top:top + crop_h, left:left + crop_w]
        return (cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR),
                cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST))

    def _rotate(self, image: np.ndarray, mask: np.ndarray, degrees: float):
        height, width = self.size
        matrix = cv2.getRotationMatrix2D(((width - 1) / 2, (height - 1) / 2), degrees, 1.0)

        def warp(array: np.ndarray, interpolation: int) -> np.ndarray:
            return cv2.warpAffine(array, matrix, (width, height), flags=interpolation,
                                  borderMode=cv2.BORDER_REFLECT_101)

        return warp(image, cv2.INTER_LINEAR), warp(mask, cv2.INTER_NEAREST)

    def _jitter(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Brightness ``x·b``, then contrast ``(x − mean grey)·c + mean grey``, then
        saturation ``grey + (x − grey)·s``, factors uniform in [1 − j, 1 + j]."""
        brightness, contrast, saturation = rng.uniform(1 - self.jitter, 1 + self.jitter, 3)
        x = image.astype(np.float32) * brightness
        mean_grey = _grey(x).mean()
        x = (x - mean_grey) * contrast + mean_grey
        grey = _grey(x)[..., None]
        x = grey + (x - grey) * saturation
        return np.clip(np.rint(x), 0, 255).astype(np.uint8)

    def _erase(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Random erasing (Zhong et al. 2020, arXiv:1708.04896): a rectangle of area
        fraction U(0.02, 0.33) and log-uniform aspect ratio in [0.3, 1/0.3], filled with
        uniform noise."""
        height, width = self.size
        area = rng.uniform(*_ERASE_AREA) * height * width
        aspect = math.exp(rng.uniform(*np.log(_ERASE_ASPECT)))
        h = min(height, max(1, round(math.sqrt(area * aspect))))
        w = min(width, max(1, round(math.sqrt(area / aspect))))
        top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
        image = image.copy()
        image[top:top + h, left:left + w] = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        return image


def _crop_start(foreground: np.ndarray, length: int, crop: int, rng: np.random.Generator) -> int:
    """Start of a crop of ``crop`` pixels along an axis of ``length`` pixels whose foreground
    indices are ``foreground``."""
    if foreground.size == 0:
        return int(rng.integers(0, length - crop + 1))
    first, last = int(foreground[0]), int(foreground[-1])
    if last - first + 1 <= crop:
        return int(rng.integers(max(0, last - crop + 1), min(first, length - crop) + 1))
    centre = (first + last + 1) / 2
    return int(np.clip(round(centre - crop / 2), 0, length - crop))


def _grey(image: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of an RGB float image."""
    return image @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def build_augmentation(definition: dict, size: tuple[int, int]) -> Augmentation | None:
    """The transform of a config definition (keys in the module docstring) for images of
    ``size`` (H, W), or ``None`` when it enables nothing (``{}``, "plain"). The definition is
    checked against the config schema's ``$defs.augmentation`` (:mod:`segpipe.spec`): an
    unknown key or a value out of range raises :class:`~segpipe.SegpipeError` naming it."""
    check_definition("augmentation", definition)
    crop = definition.get("crop")
    params = {key: float(value) for key, value in definition.items() if key != "crop"}
    if crop is None and not any(params.values()):
        return None
    return Augmentation(size=tuple(size), **params,
                        crop_min_scale=None if crop is None else float(crop.get("min_scale", 0.5)))
