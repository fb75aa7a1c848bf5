"""A photo's identity (segpipe.data.identity): the same photo however LabelMe stores it."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import PIL.Image
import PIL.ImageOps
import pytest

from segpipe import SegpipeError
from segpipe.data.identity import photo_id, same_photos, seen_in
from segpipe.data.synthetic import synthesise


def photo(seed: int, size=(240, 320)) -> np.ndarray:
    """A synthetic photograph (RGB uint8)."""
    return synthesise(np.random.default_rng(seed), size)[0]


def encode(pixels: np.ndarray, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def labelme_copy(encoded: bytes, suffix: str) -> bytes:
    """The imageData LabelMe embeds for an image file (labelme/label_file.py,
    LabelFile.load_image_file): EXIF orientation applied, then saved by Pillow as JPEG (default
    quality) for .jpg/.jpeg, else as PNG."""
    image = PIL.ImageOps.exif_transpose(PIL.Image.open(io.BytesIO(encoded)))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG" if suffix in (".jpg", ".jpeg") else "PNG")
    return buffer.getvalue()


def same_photo(a: str, b: str) -> bool:
    return seen_in([a], [b]) == [0]


def decoded(encoded: bytes) -> np.ndarray:
    return np.asarray(PIL.Image.open(io.BytesIO(encoded)).convert("RGB"))


@pytest.mark.parametrize("fmt, suffix", [("PNG", ".png"), ("JPEG", ".jpg")])
def test_labelme_copies_are_the_same_photo(fmt, suffix):
    # As a camera or another program saved it: other settings than Pillow's defaults.
    original = encode(photo(0), fmt, **({"quality": 92} if fmt == "JPEG" else
                                        {"compress_level": 9}))
    copy = labelme_copy(original, suffix)
    assert copy != original  # LabelMe re-encodes...
    if fmt == "JPEG":  # ...a JPEG with loss: not one pixel value in ten is kept
        assert (decoded(copy) != decoded(original)).mean() > 0.1
    else:
        np.testing.assert_array_equal(decoded(copy), decoded(original))
    (file_id, file_size), (copy_id, copy_size) = (photo_id(original, "file"),
                                                  photo_id(copy, "copy", exif=False))
    assert file_size == copy_size == (240, 320)
    assert same_photo(file_id, copy_id)


def test_other_photos_and_a_changed_scene_are_other_photos():
    pixels = photo(1)
    changed = pixels.copy()
    changed[100:140, 150:200] = (40, 90, 40)  # something moved in a 40x50 part of the scene
    ids = [photo_id(encode(p, "PNG"), "p")[0] for p in (pixels, changed, photo(2), photo(3))]
    assert same_photos(ids) == []
    assert seen_in(ids, ids) == [0, 1, 2, 3]


def test_the_exif_orientation_of_an_image_file_is_applied():
    """A camera's JPEG stored sideways with EXIF orientation 6 (rotate 90° clockwise to view)
    and LabelMe's embedded copy, already turned."""
    pixels = photo(4)
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    sideways = encode(np.rot90(pixels, 1).copy(), "JPEG", quality=95, exif=exif.tobytes())
    copy = labelme_copy(sideways, ".jpg")
    (file_id, file_size), (copy_id, copy_size) = (photo_id(sideways, "f"),
                                                  photo_id(copy, "c", exif=False))
    assert file_size == copy_size == (240, 320)
    assert same_photo(file_id, copy_id)
    # Read without its orientation, the file is another picture (a turned one).
    assert photo_id(sideways, "f", exif=False)[1] == (320, 240)
    assert not same_photo(photo_id(sideways, "f", exif=False)[0], copy_id)


def test_a_uniform_image_has_only_the_dc_bit():
    """Its DCT has one non-zero coefficient, the first: the median of the 64 is 0, so only bit 0
    (the most significant) is set; the thumbnail is the grey value, 0.299 R + 0.587 G + 0.114 B
    (BT.601)."""
    grey = round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)  # 124
    identity, size = photo_id(encode(np.full((16, 24, 3), (200, 100, 50), np.uint8), "PNG"), "u")
    hashed, thumbnail = identity.split(":")
    assert hashed == "8000000000000000" and size == (16, 24)
    assert base64.b64decode(thumbnail) == bytes([grey]) * 1024


def test_same_photos_groups_transitively_and_tolerates_little():
    def uniform(value):
        return photo_id(encode(np.full((8, 8, 3), value, np.uint8), "PNG"), "u")[0]

    # 4 grey levels apart are one photo, 5 are not; 100 ~ 104 ~ 108 joins 100 and 108.
    ids = [uniform(v) for v in (100, 150, 104, 109, 108, 155)]
    assert same_photos(ids) == [[0, 2, 3, 4]]
    assert seen_in([uniform(105), uniform(120)], [uniform(200), uniform(101), uniform(104)]) == \
        [1, None]


@pytest.mark.parametrize("encoded, message", [
    (b"", "x.png: empty (0 bytes), not an image"),
    (b"not an image", "x.png: not a readable image"),
])
def test_unreadable_images_are_named(encoded, message):
    with pytest.raises(SegpipeError, match=f"^{re.escape(message)}"):
        photo_id(encoded, "x.png")
