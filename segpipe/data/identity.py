"""A photo's identity: what it shows, not how it is stored.

LabelMe re-encodes an image when it embeds it in a JSON file (``imageData``;
``labelme/label_file.py``, ``LabelFile.load_image_file``: EXIF orientation applied, then Pillow's
``save``): a PNG losslessly, a JPEG at Pillow's default quality 75. The embedded copy of a
photo then differs from the photo's file in its bytes and, for a JPEG, in its pixels, yet it is
the same photo: training on one and testing on the other is a leak.

The identity of an image (:func:`photo_id`) is its *thumbnail*, the image in grey (BT.601
luma) area-averaged to 32×32 pixels (1024 bytes), and the thumbnail's 64-bit perceptual hash,
pHash (Zauner 2010, "Implementation and benchmarking of perceptual image hash functions"; the
``imagehash.phash`` rule): the 8×8 lowest frequencies of its DCT-II, bit *k* set where
coefficient *k* exceeds their median.

**Rule.** Two images are the same photo when their hashes differ in at most
:data:`MAX_HASH_BITS` of the 64 bits *and* no pixel of their thumbnails differs by more than
:data:`MAX_THUMBNAIL_DIFF` grey levels (of 255). The hash finds candidates among thousands of
images at once; the thumbnail confirms, so that photos whose coarse structure merely agrees
(video frames, a burst) are not taken for one: a change anywhere in the scene moves some
thumbnail pixel. Measured (docs/data.md): LabelMe's re-encoding moves a thumbnail pixel by
at most 2 levels (a JPEG; a lossless PNG by 0) and flips at most 4 hash bits; distinct photos
differ by at least 17 levels (frames of one video, ``devices_labelme``), mostly by far more.
"The same photo" is joined transitively where it groups (:func:`same_photos`).

The image is decoded in grey at its full size (a decoder's reduced decoding differs by
format: a JPEG's DCT scaling is not a PNG's subsampling), with the EXIF orientation applied to
image files as when they are decoded for training (:func:`segpipe.data.labelme.decode_image`);
embedded data is stored already oriented.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

import cv2
import numpy as np

from segpipe.data.labelme import imdecode

MAX_HASH_BITS = 8
"""Hash bits (of 64) in which two images of one photo may differ."""
MAX_THUMBNAIL_DIFF = 4
"""Grey levels by which a thumbnail pixel of one photo may differ from another copy's."""
_SIDE = 32
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], np.uint8)


def photo_id(encoded: bytes, source: str, exif: bool = True) -> tuple[str, tuple[int, int]]:
    """The identity of an encoded image (``"<16 hex digits of the hash>:<base64 thumbnail>"``)
    and its (height, width), EXIF orientation applied if ``exif``. Raises
    :class:`~segpipe.SegpipeError` starting with ``source`` for data that is not a readable
    image (:func:`segpipe.data.labelme.imdecode`)."""
    flags = cv2.IMREAD_GRAYSCALE | (0 if exif else cv2.IMREAD_IGNORE_ORIENTATION)
    grey = imdecode(encoded, flags, source)
    thumbnail = cv2.resize(grey, (_SIDE, _SIDE), interpolation=cv2.INTER_AREA)
    low = cv2.dct(thumbnail.astype(np.float32))[:8, :8].ravel()
    bits = np.packbits(low > np.median(low))
    text = f"{bits.tobytes().hex()}:{base64.b64encode(thumbnail.tobytes()).decode()}"
    return text, grey.shape[:2]


def _parse(ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Hashes (N,) uint64 and thumbnails (N, 1024) int16 of photo ids."""
    hashes = np.array([int(i[:16], 16) for i in ids], np.uint64)
    thumbnails = np.frombuffer(b"".join(base64.b64decode(i[17:]) for i in ids), np.uint8)
    return hashes, thumbnails.reshape(len(ids), _SIDE * _SIDE).astype(np.int16)


def _pairs(a: Sequence[str], b: Sequence[str], chunk: int = 512) -> list[tuple[int, int]]:
    """Every (i, j) with ``a[i]`` and ``b[j]`` the same photo (the module's rule)."""
    if not a or not b:
        return []
    (hash_a, thumb_a), (hash_b, thumb_b) = _parse(a), _parse(b)
    found = []
    for start in range(0, len(a), chunk):
        xor = hash_a[start:start + chunk, None] ^ hash_b[None, :]
        bits = _POPCOUNT[xor.view(np.uint8)].reshape(*xor.shape, 8).sum(-1, dtype=np.int32)
        for i, j in zip(*np.nonzero(bits <= MAX_HASH_BITS)):
            i += start
            if np.abs(thumb_a[i] - thumb_b[j]).max() <= MAX_THUMBNAIL_DIFF:
                found.append((int(i), int(j)))
    return found


def same_photos(ids: Sequence[str]) -> list[list[int]]:
    """The positions of the images of each photo that occurs more than once, each group in
    order, groups by their first position; joined transitively (a ~ b and b ~ c: one group)."""
    parent = list(range(len(ids)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = i = parent[parent[i]]
        return i

    for i, j in _pairs(ids, ids):
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for i in range(len(ids)):
        groups.setdefault(root(i), []).append(i)
    return [group for group in groups.values() if len(group) > 1]


def seen_in(ids: Sequence[str], known: Sequence[str]) -> list[int | None]:
    """For each of ``ids``, the first position in ``known`` of the same photo, or None."""
    first: list[int | None] = [None] * len(ids)
    for i, j in _pairs(ids, known):
        if first[i] is None or j < first[i]:
            first[i] = j
    return first
