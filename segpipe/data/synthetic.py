"""Synthetic demo dataset: nature-like photographs with LabelMe annotations.

Every image shows a mottled background (multi-octave value noise, like soil or moss) and 1–3
objects, some cut by the image border:

- ``stone``: a smooth, shaded body with a darker rim, annotated as a ``polygon`` (irregular
  pebble), a ``circle`` (round pebble) or a ``rectangle`` (slab);
- ``leaf``: an elongated blade with a midrib and oblique veins, annotated as a ``polygon``.

Background and objects take their colours from one shared palette of earth tones, so colour
alone does not separate them: texture and shape do. In some images blades of ``grass`` with
the background's texture cover part of an object; they are annotated as polygons after the
objects, so with ``background: [grass]`` they erase the hidden part (LabelMe's semantics of
shapes drawn in file order). With ``cracks``, thin dark ``crack`` lines 2–4 pixels wide cross
each photo too (:func:`add_cracks`): what squashing a photo loses. Images are JPEG files beside LabelMe 5 JSON files (``imageData``
null, as written by ``labelme --nodata``). Image ``i`` depends only on ``(seed, i, size)``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import cv2
import numpy as np

from segpipe import SegpipeError
from segpipe.files import DEMO_NAME
from segpipe.spec import default

LABELME_VERSION = "5.5.0"
PALETTE = np.array(
    [
        (112, 96, 74),  # soil
        (142, 124, 92),  # clay
        (96, 110, 66),  # moss
        (128, 128, 118),  # granite
        (170, 150, 112),  # sand
        (84, 78, 70),  # slate
        (150, 112, 80),  # rust
    ],
    dtype=np.float32,
)
GRASS_PROBABILITY = 0.3
CRACK_WIDTH = (2.0, 4.0)
"""The width of the cracks (``cracks: true``), in pixels of the photo."""
JPEG_QUALITY = 90


def write_dataset(
    output_dir: str | Path, count: int, seed: int = default("data.synthetic.seed"),
    size: tuple[int, int] = tuple(default("data.synthetic.size")),
    cracks: bool = default("data.synthetic.cracks"),
) -> None:
    """Write ``count`` images ``synth_0000.jpg``, ... with their LabelMe JSON files
    (:func:`segpipe.files.demo_files`).

    ``output_dir`` must not exist, be empty, or hold nothing but the files of an earlier
    ``segpipe synth`` (Snakemake deletes those the rule declares, not those of a larger earlier
    count), which the new ones replace; it is filled under a temporary name and renamed when
    complete.
    """
    output_dir = Path(output_dir)
    height, width = size
    if count < 1:
        raise SegpipeError(f"count must be at least 1, got {count}")
    if height < 32 or width < 32:
        raise SegpipeError(f"size must be at least 32x32, got {height}x{width}")
    earlier = re.compile(re.escape(DEMO_NAME.split("{")[0]) + r"\d{4,}\.(json|jpg)")
    if output_dir.exists() and (not output_dir.is_dir() or not all(
            earlier.fullmatch(p.name) and p.is_file() for p in output_dir.iterdir())):
        raise SegpipeError(f"{output_dir}: exists and holds more than an earlier demo dataset "
                           "(synth_<i>.json, .jpg)")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = output_dir.with_name(f".{output_dir.name}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        for index in range(count):
            image, shapes = synthesise(np.random.default_rng([seed, index]), (height, width))
            if cracks:  # from a generator of their own: the rest of the image is unchanged
                image, shapes = add_cracks(np.random.default_rng([seed, index, 1]), image, shapes)
            name = DEMO_NAME.format(index)
            ok, encoded = cv2.imencode(
                ".jpg", image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
            )
            (partial / f"{name}.jpg").write_bytes(encoded.tobytes())
            document = {
                "version": LABELME_VERSION,
                "flags": {},
                "shapes": shapes,
                "imagePath": f"{name}.jpg",
                "imageData": None,
                "imageHeight": height,
                "imageWidth": width,
            }
            (partial / f"{name}.json").write_text(json.dumps(document, indent=2) + "\n")
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(partial, output_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def synthesise(rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray, list[dict]]:
    """One RGB uint8 image (H, W, 3) and its LabelMe shapes (dicts as LabelMe writes them)."""
    height, width = size
    background = _mottled(rng, size, _pick_colours(rng))
    image = background.copy()
    shapes = []
    for _ in range(rng.integers(1, 4)):
        label = "stone" if rng.random() < 0.6 else "leaf"
        radius = rng.uniform(0.15, 0.3) * min(size)
        centre = _place(rng, size, radius)
        if label == "leaf":
            shape_type, points = "polygon", _leaf_outline(rng, centre, radius)
        else:
            shape_type = rng.choice(["polygon", "polygon", "circle", "rectangle"])
            points = _stone_outline(rng, shape_type, centre, radius, size)
        if shape_type != "circle":  # LabelMe keeps points on the image
            points = np.clip(points, 0, [width - 1, height - 1])
        alpha = _coverage(shape_type, points, size)
        texture = _leaf_texture if label == "leaf" else _stone_texture
        colours = _pick_colours(rng)
        body = texture(rng, size, alpha, colours, centre)
        image = image * (1 - alpha[..., None]) + body * alpha[..., None]
        shapes.append(_labelme_shape(label, shape_type, points))
    if rng.random() < GRASS_PROBABILITY:
        target = shapes[rng.integers(len(shapes))]["points"][0]
        for _ in range(rng.integers(1, 4)):
            points = _grass_blade(rng, np.array(target), min(size))
            points = np.clip(points, 0, [width - 1, height - 1])
            alpha = _coverage("polygon", points, size)
            image = image * (1 - alpha[..., None]) + background * alpha[..., None]
            shapes.append(_labelme_shape("grass", "polygon", points))
    image = image * _illumination(rng, size)[..., None]
    image += rng.normal(0.0, 4.0, image.shape)
    return np.clip(image + 0.5, 0, 255).astype(np.uint8), shapes


def add_cracks(rng: np.random.Generator, image: np.ndarray, shapes: list[dict]
               ) -> tuple[np.ndarray, list[dict]]:
    """The image with 1–3 ``crack`` s drawn over it and their shapes after ``shapes``: thin
    dark meandering lines :data:`CRACK_WIDTH` pixels wide at the image's own size, whatever the
    size, as cracks, roots or veins are in a photograph; each a ``polygon`` around its line.
    Squashed to a small training size they are under a pixel wide (docs/training.md)."""
    height, width = image.shape[:2]
    image, shapes = image.astype(np.float32), list(shapes)
    for _ in range(rng.integers(1, 4)):
        steps = rng.integers(6, 12)
        step = rng.uniform(0.05, 0.09) * max(height, width)
        heading = rng.uniform(0, 2 * np.pi)
        line = [rng.uniform([0.15 * width, 0.15 * height], [0.85 * width, 0.85 * height])]
        for _ in range(steps):
            heading += rng.normal(0, 0.35)
            point = line[-1] + step * np.array([np.cos(heading), np.sin(heading)])
            if not (0 <= point[0] <= width - 1 and 0 <= point[1] <= height - 1):
                break  # a crack ends at the image's border
            line.append(point)
        if len(line) < 3:
            continue
        line = np.array(line)
        half = rng.uniform(*CRACK_WIDTH) / 2
        tangent = np.gradient(line, axis=0)
        normal = np.stack([-tangent[:, 1], tangent[:, 0]], 1)
        normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-6)
        points = np.concatenate([line + half * normal, (line - half * normal)[::-1]])
        points = np.clip(points, 0, [width - 1, height - 1])
        alpha = _coverage("polygon", points, (height, width))[..., None]
        image = image * (1 - alpha) + 0.3 * image * alpha
        shapes.append(_labelme_shape("crack", "polygon", points))
    return np.clip(image + 0.5, 0, 255).astype(np.uint8), shapes


def _labelme_shape(label: str, shape_type: str, points: np.ndarray) -> dict:
    return {
        "label": label,
        "points": np.round(points, 2).tolist(),
        "group_id": None,
        "description": "",
        "shape_type": str(shape_type),
        "flags": {},
        "mask": None,
    }


def _pick_colours(rng: np.random.Generator) -> np.ndarray:
    return PALETTE[rng.choice(len(PALETTE), 2, replace=False)]


def _noise(rng: np.random.Generator, size: tuple[int, int], period: float) -> np.ndarray:
    """Value noise with features of about ``period`` pixels, zero mean, unit variance."""
    height, width = size
    grid = rng.standard_normal((int(height / period) + 3, int(width / period) + 3))
    big = cv2.resize(
        grid.astype(np.float32),
        (int(grid.shape[1] * period), int(grid.shape[0] * period)),
        interpolation=cv2.INTER_CUBIC,
    )
    y, x = rng.integers(0, int(period) + 1, 2)
    field = big[y : y + height, x : x + width]
    return (field - field.mean()) / (field.std() + 1e-6)


def _mottled(rng: np.random.Generator, size: tuple[int, int], colours: np.ndarray) -> np.ndarray:
    scale = min(size) / 256
    field = sum(a * _noise(rng, size, p * scale) for a, p in ((1.0, 40), (0.8, 20), (0.7, 10)))
    t = 1 / (1 + np.exp(-1.5 * field / 1.4))
    return colours[0] * (1 - t[..., None]) + colours[1] * t[..., None]


def _place(rng: np.random.Generator, size: tuple[int, int], radius: float) -> np.ndarray:
    """A centre (x, y): inside the image, near a random border in a third of the cases."""
    height, width = size
    centre = rng.uniform([radius, radius], [width - radius, height - radius])
    if rng.random() < 0.35:
        axis, far = rng.integers(2), rng.integers(2)
        extent = (width, height)[axis] - 1
        offset = rng.uniform(0.1, 0.6) * radius
        centre[axis] = extent - offset if far else offset
    return centre


def _stone_outline(
    rng: np.random.Generator, shape_type: str, centre: np.ndarray, radius: float, size
) -> np.ndarray:
    """LabelMe points: irregular polygon, circle (centre, rim point) or rectangle corners."""
    height, width = size
    if shape_type == "circle":
        towards_middle = np.array([width / 2, height / 2]) - centre
        angle = np.arctan2(towards_middle[1], towards_middle[0]) + rng.uniform(-0.5, 0.5)
        return np.array([centre, centre + radius * np.array([np.cos(angle), np.sin(angle)])])
    if shape_type == "rectangle":
        half = radius * rng.uniform([0.6, 0.6], [1.2, 1.2])
        corners = np.array([centre - half, centre + half])
    else:
        theta = np.linspace(0, 2 * np.pi, 28, endpoint=False)
        r = np.ones_like(theta)
        for k in range(2, 6):
            r += rng.uniform(0, 0.2 / k * 2) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
        stretch = np.array([1.0, rng.uniform(0.6, 1.0)]) * radius
        corners = _rotate(np.stack([np.cos(theta), np.sin(theta)], 1) * r[:, None] * stretch, rng)
        corners += centre
    return corners


def _leaf_outline(rng: np.random.Generator, centre: np.ndarray, radius: float) -> np.ndarray:
    t = np.linspace(-1, 1, 14)
    half_width = radius * rng.uniform(0.35, 0.5) * (1 - t**2) ** 0.7 * (1 + 0.3 * t)
    along = t * radius * 1.4
    upper = np.stack([along, half_width], 1)
    lower = np.stack([along[::-1], -half_width[::-1]], 1)[1:-1]
    return _rotate(np.concatenate([upper, lower]), rng) + centre


def _grass_blade(rng: np.random.Generator, near: np.ndarray, side: int) -> np.ndarray:
    base = near + rng.normal(0, 0.08 * side, 2)
    angle = -np.pi / 2 + rng.uniform(-0.6, 0.6)
    length, half = rng.uniform(0.25, 0.45) * side, rng.uniform(0.03, 0.05) * side
    axis = np.array([np.cos(angle), np.sin(angle)])
    normal = np.array([-axis[1], axis[0]])
    bend = normal * rng.uniform(-0.15, 0.15) * length
    points = [
        base - half * normal,
        base + 0.5 * length * axis + 0.35 * bend - 0.6 * half * normal,
        base + length * axis + bend,
        base + 0.5 * length * axis + 0.35 * bend + 0.6 * half * normal,
        base + half * normal,
    ]
    return np.array(points)


def _rotate(points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    a = rng.uniform(0, np.pi)
    return points @ np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])


def _coverage(shape_type: str, points: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Anti-aliased float coverage in [0, 1] of a shape, as a camera would see its edge."""
    canvas = np.zeros(size, np.uint8)
    fixed = np.round(np.asarray(points) * 16).astype(np.int32)  # 4 fractional bits
    if shape_type == "circle":
        radius = int(round(np.linalg.norm(points[1] - points[0]) * 16))
        cv2.circle(canvas, tuple(fixed[0]), radius, 255, -1, cv2.LINE_AA, shift=4)
    else:
        if shape_type == "rectangle":
            (x0, y0), (x1, y1) = fixed
            fixed = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.int32)
        cv2.fillPoly(canvas, [fixed], 255, cv2.LINE_AA, shift=4)
    return canvas.astype(np.float32) / 255


def _stone_texture(rng, size, alpha, colours, centre) -> np.ndarray:
    """Smooth colour variation, dome shading (bright middle, dark rim) and a lit side."""
    t = 1 / (1 + np.exp(-_noise(rng, size, 0.3 * min(size))))
    colour = colours[0] * (1 - t[..., None]) + colours[1] * t[..., None]
    inside = (alpha > 0.5).astype(np.uint8)
    depth = cv2.distanceTransform(inside, cv2.DIST_L2, 3) / (0.04 * min(size))
    light = rng.normal(size=2)
    y, x = np.mgrid[: size[0], : size[1]]
    side = ((x - centre[0]) * light[0] + (y - centre[1]) * light[1]) / np.hypot(*light)
    side /= min(size)
    shade = 0.7 + 0.4 * np.sqrt(np.clip(depth, 0, 1)) - 0.6 * side
    return colour * shade[..., None]


def _leaf_texture(rng, size, alpha, colours, centre) -> np.ndarray:
    """Veins at 45 degrees to a dark midrib, along the leaf's main axis."""
    inside = (alpha > 0.5).astype(np.uint8)
    y, x = np.nonzero(inside)
    if len(x) < 3:
        return np.broadcast_to(colours[0], (*size, 3))
    coords = np.stack([x - x.mean(), y - y.mean()], 1)
    axis = np.linalg.eigh(coords.T @ coords)[1][:, 1]  # main axis of the pixel cloud
    gy, gx = np.mgrid[: size[0], : size[1]]
    along = (gx - x.mean()) * axis[0] + (gy - y.mean()) * axis[1]
    across = -(gx - x.mean()) * axis[1] + (gy - y.mean()) * axis[0]
    period = rng.uniform(0.05, 0.07) * min(size)
    veins = np.cos(2 * np.pi * (along + np.abs(across)) / period)
    colour = colours[0] + (colours[1] - colours[0]) * (0.5 + 0.4 * veins)[..., None]
    midrib = np.exp(-((across / (0.012 * min(size))) ** 2))
    return colour * (1 - 0.35 * midrib)[..., None]


def _illumination(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """A soft brightness gradient across the whole image."""
    height, width = size
    direction = rng.normal(size=2)
    y, x = np.mgrid[:height, :width]
    ramp = ((x / width - 0.5) * direction[0] + (y / height - 0.5) * direction[1]) / np.hypot(
        *direction
    )
    return 1.0 + rng.uniform(0.1, 0.3) * ramp
