import pickle

import numpy as np
import pytest
import torch

from segpipe import SegpipeError
from segpipe.columns import AXES
from segpipe.data.augment import FILL, build_augmentation
from segpipe.spec import check_spec

SIZE = (64, 64)
STANDARD = {"hflip": 0.5, "vflip": 0.3, "rotate": 15, "jitter": 0.2, "erase": 0.25}


def encoded(mask: np.ndarray) -> np.ndarray:
    """An image whose pixels say where they come from: red = 4·row, green = 4·column,
    blue = 255 on the mask's foreground."""
    rows, cols = np.indices(mask.shape)
    return np.stack([4 * rows, 4 * cols, 255 * mask], axis=-1).astype(np.uint8)


def l_shape() -> np.ndarray:
    mask = np.zeros(SIZE, np.uint8)
    mask[10:50, 12:22] = 1
    mask[40:50, 12:45] = 1
    return mask


def test_plain_is_none():
    assert build_augmentation({}, SIZE) is None
    assert build_augmentation({"hflip": 0, "erase": 0.0}, SIZE) is None


def test_flips_move_image_and_mask_together():
    mask = l_shape()
    image = encoded(mask)
    out_image, out_mask = build_augmentation({"hflip": 1.0}, SIZE)(image, mask, rng(0))
    np.testing.assert_array_equal(out_mask, mask[:, ::-1])
    np.testing.assert_array_equal(out_image, image[:, ::-1])
    out_image, out_mask = build_augmentation({"vflip": 1.0}, SIZE)(image, mask, rng(0))
    np.testing.assert_array_equal(out_mask, mask[::-1])
    np.testing.assert_array_equal(out_image, image[::-1])


def white_on_black(mask: np.ndarray) -> np.ndarray:
    """An RGB image whose pixels encode the mask: 255 on the foreground, 0 elsewhere."""
    return np.repeat(255 * mask[..., None], 3, axis=2).astype(np.uint8)


def centroid(weights: np.ndarray) -> np.ndarray:
    """(row, column) of the centre of mass of non-negative ``weights`` (H, W)."""
    rows, cols = np.indices(weights.shape)
    weights = weights.astype(np.float64)
    return np.array([(weights * rows).sum(), (weights * cols).sum()]) / weights.sum()


def mean_centroid_offset(definition: dict, draws: int, size=(96, 96)) -> np.ndarray:
    """Mean over ``draws`` draws of the image's centre of brightness minus the mask's centroid,
    for an L-shaped mask (no symmetry). Each draw also checks dtypes and a binary mask.

    One draw is off by a fraction of a pixel (a mask edge snaps to whole pixels); what must
    vanish is the systematic offset, e.g. the half-pixel shift of ``cv2.INTER_NEAREST`` when
    the crop is resized. Rotation fills the corners it uncovers, so there the brightness is
    taken inside the inscribed circle (which a rotation about the centre maps onto itself),
    where the shape stays."""
    mask = np.zeros(size, np.uint8)
    mask[25:65, 38:50] = 1
    mask[55:65, 38:70] = 1
    rows, cols = np.indices(size)
    region = np.hypot(rows - (size[0] - 1) / 2, cols - (size[1] - 1) / 2) <= size[0] / 2 - 1
    if "rotate" not in definition:
        region[:] = True
    transform = build_augmentation(definition, size)
    offsets = []
    for seed in range(draws):
        out_image, out_mask = transform(white_on_black(mask), mask, rng(seed))
        assert out_image.dtype == np.uint8 and out_image.shape == (*size, 3)
        assert out_mask.dtype == np.uint8 and out_mask.shape == size
        assert set(np.unique(out_mask)) <= {0, 1} and out_mask.any()
        offsets.append(centroid(out_image[..., 0] * region) - centroid(out_mask))
    return np.mean(offsets, axis=0)


# A crop's offset varies most (± 0.7 px at most, its mean over 1000 draws ± 0.01 px).
@pytest.mark.parametrize("definition, draws", [
    ({"hflip": 1.0}, 10), ({"vflip": 1.0}, 10), ({"rotate": 30}, 100),
    ({"crop": {"min_scale": 0.5}}, 1000)])
def test_geometry_moves_image_and_mask_together(definition, draws):
    assert np.abs(mean_centroid_offset(definition, draws)).max() <= 0.05


def test_rotation_fills_the_corners_it_uncovers():
    mask = l_shape()
    out_image, out_mask = build_augmentation({"rotate": 45}, SIZE)(
        white_on_black(mask), mask, rng(0))  # this rng draws an angle of −32.7°
    assert (out_mask != mask).sum() > 100  # it did rotate
    assert tuple(out_image[0, 0]) == FILL and out_mask[0, 0] == 0


def test_jitter_changes_the_colours_only():
    mask = l_shape()
    transform = build_augmentation({"jitter": 0.5}, SIZE)
    for seed in range(20):
        out_image, out_mask = transform(white_on_black(mask), mask, rng(seed))
        np.testing.assert_array_equal(out_mask, mask)
        bright = out_image[..., 0] > (int(out_image.min()) + int(out_image.max())) / 2
        np.testing.assert_array_equal(bright, mask.astype(bool))


def test_erase_fills_one_rectangle_of_the_image_only():
    mask = l_shape()
    transform = build_augmentation({"erase": 1.0}, SIZE)
    for seed in range(20):
        out_image, out_mask = transform(np.zeros((*SIZE, 3), np.uint8), mask, rng(seed))
        np.testing.assert_array_equal(out_mask, mask)  # erased objects stay foreground
        rows, cols = np.nonzero(out_image.any(-1))
        box = out_image[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert (box == FILL).all()  # one rectangle, filled with the mean colour
        assert 0.02 * 0.9 <= box.shape[0] * box.shape[1] / (SIZE[0] * SIZE[1]) <= 0.33 * 1.1
        assert 0.3 * 0.8 <= box.shape[0] / box.shape[1] <= 1 / 0.3 / 0.8


def crop_window(image: np.ndarray) -> tuple[int, int, int, int]:
    """Source rows and columns (first, last) of a crop of an `encoded` image."""
    return (int(image[0, 0, 0]) // 4, int(image[-1, -1, 0]) // 4, int(image[0, 0, 1]) // 4,
            int(image[-1, -1, 1]) // 4)


def test_crop_contains_the_object_when_it_fits():
    mask = np.zeros(SIZE, np.uint8)
    mask[40:50, 5:15] = 1  # 10 x 10 object; crops are at least 32 x 32
    windows = set()
    for seed in range(20):
        out_image, out_mask = build_augmentation({"crop": {"min_scale": 0.5}}, SIZE)(
            encoded(mask), mask, rng(seed))
        top, bottom, left, right = crop_window(out_image)
        assert top <= 40 and bottom >= 49 and left <= 5 and right >= 14
        assert bottom - top >= 31
        assert ((out_image[..., 2] > 127) == out_mask.astype(bool)).mean() > 0.98
        windows.add((top, left, bottom))
    assert len(windows) > 10  # the crop is random


def test_crop_is_centred_on_an_object_that_does_not_fit():
    mask = np.zeros(SIZE, np.uint8)
    mask[4:60, 20:30] = 1  # 56 rows high, centred on row 32
    for seed in range(10):
        out_image, _ = build_augmentation({"crop": {"min_scale": 0.5}}, SIZE)(
            encoded(mask), mask, rng(seed))
        top, bottom, left, right = crop_window(out_image)
        if bottom - top + 1 < 56:
            assert abs((top + bottom + 1) / 2 - 32) <= 0.5
        else:
            assert top <= 4 and bottom >= 59
        assert left <= 20 and right >= 29


def test_crop_of_an_empty_mask_stays_empty():
    mask = np.zeros(SIZE, np.uint8)
    out_image, out_mask = build_augmentation({"crop": {}}, SIZE)(encoded(mask), mask, rng(3))
    assert out_image.shape == (*SIZE, 3) and out_mask.shape == SIZE
    assert not out_mask.any()


def test_standard_is_deterministic_for_a_seed_and_keeps_types():
    mask = l_shape()
    image = np.random.default_rng(0).integers(0, 256, (*SIZE, 3), dtype=np.uint8)
    transform = build_augmentation({**STANDARD, "crop": {"min_scale": 0.6}}, SIZE)
    outputs = [transform(image, mask, rng(seed)) for seed in (7, 7, 8)]
    for out_image, out_mask in outputs:
        assert out_image.shape == image.shape and out_image.dtype == np.uint8
        assert out_mask.shape == mask.shape and out_mask.dtype == np.uint8
        assert set(np.unique(out_mask)) <= {0, 1}
    np.testing.assert_array_equal(outputs[0][0], outputs[1][0])
    np.testing.assert_array_equal(outputs[0][1], outputs[1][1])
    assert not np.array_equal(outputs[0][0], outputs[2][0])
    restored = pickle.loads(pickle.dumps(transform))  # DataLoader workers
    np.testing.assert_array_equal(restored(image, mask, rng(7))[0], outputs[0][0])


def test_torch_randomness_neither_leaks_in_nor_out():
    """torchvision draws from torch's global generator: the transform seeds it from ``rng``
    and restores it, so its output depends on ``rng`` only, and nobody else's draws move."""
    mask = l_shape()
    image = np.random.default_rng(0).integers(0, 256, (*SIZE, 3), dtype=np.uint8)
    transform = build_augmentation(STANDARD, SIZE)
    torch.manual_seed(1)
    first = transform(image, mask, rng(7))
    after = torch.rand(3)
    torch.manual_seed(1)
    np.testing.assert_array_equal(torch.rand(3), after)
    torch.manual_seed(2)
    second = transform(image, mask, rng(7))
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_wrong_input_size_is_refused():
    with pytest.raises(ValueError, match="size"):
        build_augmentation(STANDARD, SIZE)(np.zeros((32, 64, 3), np.uint8),
                                           np.zeros((32, 64), np.uint8), rng(0))


@pytest.mark.parametrize("definition, message", [
    ({"hflip": 0.5, "mixup": 0.2}, r"mixup: unknown key \(allowed: crop, hflip, vflip, rotate, "),
    ({"hflip": 1.5}, "hflip: 1.5 is greater than the maximum of 1"),
    ({"vflip": True}, "vflip: True is not of type 'number'"),
    ({"rotate": -5}, "rotate: -5 is less than the minimum of 0"),
    ({"rotate": 181}, "rotate: 181 is greater than the maximum of 180"),
    ({"jitter": "0.2"}, "jitter: '0.2' is not of type 'number'"),
    ({"crop": 0.5}, "crop: 0.5 is not of type 'object'"),
    ({"crop": {"scale": 0.5}}, r"crop.scale: unknown key \(allowed: min_scale\)"),
    ({"crop": {"min_scale": 0}}, "crop.min_scale: 0 is less than or equal to the minimum of 0"),
])
def test_bad_definitions_name_the_key(definition, message):
    """Checked where a run enters (`segpipe train`'s spec; the workflow's start by the same
    schema), not by build_augmentation."""
    spec = {**{"run": "r", "seed": 0, "names": dict.fromkeys(AXES, "x"),
            "architecture": {"model": "unet"}, "backbone": {}, "loss": {"bce": 1.0},
            "augmentation": {}, "train": {}}, "augmentation": definition}
    with pytest.raises(SegpipeError, match=f"^run spec: augmentation[.:] ?{message}"):
        check_spec(spec)


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)
