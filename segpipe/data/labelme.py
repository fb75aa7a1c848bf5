"""Read LabelMe annotations and rasterise them into class masks.

LabelMe (K. Wada, https://github.com/wkentaro/labelme) writes one JSON file per image: the
image (``imagePath`` relative to the JSON and/or base64 ``imageData``), its size and a list
of shapes, each a ``label``, a ``shape_type`` and ``points`` in pixel coordinates. This
module reads the files of versions 3.x to 6.x (and older ones, whose shapes have no
``shape_type``) and fills shapes exactly as LabelMe's own conversion
(``labelme.utils.shape_to_mask``) does: with PIL's ``ImageDraw``, ``fill=1`` *and*
``outline=1``, so boundary pixels are foreground.

- ``polygon`` (or no ``shape_type``, LabelMe < 3) and ``oriented_rectangle`` (4 corners):
  ``ImageDraw.polygon``;
- ``rectangle`` (2 opposite corners): ``ImageDraw.rectangle``;
- ``circle`` (centre, point on the rim): ``ImageDraw.ellipse`` of the bounding box
  centre ± radius, radius = distance between the two points;
- ``mask`` (LabelMe 5): a base64 PNG patch whose top-left pixel is the rounded first point;
- every other type (``line``, ``linestrip``, ``point``, ...) encloses no area: it is not
  drawn, whatever its points, and is counted in :attr:`Annotation.skipped`.

At another size (H, W) the shapes are rasterised at that size from scaled coordinates, never
by resizing a full-size mask. Every point is mapped pixel centre to pixel centre,
``x' = (x + 0.5)·W/W₀ − 0.5`` (the convention of ``cv2.resize``, so masks stay aligned with
images resized by it); a radius scales by ``W/W₀`` and ``H/H₀`` (a circle becomes an
ellipse when the aspect ratio changes). A pixel is foreground when its *centre* lies inside
the scaled shape (even-odd rule; a ``mask`` patch is sampled at the nearest source pixel).
Drawing the outline too, as at the original size, would widen every shape by half a pixel
of the *target* size: at 64x64 the foreground area exceeds that of the full-size LabelMe
mask by 5.5 % on the demo data and 10.6 % on a real dataset; the centre rule stays 1.1 %
below it (half an original pixel along the outline, which LabelMe's mask includes).
Requires Pillow.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import os
import sys
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import PIL.Image
import PIL.ImageDraw

from segpipe import SegpipeError
from segpipe.files import FILLED_TYPES, image_digest, labelme_image, read_labelme, size_error
from segpipe.labels import IGNORE, Labels

POINT_COUNTS = {"rectangle": 2, "circle": 2, "oriented_rectangle": 4, "mask": 2}
MIN_POLYGON_POINTS = 3
# A point of a filled shape may lie outside the image, [0, W] x [0, H] in LabelMe's continuous
# coordinates, by at most this fraction of the image width (x) or height (y), and at least by
# one pixel; farther away it is an error (e.g. points of another resolution).
OUTSIDE_MARGIN = 0.1


@dataclass(frozen=True, eq=False)
class Shape:
    """A filled LabelMe shape: ``points`` (K, 2) float x, y in pixels of the original image."""

    label: str
    shape_type: str
    points: np.ndarray
    patch: np.ndarray | None = None  # bool (h, w), the bitmap of a ``mask`` shape


@dataclass(frozen=True, eq=False)
class Annotation:
    """A LabelMe file: its RGB uint8 image (H, W, 3), its filled shapes in file order, the
    shapes that are not drawn (they enclose no area) counted by ``shape_type``, and the SHA-256
    of the encoded image (files or ``imageData``), which tells two files of one image."""

    path: Path
    image: np.ndarray
    shapes: tuple[Shape, ...]
    skipped: Counter
    image_digest: str

    @property
    def size(self) -> tuple[int, int]:
        """Original (height, width)."""
        return self.image.shape[0], self.image.shape[1]


def load_annotation(path: str | Path) -> Annotation:
    """Read a LabelMe JSON file and its image, checking both.

    The image is the embedded ``imageData`` when present (LabelMe's own precedence: it is the
    image the shapes were drawn on), else the file ``imagePath`` relative to the JSON, with
    its EXIF orientation applied as LabelMe does when it opens an image file (embedded data
    is stored already oriented). Grayscale, palette, RGBA and 16-bit images become 8-bit RGB
    (alpha dropped, 16-bit scaled by 1/257). Raises :class:`SegpipeError` naming the file
    for invalid JSON, a missing or undecodable image, an ``imageHeight``/``imageWidth`` that
    differs from the image, and malformed filled shapes (too few points, points that are not
    numbers or lie far outside the image, a circle of radius 0).
    """
    path = Path(path)
    data = read_labelme(path)
    encoded, source, image_file = labelme_image(path, data)
    image = decode_image(encoded, source, exif=image_file is not None)
    height, width = image.shape[:2]
    error = size_error(path, (data.get("imageHeight"), data.get("imageWidth")), (height, width))
    if error:
        raise SegpipeError(error)
    shapes, skipped = [], Counter()
    for index, raw in enumerate(data["shapes"]):
        where = f"{path}: shape {index}"
        if not isinstance(raw, dict) or not isinstance(raw.get("label"), str):
            raise SegpipeError(f"{where}: not a LabelMe shape (needs a string 'label')")
        shape_type = raw.get("shape_type")
        if shape_type is None:  # LabelMe < 3
            shape_type = "polygon"
        if not isinstance(shape_type, str) or not shape_type:
            problem = "is empty" if shape_type == "" else "is not a string"
            raise SegpipeError(f"{where}: 'shape_type' {shape_type!r} {problem} (a missing key "
                               "or null means polygon)")
        if shape_type in FILLED_TYPES:
            where = f"{where} ({raw['label']!r}, {shape_type})"
            shapes.append(_parse_shape(where, raw, shape_type, (height, width)))
        else:  # not drawn, whatever its points
            skipped[shape_type] += 1
    return Annotation(path, image, tuple(shapes), skipped, image_digest(encoded))


def load_annotations(files: Iterable[str | Path], workers: int = 1) -> Iterator[Annotation]:
    """:func:`load_annotation` of each of ``files``, in their order, read by ``workers``
    threads (decoding releases the GIL): at most ``2 × workers`` files are read ahead of the
    one consumed, so as many images at most are held at once. The first file in order that is
    wrong raises its error, as when read one by one."""
    if workers <= 1:
        yield from map(load_annotation, files)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="load_annotation") as pool:
        ahead: deque[Future] = deque()
        try:
            for path in files:
                ahead.append(pool.submit(load_annotation, path))
                if len(ahead) >= 2 * workers:
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()
        finally:
            for future in ahead:
                future.cancel()


def rasterise(annotation: Annotation, size: tuple[int, int] | None = None,
              labels: Labels | None = None) -> np.ndarray:
    """Class mask, uint8 (H, W), of an annotation at its size or at ``size``: each shape paints
    the value :meth:`segpipe.labels.Labels.value` gives its label (a class 1…K, 0 for a
    background label, which erases, :data:`~segpipe.labels.IGNORE` for an ignore label; a
    label it does not select is not drawn), in file order, so a later shape overwrites an
    earlier one: LabelMe's VOC export (``labelme2voc.py``). ``labels``: default, the binary
    study (every label is foreground, 1). At the original size a binary mask equals
    LabelMe's ``shape_to_mask`` union.
    """
    labels = Labels() if labels is None else labels
    size = annotation.size if size is None else (int(size[0]), int(size[1]))
    mask = np.zeros(size, np.uint8)
    for shape in annotation.shapes:
        value = labels.value(shape.label)
        if value is not None:
            mask[_region(shape, annotation.size, size)] = value
    return mask




def decode_image(encoded: bytes, source: str, exif: bool = True) -> np.ndarray:
    """RGB uint8 (H, W, 3) of an encoded image file (any format OpenCV reads): grayscale,
    palette and alpha images become RGB, 16-bit ones 8-bit (``round(value / 257)``), and the
    EXIF orientation is applied if ``exif``. Raises :class:`SegpipeError` starting with
    ``source`` for empty data, an undecodable image and one too large for OpenCV."""
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH
    if not exif:
        flags |= cv2.IMREAD_IGNORE_ORIENTATION
    image = imdecode(encoded, flags, source)
    if image.dtype == np.uint16:
        image = np.round(image / 257.0).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise SegpipeError(f"{source}: unsupported pixel type {image.dtype} (use 8 or 16 bit)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def imdecode(encoded: bytes, flags: int, source: str) -> np.ndarray:
    """``cv2.imdecode(encoded, flags)``; raises :class:`SegpipeError` starting with ``source``
    for empty data, an undecodable image and one too large for OpenCV."""
    if not encoded:
        raise SegpipeError(f"{source}: empty (0 bytes), not an image")
    try:
        image = cv2.imdecode(np.frombuffer(encoded, np.uint8), flags)
    except cv2.error as exc:
        if exc.func == "validateInputImageSize":
            raise SegpipeError(
                f"{source}: too large: OpenCV decodes at most 2^30 pixels, 2^20 per side (the "
                "environment variables OPENCV_IO_MAX_IMAGE_PIXELS, _WIDTH, _HEIGHT raise it)"
            ) from None
        raise SegpipeError(f"{source}: not a readable image ({exc.err})") from None
    if image is None:
        raise SegpipeError(f"{source}: not a readable image")
    return image


def _parse_shape(where: str, raw: dict, shape_type: str, size: tuple[int, int]) -> Shape:
    """A filled shape; ``where`` names it in errors."""
    points = raw.get("points")
    if not (isinstance(points, list) and points
            and all(isinstance(p, list) and len(p) == 2 and all(map(_is_coordinate, p))
                    for p in points)):
        raise SegpipeError(
            f"{where}: 'points' must be a list of [x, y] numbers (finite; not strings or booleans)"
        )
    points = np.array(points, dtype=float)
    needed = POINT_COUNTS.get(shape_type)
    if needed is not None and len(points) != needed:
        raise SegpipeError(f"{where}: has {len(points)} points, expected {needed}")
    if needed is None and len(points) < MIN_POLYGON_POINTS:
        raise SegpipeError(
            f"{where}: has {len(points)} points, a polygon needs at least {MIN_POLYGON_POINTS}"
        )
    if shape_type == "circle" and (points[0] == points[1]).all():
        raise SegpipeError(f"{where}: radius 0 (the centre and the rim point coincide)")
    height, width = size
    limit = np.maximum(np.array([width, height]) * OUTSIDE_MARGIN, 1.0)
    outside = (points < -limit) | (points > np.array([width, height]) + limit)
    if outside.any():
        x, y = points[outside.any(axis=1)][0]
        raise SegpipeError(
            f"{where}: point ({x:g}, {y:g}) lies far outside the {height}x{width} image"
        )
    patch = _decode_patch(where, raw.get("mask")) if shape_type == "mask" else None
    return Shape(raw["label"], shape_type, points, patch)


def _is_coordinate(value: object) -> bool:
    """A finite number: not a string, not a bool (an int in Python), not NaN or infinite."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and abs(value) <= sys.float_info.max)


def _decode_patch(where: str, encoded: object) -> np.ndarray:
    try:
        patch = base64.b64decode(encoded)
    except (binascii.Error, TypeError, ValueError):
        raise SegpipeError(f"{where}: 'mask' is not a base64-encoded PNG") from None
    return imdecode(patch, cv2.IMREAD_GRAYSCALE, f"{where}: 'mask'") > 0


def _region(shape: Shape, orig_size: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """Boolean (H, W): the pixels a filled shape covers at ``size``."""
    if shape.shape_type == "mask":
        return _patch_region(shape, orig_size, size)
    if size == orig_size:
        return _labelme_region(shape, size)
    scale = np.array([size[1] / orig_size[1], size[0] / orig_size[0]])
    points = (shape.points + 0.5) * scale - 0.5
    if shape.shape_type == "circle":
        (cx, cy), (rx, ry) = points[0], math.dist(*shape.points) * scale
        rows, cols = np.ogrid[: size[0], : size[1]]
        return ((cols - cx) / rx) ** 2 + ((rows - cy) / ry) ** 2 <= 1
    if shape.shape_type == "rectangle":
        (x0, y0), (x1, y1) = points
        points = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    return _polygon_centres(points, size)


def _labelme_region(shape: Shape, size: tuple[int, int]) -> np.ndarray:
    """LabelMe's ``shape_to_mask``: PIL ``ImageDraw`` with ``fill=1, outline=1``."""
    canvas = PIL.Image.new("L", (size[1], size[0]), 0)
    draw = PIL.ImageDraw.Draw(canvas)
    xy = [tuple(p) for p in shape.points]
    if shape.shape_type == "rectangle":
        (x0, y0), (x1, y1) = xy
        draw.rectangle(((min(x0, x1), min(y0, y1)), (max(x0, x1), max(y0, y1))), 1, 1)
    elif shape.shape_type == "circle":
        (cx, cy), radius = xy[0], math.dist(*xy)
        draw.ellipse(((cx - radius, cy - radius), (cx + radius, cy + radius)), 1, 1)
    else:
        draw.polygon(xy, 1, 1)
    return np.array(canvas, dtype=bool)


def _polygon_centres(points: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Pixels whose centre lies inside the polygon (even-odd rule), by scanlines: a pixel of
    row y is inside when an odd number of edges cross that row at or left of its centre."""
    height, width = size
    x0, y0 = points[:, 0], points[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    rows = np.arange(height)[:, None]
    crossing = (y0 <= rows) != (y1 <= rows)  # (H, edges), each vertex counted once
    with np.errstate(divide="ignore", invalid="ignore"):
        at = x0 + (rows - y0) * (x1 - x0) / (y1 - y0)
    first_col = np.clip(np.ceil(at[crossing]), 0, width).astype(int)
    counts = np.zeros((height, width + 1), np.int32)
    np.add.at(counts, (np.nonzero(crossing)[0], first_col), 1)
    return np.cumsum(counts[:, :width], axis=1) % 2 == 1


def _patch_region(shape: Shape, orig_size: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """A ``mask`` shape: each pixel takes its nearest original pixel (identity at full size)."""
    x0, y0 = np.round(shape.points[0]).astype(int)
    rows = np.floor((np.arange(size[0]) + 0.5) * orig_size[0] / size[0]).astype(int) - y0
    cols = np.floor((np.arange(size[1]) + 0.5) * orig_size[1] / size[1]).astype(int) - x0
    patch_h, patch_w = shape.patch.shape
    inside = ((rows >= 0) & (rows < patch_h))[:, None] & ((cols >= 0) & (cols < patch_w))
    pixels = shape.patch[np.clip(rows, 0, patch_h - 1)[:, None], np.clip(cols, 0, patch_w - 1)]
    return inside & pixels


# ---------------------------------------------------------------------------- writing

LABELME_VERSION = "5.5.0"
"""The format version predicted files declare (LabelMe 5.x reads every field they hold)."""
PREDICTED_FLAG = "predicted"
"""The shape flag (``flags: {"predicted": true}``) of every shape segpipe draws."""
MIN_POLYGON_IOU = 0.99
"""The least IoU between a simplified polygon, drawn, and the region it outlines."""
PREDICTION_KEY = "segpipe"
"""The top-level key of a predicted file (LabelMe keeps unknown keys when it saves): the
segpipe version and the digest of the shapes as written, which tells an edited file."""


@dataclass(frozen=True)
class Simplification:
    """How a class map becomes polygons: each contour is simplified by Douglas–Peucker
    (``cv2.approxPolyDP``) to within ``tolerance`` pixels (0: every corner of the pixel
    outline kept), the tolerance halved (down to 0) while the polygon, drawn as LabelMe draws
    it, covers its region with IoU below :data:`MIN_POLYGON_IOU` (small regions keep their
    corners); regions and holes of fewer than ``min_area`` pixels are dropped (a dropped hole
    is filled, a dropped region takes what surrounds it)."""

    tolerance: float
    min_area: int

    @classmethod
    def default(cls) -> Simplification:
        """The settings' defaults (``predict.tolerance``, ``predict.min_area``)."""
        from segpipe.spec import default

        return cls(default("predict.tolerance"), default("predict.min_area"))


def mask_shapes(classes: np.ndarray, labels: Labels,
                simplification: Simplification | None = None,
                probability: np.ndarray | None = None) -> list[dict]:
    """LabelMe shapes of a class map (H, W) uint8 (0 background, 1…K, :data:`IGNORE` not drawn)
    at its own size, which :func:`rasterise` paints back into the map (up to the
    simplification): one polygon per connected region (8-connected) of each class, labelled
    :meth:`Labels.label_of`, then one polygon per hole of the region (4-connected), labelled
    :attr:`Labels.hole_label`, which erases. Regions come largest filled area first, so a
    region inside another's hole is drawn after the hole, and holes nest to any depth.
    ``probability``: the model's probability of each pixel's class (H, W), whose mean over a
    region becomes its ``description``. ``simplification``: default
    :meth:`Simplification.default`."""
    simplification = simplification or Simplification.default()
    regions = []
    for value in np.unique(classes):
        if value == 0 or value == IGNORE:
            continue
        count, components, stats, _ = cv2.connectedComponentsWithStats(
            (classes == value).astype(np.uint8), connectivity=8)
        for index in range(1, count):
            x, y, w, h, area = stats[index]
            if area < simplification.min_area:
                continue
            region = np.pad(components[y:y + h, x:x + w] == index, 1).astype(np.uint8)
            outline = _outlines(region)[0]
            filled = cv2.drawContours(np.zeros_like(region), [outline], -1, 1, cv2.FILLED)
            holes = [_simplified(hole, region.shape, simplification.tolerance)
                     for hole in _holes(filled & (1 - region), simplification.min_area)]
            outline = _simplified(outline, region.shape, simplification.tolerance)
            origin = np.array([x - 1, y - 1])
            mean = None if probability is None else float(
                probability[y:y + h, x:x + w][region[1:-1, 1:-1] > 0].mean())
            regions.append((int(filled.sum()), int(value), outline, holes, origin, mean))
    shapes = []
    for _, value, outline, holes, origin, mean in sorted(regions, key=lambda r: -r[0]):
        description = "" if mean is None else f"mean probability {mean:.3f}"
        shapes.append(_polygon(labels.label_of(value), outline, origin, description))
        shapes.extend(_polygon(labels.hole_label, hole, origin, "hole") for hole in holes)
    return shapes


def labelme_document(shapes: list[dict], image_path: Path, json_path: Path,
                     size: tuple[int, int], image_data: bytes | None = None) -> dict:
    """The LabelMe 5.x file of ``shapes`` for the image ``image_path`` (H, W) ``size``, to be
    written at ``json_path``: ``imagePath`` relative to it, ``imageData`` the base64 of the
    image file's bytes when given, else null."""
    from segpipe import __version__

    relative = os.path.relpath(Path(image_path).absolute(), Path(json_path).absolute().parent)
    return {
        "version": LABELME_VERSION,
        "flags": {},
        "shapes": shapes,
        "imagePath": Path(relative).as_posix(),
        "imageData": None if image_data is None else base64.b64encode(image_data).decode(),
        "imageHeight": int(size[0]),
        "imageWidth": int(size[1]),
        PREDICTION_KEY: {"version": __version__, "sha256": _digest(shapes, {})},
    }


def is_unedited_prediction(document: object) -> bool:
    """Whether a LabelMe document is a segpipe prediction whose shapes nobody has changed
    since (it may be replaced): a human annotation, or a prediction an annotator corrected,
    is not."""
    if not isinstance(document, dict) or not isinstance(document.get(PREDICTION_KEY), dict):
        return False
    try:
        return document[PREDICTION_KEY].get("sha256") == _digest(document["shapes"],
                                                                 document.get("flags"))
    except (KeyError, TypeError, ValueError):
        return False


def _digest(shapes: list[dict], flags: object) -> str:
    """SHA-256 of what an annotator can change: the file's flags and each shape's label,
    type, group, flags, description and points (as floats, so that LabelMe's re-saving of an
    unchanged file keeps it)."""
    canonical = [flags or {}, [[s["label"], s.get("shape_type"), s.get("group_id"),
                                s.get("flags") or {}, s.get("description") or "",
                                [[float(x), float(y)] for x, y in s["points"]]] for s in shapes]]
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


def _outlines(mask: np.ndarray) -> list[np.ndarray]:
    """The outer contours (K, 1, 2) of a uint8 mask's 8-connected regions, longest first."""
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return sorted(contours, key=len, reverse=True)


def _holes(mask: np.ndarray, min_area: int) -> list[np.ndarray]:
    """The outlines of the 4-connected regions of ``mask`` (the holes of a region: background
    is 4-connected where the foreground is 8-connected) of at least ``min_area`` pixels."""
    count, components, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=4)
    return [_outlines((components == index).astype(np.uint8))[0]
            for index in range(1, count) if stats[index, cv2.CC_STAT_AREA] >= min_area]


def _simplified(contour: np.ndarray, size: tuple[int, int], tolerance: float) -> np.ndarray:
    """The points (K, 1, 2) of a contour in a (H, W) crop simplified to within ``tolerance``
    pixels, or less (:class:`Simplification`): LabelMe's drawing of the polygon
    (:func:`_labelme_region`) covers the contour's region with IoU >= :data:`MIN_POLYGON_IOU`."""
    def drawn(points: np.ndarray) -> np.ndarray:
        return _labelme_region(Shape("", "polygon", points.reshape(-1, 2)), size)

    if len(contour) <= MIN_POLYGON_POINTS:
        return contour
    region = drawn(contour)
    while tolerance >= 0.05:
        points = cv2.approxPolyDP(contour, tolerance, closed=True)
        if len(points) >= MIN_POLYGON_POINTS:
            mask = drawn(points)
            if (mask & region).sum() >= MIN_POLYGON_IOU * (mask | region).sum():
                return points
        tolerance /= 2
    return contour


def _polygon(label: str, points: np.ndarray, origin: np.ndarray, description: str) -> dict:
    """A predicted LabelMe polygon of contour points (K, 1, 2) in a crop at ``origin``; pixel
    (x, y) is the point (x, y), as LabelMe's ``shape_to_mask`` draws it (:func:`rasterise` at
    the original size: outline included)."""
    points = points.reshape(-1, 2) + origin
    while len(points) < MIN_POLYGON_POINTS:  # a region of one pixel or one straight line
        points = np.concatenate([points, points[-1:]])
    return {"label": label, "points": points.astype(float).tolist(), "group_id": None,
            "description": description, "shape_type": "polygon",
            "flags": {PREDICTED_FLAG: True}, "mask": None}
