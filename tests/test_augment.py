import pickle

import numpy as np
import pytest

from segpipe import SegpipeError
from segpipe.data.augment import build_augmentation

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


@pytest.mark.parametrize("seed", range(4))
def test_rotation_keeps_image_and_mask_aligned(seed):
    mask = l_shape()
    out_image, out_mask = build_augmentation({"rotate": 30}, SIZE)(encoded(mask), mask, rng(seed))
    assert out_mask.dtype == np.uint8 and set(np.unique(out_mask)) <= {0, 1}
    assert (out_mask != mask).sum() > 20  # it did rotate
    agreement = ((out_image[..., 2] > 127) == out_mask.astype(bool)).mean()
    assert agreement > 0.98  # only interpolated boundary pixels may disagree


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


def test_jitter_and_erase_touch_the_image_only():
    mask = l_shape()
    image = np.full((*SIZE, 3), 100, np.uint8)
    out_image, out_mask = build_augmentation({"jitter": 0.2}, SIZE)(image, mask, rng(1))
    np.testing.assert_array_equal(out_mask, mask)
    # on a grey image contrast and saturation are identities: only brightness in [0.8, 1.2]
    assert len(np.unique(out_image)) == 1 and 80 <= out_image[0, 0, 0] <= 120
    assert out_image[0, 0, 0] != 100

    black = np.zeros((*SIZE, 3), np.uint8)
    out_image, out_mask = build_augmentation({"erase": 1.0}, SIZE)(black, mask, rng(2))
    np.testing.assert_array_equal(out_mask, mask)
    rows, cols = np.nonzero(out_image.any(-1))
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert 0.02 * 64 * 64 * 0.8 <= box <= 0.33 * 64 * 64 * 1.2
    assert len(rows) >= 0.99 * box  # one filled rectangle


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
    with pytest.raises(SegpipeError, match=f"^augmentation definition: {message}"):
        build_augmentation(definition, SIZE)


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)
