"""Training augmentation of an image and its mask, named in config by its definition.

Keys of a definition (all optional; ``{}`` is no augmentation):

    crop:   {min_scale: s}  mask-aware random crop, side fraction in [s, 1] (s in (0, 1],
                            default 0.5), resized back to the training size
    hflip:  p               horizontal flip with probability p
    vflip:  p               vertical flip with probability p
    rotate: d               rotation about the centre by an angle uniform in [-d, d] degrees
                            (0 <= d <= 180)
    jitter: j               brightness, contrast and saturation factors uniform in
                            [1 - j, 1 + j] (0 <= j <= 1), in random order, image only
    erase:  p               random erasing with probability p, image only

They apply in this order. The crop is ours: no torchvision crop keeps the object in view. The
others are ``torchvision.transforms.v2``'s, on a ``tv_tensors.Image`` and a ``tv_tensors.Mask``,
so geometric operations move image and mask together: the image is interpolated bilinearly,
the mask by nearest neighbour so it keeps its class indices. Rotation fills the corners it uncovers,
and erasing its rectangle, with :data:`FILL`, the ImageNet mean colour (0 once normalised);
corners are background in the mask, and erasing leaves the mask as it is.

All randomness comes from the ``rng`` the dataset passes for the item (``seed, epoch, row``):
the crop draws from it, and torchvision, which draws from torch's CPU generator, runs in a
:func:`torch.random.fork_rng` that seeds that generator alone from it. So the result depends on
``rng`` only (not on the worker count, on resuming, or on other uses of torch's generators),
and no generator's state changes.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from segpipe.runtime import IMAGENET_MEAN
from segpipe.spec import default

FILL = tuple(round(255 * m) for m in IMAGENET_MEAN)
"""RGB of the pixels rotation uncovers and erasing covers: the ImageNet mean colour."""
ERASE_SCALE = (0.02, 0.33)
"""Area fraction of an erased rectangle (Zhong et al. 2020)."""
ERASE_RATIO = (0.3, 1 / 0.3)
"""Aspect ratio range of an erased rectangle, drawn log-uniformly (Zhong et al. 2020)."""


class Augmentation:
    """A random transform ``(image uint8 (H, W, 3), mask uint8 (H, W), rng) -> (image,
    mask)`` of the same shapes and dtypes (see the module docstring). It pickles into
    DataLoader workers."""

    def __init__(self, size: tuple[int, int], crop_min_scale: float | None = None,
                 hflip: float = 0.0, vflip: float = 0.0, rotate: float = 0.0,
                 jitter: float = 0.0, erase: float = 0.0) -> None:
        # torchvision is imported here, not at the top: a run without augmentation (plain)
        # is spared its import, about 1 s of every job's start-up.
        from torchvision import tv_tensors
        from torchvision.transforms import v2

        self.size = tuple(size)
        self.crop_min_scale = crop_min_scale  # None: no crop
        both = []  # transforms of image and mask
        if hflip:
            both.append(v2.RandomHorizontalFlip(hflip))
        if vflip:
            both.append(v2.RandomVerticalFlip(vflip))
        if rotate:
            both.append(v2.RandomRotation(rotate, v2.InterpolationMode.BILINEAR,
                                          fill={tv_tensors.Image: FILL, tv_tensors.Mask: 0}))
        if jitter:
            both.append(v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter))
        self.both = v2.Compose(both) if both else None
        # Random erasing of Zhong et al. (2020, "Random erasing data augmentation", AAAI,
        # arXiv:1708.04896), on the image alone.
        self.erase = v2.RandomErasing(erase, ERASE_SCALE, ERASE_RATIO, FILL) if erase else None

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray]:
        if image.shape[:2] != self.size or mask.shape != self.size:
            raise ValueError(f"augmentation for size {self.size} got image {image.shape} "
                             f"and mask {mask.shape}")
        if self.crop_min_scale is not None:
            image, mask = self._crop(image, mask, rng)
        if self.both is None and self.erase is None:
            return image, mask
        from torchvision import tv_tensors

        image = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))
        mask = tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(mask)))
        with torch.random.fork_rng(devices=[]):  # the CPU generator's state, restored after
            torch.default_generator.manual_seed(int(rng.integers(2**63)))
            if self.both is not None:
                image, mask = self.both(image, mask)
            if self.erase is not None:
                image = self.erase(image)
        return image.permute(1, 2, 0).numpy(), mask.numpy()  # a view: the dataset transposes

    def _crop(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator):
        """A crop of side fraction s ~ U(crop_min_scale, 1) that contains the bounding box of
        the foreground along each axis where it fits, else is centred on it; a random crop
        when the mask is empty. Resized back to ``size``: the image bilinearly, the mask by
        nearest neighbour with pixel centres mapped as for the image
        (``INTER_NEAREST_EXACT``; ``INTER_NEAREST`` would shift it by half a source pixel)."""
        height, width = self.size
        scale = rng.uniform(self.crop_min_scale, 1.0)
        crop_h, crop_w = max(1, round(scale * height)), max(1, round(scale * width))
        top = _crop_start(np.flatnonzero(mask.any(1)), height, crop_h, rng)
        left = _crop_start(np.flatnonzero(mask.any(0)), width, crop_w, rng)
        image = image[top:top + crop_h, left:left + crop_w]
        mask = mask[top:top + crop_h, left:left + crop_w]
        return (cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR),
                cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST_EXACT))


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




def build_augmentation(definition: dict, size: tuple[int, int]) -> Augmentation | None:
    """The transform of a config definition (keys in the module docstring) for images of
    ``size`` (H, W), or ``None`` when it enables nothing (``{}``, "plain"). The definition is
    trusted: the schema's ``$defs.augmentation`` checked it where it entered (:mod:`segpipe.spec`);
    an option it leaves out takes the schema's default."""
    crop = definition.get("crop")
    params = {key: float(value) for key, value in definition.items() if key != "crop"}
    if crop is None and not any(params.values()):
        return None
    return Augmentation(size=size, **params,
                        crop_min_scale=None if crop is None else float(
                            crop.get("min_scale", default("$defs.augmentation.crop.min_scale"))))
