"""LabelMe parsing and rasterisation: exact masks on hand-computed cases, images, errors."""

from __future__ import annotations

import base64
import io
import json
import re

import cv2
import numpy as np
import PIL.Image
import pytest

from segpipe import SegpipeError
from segpipe.data.labelme import (Simplification, is_unedited_prediction, labelme_document,
                                  load_annotation, mask_shapes, rasterise)
from segpipe.labels import Labels


def box(rows: slice, cols: slice, size=(8, 8)) -> np.ndarray:
    mask = np.zeros(size, np.uint8)
    mask[rows, cols] = 1
    return mask


def disc(centre, squared_radius, size) -> np.ndarray:
    rows, cols = np.mgrid[: size[0], : size[1]]
    return ((rows - centre[1]) ** 2 + (cols - centre[0]) ** 2 <= squared_radius).astype(np.uint8)


def mask_of(make_labelme, *shapes, size=None, image=None, **rule) -> np.ndarray:
    return rasterise(load_annotation(make_labelme(shapes, image=image)), size,
                     Labels.from_config(**rule))


# --- exact masks at the original size (LabelMe fills shape and outline) -------------------

def test_rectangle_includes_both_corners(make_labelme):
    mask = mask_of(make_labelme, ("a", "rectangle", [[4, 3], [1, 1]]))
    assert mask.dtype == np.uint8 and mask.sum() == 4 * 3
    np.testing.assert_array_equal(mask, box(slice(1, 4), slice(1, 5)))


def test_triangle_includes_its_hypotenuse(make_labelme):
    mask = mask_of(make_labelme, ("a", "polygon", [[1, 1], [6, 1], [1, 6]]))
    rows, cols = np.mgrid[:8, :8]
    expected = (rows >= 1) & (cols >= 1) & (rows + cols <= 7)
    assert mask.sum() == 6 + 5 + 4 + 3 + 2 + 1
    np.testing.assert_array_equal(mask, expected)


def test_circle_from_centre_and_rim_point(make_labelme):
    mask = mask_of(make_labelme, ("a", "circle", [[3, 3], [3, 5]]))
    assert mask.sum() == 21  # pixels within sqrt(5) of the centre, radius 2
    np.testing.assert_array_equal(mask, disc((3, 3), 5, (8, 8)))


def test_oriented_rectangle_is_a_filled_polygon(make_labelme):
    mask = mask_of(make_labelme, ("a", "oriented_rectangle", [[1, 1], [4, 1], [4, 3], [1, 3]]))
    np.testing.assert_array_equal(mask, box(slice(1, 4), slice(1, 5)))


def test_missing_shape_type_means_polygon(make_labelme):
    legacy = {"label": "a", "points": [[1, 1], [4, 1], [4, 3], [1, 3]], "line_color": None}
    np.testing.assert_array_equal(mask_of(make_labelme, legacy), box(slice(1, 4), slice(1, 5)))


def test_mask_shape_pastes_its_patch_at_the_first_point(make_labelme):
    patch = np.array([[1, 0, 1], [1, 1, 0]], np.uint8) * 255
    encoded = base64.b64encode(cv2.imencode(".png", patch)[1].tobytes()).decode()
    shape = {"label": "a", "shape_type": "mask", "points": [[2, 1], [4, 2]], "mask": encoded}
    expected = np.zeros((8, 8), np.uint8)
    expected[1:3, 2:5] = patch > 0
    np.testing.assert_array_equal(mask_of(make_labelme, shape), expected)


def test_background_label_erases_in_file_order(make_labelme):
    square = ("object", "rectangle", [[1, 1], [6, 6]])
    hole = ("hole", "rectangle", [[3, 3], [4, 4]])
    erased = mask_of(make_labelme, square, hole, background=["hole"])
    expected = box(slice(1, 7), slice(1, 7)) - box(slice(3, 5), slice(3, 5))
    np.testing.assert_array_equal(erased, expected)
    assert erased.sum() == 36 - 4
    drawn_first = mask_of(make_labelme, hole, square, background=["hole"])
    np.testing.assert_array_equal(drawn_first, box(slice(1, 7), slice(1, 7)))


def test_foreground_selects_labels_and_others_are_ignored(make_labelme):
    shapes = (("a", "rectangle", [[0, 0], [1, 1]]), ("b", "rectangle", [[5, 5], [6, 6]]))
    only_a = mask_of(make_labelme, *shapes, foreground=["a"])
    np.testing.assert_array_equal(only_a, box(slice(0, 2), slice(0, 2)))
    every = mask_of(make_labelme, *shapes)
    assert every.sum() == 8


def test_lines_and_points_are_skipped_and_counted_whatever_their_points(make_labelme):
    shapes = (
        ("a", "line", [[0, 0], [7, 7]]),
        ("a", "line", []),
        ("a", "linestrip", [[0, 0], [7, 0], [7, 7]]),
        ("a", "point", [[3, 3]]),
        ("a", "point", [["x", True]]),
        ("a", "rectangle", [[0, 0], [1, 1]]),
        {"label": "a", "shape_type": "polygon_with_hole"},  # unknown type, no points at all
    )
    annotation = load_annotation(make_labelme(shapes))
    assert annotation.skipped == {"line": 2, "linestrip": 1, "point": 2, "polygon_with_hole": 1}
    assert [s.shape_type for s in annotation.shapes] == ["rectangle"]
    assert rasterise(annotation).sum() == 4


# --- rasterisation at another size -----------------------------------------------------

def test_scaled_rectangle_covers_the_pixel_centres_inside(make_labelme):
    # x' = (x + 0.5) / 2 - 0.5 from 16x16 to 8x8: 2.9 -> 1.2, 11.1 -> 5.3, 7.1 -> 3.3;
    # centres 2..5 (x) and 2..3 (y) lie inside.
    rectangle = ("a", "rectangle", [[2.9, 2.9], [11.1, 7.1]])
    path = make_labelme([rectangle], image=np.zeros((16, 16, 3)))
    mask = rasterise(load_annotation(path), (8, 8))
    np.testing.assert_array_equal(mask, box(slice(2, 4), slice(2, 6)))


def test_scaled_triangle_covers_the_pixel_centres_inside(make_labelme):
    # 20x20 -> 10x10 maps 1.5 -> 0.5 and 17.9 -> 8.7: the triangle x >= 0.5, y >= 0.5,
    # x + y <= 9.2 holds the centres with row, col >= 1 and row + col <= 9.
    triangle = [[1.5, 1.5], [17.9, 1.5], [1.5, 17.9]]
    path = make_labelme([("a", "polygon", triangle)], image=np.zeros((20, 20, 3)))
    mask = rasterise(load_annotation(path), (10, 10))
    rows, cols = np.mgrid[:10, :10]
    np.testing.assert_array_equal(mask, (rows >= 1) & (cols >= 1) & (rows + cols <= 9))
    assert mask.sum() == 8 * 9 // 2


def test_scaled_circle_becomes_an_ellipse_with_the_aspect_ratio(make_labelme):
    # Centre (16.5, 8) of a 16x32 image -> (8, 8) at 16x16; radius 4.2 -> 2.1 in x, 4.2 in y:
    # 9 centres in the middle column, 7 in the columns 7 and 9, 3 in the columns 6 and 10.
    image = np.zeros((16, 32, 3))
    path = make_labelme([("a", "circle", [[16.5, 8], [16.5, 12.2]])], image=image)
    mask = rasterise(load_annotation(path), (16, 16))
    np.testing.assert_array_equal(mask.sum(axis=0)[5:12], [0, 3, 7, 9, 7, 3, 0])
    assert mask[:, 8].nonzero()[0].tolist() == list(range(4, 13))


def test_scaled_mask_agrees_with_the_downsampled_full_size_mask(make_labelme):
    shapes = [("a", "circle", [[100, 90], [160, 90]]),
              ("a", "polygon", [[5, 5], [80, 20], [20, 150]])]
    annotation = load_annotation(make_labelme(shapes, image=np.zeros((200, 200, 3))))
    full = rasterise(annotation)
    np.testing.assert_array_equal(rasterise(annotation, (200, 200)), full)
    small = rasterise(annotation, (50, 50))
    coverage = cv2.resize(full.astype(np.float32), (50, 50), interpolation=cv2.INTER_AREA)
    assert np.all(small[coverage == 1] == 1) and np.all(small[coverage == 0] == 0)
    # Half a source pixel less along the outline than LabelMe's mask, which includes it.
    assert abs(int(small.sum()) - coverage.sum()) < 0.03 * coverage.sum()


def test_scaled_mask_patch_takes_nearest_pixels(make_labelme):
    patch = np.zeros((4, 4), np.uint8)
    patch[:2, :2] = 255  # top-left 2x2 of a 4x4 patch at (4, 4) of a 16x16 image
    encoded = base64.b64encode(cv2.imencode(".png", patch)[1].tobytes()).decode()
    shape = {"label": "a", "shape_type": "mask", "points": [[4, 4], [7, 7]], "mask": encoded}
    annotation = load_annotation(make_labelme([shape], image=np.zeros((16, 16, 3))))
    np.testing.assert_array_equal(rasterise(annotation, (8, 8)), box(slice(2, 3), slice(2, 3)))


# --- images -------------------------------------------------------------------------

def test_embedded_image_data_is_used_when_the_file_is_missing(make_labelme):
    image = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    annotation = load_annotation(make_labelme([], image=image, embed=True, imagePath="gone.png"))
    np.testing.assert_array_equal(annotation.image, image)
    assert annotation.size == (4, 6)


def test_embedded_image_data_takes_precedence_over_the_file(make_labelme, tmp_path):
    path = make_labelme([], image=np.full((4, 6, 3), 7, np.uint8), embed=True)
    cv2.imwrite(str(tmp_path / "image.png"), np.full((4, 6, 3), 200, np.uint8))
    assert (load_annotation(path).image == 7).all()


def test_windows_image_path_relative_to_the_json(make_labelme, tmp_path):
    (tmp_path / "pics").mkdir()
    cv2.imwrite(str(tmp_path / "pics" / "a.png"), np.full((4, 6, 3), 9, np.uint8))
    path = make_labelme([], image=np.zeros((4, 6, 3)), name="ref", imagePath="pics\\a.png")
    assert (load_annotation(path).image == 9).all()


def _png_with_orientation(pixels: np.ndarray, orientation: int) -> bytes:
    exif = PIL.Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="PNG", exif=exif.tobytes())
    return buffer.getvalue()


def test_exif_orientation_applied_to_files_not_to_embedded_data(make_labelme, tmp_path):
    pixels = np.zeros((2, 3, 3), np.uint8)
    pixels[0, 0] = 255  # top-left; orientation 6 = display rotated 90 degrees clockwise
    encoded = _png_with_orientation(pixels, 6)
    (tmp_path / "photo.png").write_bytes(encoded)
    path = make_labelme([], image=np.zeros((3, 2, 3)), name="file", imagePath="photo.png")
    rotated = load_annotation(path).image
    assert rotated.shape == (3, 2, 3) and rotated[0, 1].tolist() == [255, 255, 255]
    assert rotated.sum() == 3 * 255
    embedded = make_labelme([], image=np.zeros((2, 3, 3)), name="embedded", embed=True,
                            imageData=base64.b64encode(encoded).decode())
    np.testing.assert_array_equal(load_annotation(embedded).image, pixels)


@pytest.mark.parametrize(
    ("pixels", "expected"),
    [
        (np.full((2, 2), 100, np.uint8), (100, 100, 100)),  # grayscale
        (np.full((2, 2), 51400, np.uint16), (200, 200, 200)),  # 16-bit: 51400 / 257
        (np.full((2, 2, 3), (65535, 257, 0), np.uint16), (0, 1, 255)),  # 16-bit BGR
        (np.full((2, 2, 4), (30, 20, 10, 0), np.uint8), (10, 20, 30)),  # BGRA, alpha dropped
    ],
)
def test_images_become_8_bit_rgb(make_labelme, tmp_path, pixels, expected):
    cv2.imwrite(str(tmp_path / "odd.png"), pixels)
    path = make_labelme([], image=np.zeros((2, 2, 3)), name="ref", imagePath="odd.png")
    image = load_annotation(path).image
    assert image.dtype == np.uint8 and image.shape == (2, 2, 3)
    assert (image == expected).all()


def test_palette_image_becomes_rgb(make_labelme, tmp_path):
    palette = PIL.Image.fromarray(np.array([[0, 1]], np.uint8), mode="P")
    palette.putpalette([10, 20, 30, 200, 100, 50])
    palette.save(tmp_path / "p.png")
    path = make_labelme([], image=np.zeros((1, 2, 3)), name="ref", imagePath="p.png")
    assert load_annotation(path).image.tolist() == [[[10, 20, 30], [200, 100, 50]]]


# --- bad input: SegpipeError naming the file ----------------------------------------

def _error(path) -> str:
    with pytest.raises(SegpipeError) as info:
        load_annotation(path)
    message = str(info.value)
    assert str(path) in message
    return message


def test_invalid_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"shapes": [')
    assert "not valid JSON" in _error(path)


def test_unreadable_json(tmp_path):
    path = tmp_path / "folder.json"
    path.mkdir()
    assert "cannot read" in _error(path)


def test_json_that_is_not_labelme(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"images": []}))
    assert "not a LabelMe file" in _error(path)


def test_missing_image_without_image_data(make_labelme, tmp_path):
    path = make_labelme([], imagePath="absent.png")
    assert "absent.png not found and no imageData" in _error(path)


def test_undecodable_image(make_labelme, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert "not a readable image" in _error(make_labelme([], name="x", imagePath="bad.png"))
    assert "imageData" in _error(make_labelme([], name="y", imageData="bm90IGFuIGltYWdl"))


def test_empty_mask_patch(make_labelme):
    shape = {"label": "a", "shape_type": "mask", "points": [[2, 1], [4, 2]], "mask": "===="}
    assert "shape 0 ('a', mask): 'mask': empty (0 bytes)" in _error(make_labelme([shape]))


def test_polygon_with_fewer_than_3_points(make_labelme):
    message = _error(make_labelme([("leaf", "polygon", [[1, 1], [5, 5]])]))
    assert "shape 0 ('leaf', polygon): has 2 points" in message


def test_rectangle_with_wrong_point_count(make_labelme):
    assert "expected 2" in _error(make_labelme([("a", "rectangle", [[1, 1], [2, 2], [3, 3]])]))


@pytest.mark.parametrize(
    "points",
    [
        [[1, "x"], [2, 2], [3]],
        [[1, 1], [5, 1], [1, 10**400]],  # an integer beyond the float range
        [[1, 1], [5, 1], [1, float("nan")]],
        [],
        {"x": 1},
    ],
)
def test_points_that_are_not_numbers(make_labelme, points):
    # Strings and booleans: tests/test_cli_bad_input.py.
    message = _error(make_labelme([("a", "polygon", points)]))
    assert "shape 0 ('a', polygon): 'points' must be a list of [x, y] numbers" in message


def test_shape_type_that_is_not_a_string(make_labelme):
    message = _error(make_labelme([{"label": "a", "shape_type": ["line"], "points": []}]))
    assert "shape 0: 'shape_type' ['line'] is not a string" in message


def test_point_far_outside_the_image(make_labelme):
    message = _error(make_labelme([("a", "polygon", [[1, 1], [40, 1], [1, 6]])]))
    assert "(40, 1) lies far outside the 8x8 image" in message


def test_points_of_a_one_pixel_image_lie_in_its_extent_or_a_pixel_beyond(make_labelme):
    # LabelMe coordinates are continuous: a 1x1 image spans [0, 1] x [0, 1]; 10 % of it is
    # less than a pixel, so one pixel beyond is accepted.
    pixel = np.zeros((1, 1, 3), np.uint8)
    mask = mask_of(make_labelme, ("a", "polygon", [[0, 0], [0.5, 0], [0.5, 1]]), image=pixel)
    np.testing.assert_array_equal(mask, [[1]])
    assert mask_of(make_labelme, ("a", "rectangle", [[-1, -1], [2, 2]]), image=pixel).all()
    message = _error(make_labelme([("a", "polygon", [[0, 0], [2.5, 0], [0, 1]])], image=pixel))
    assert "(2.5, 0) lies far outside the 1x1 image" in message


def test_point_slightly_outside_the_image_is_clipped(make_labelme):
    mask = mask_of(make_labelme, ("a", "rectangle", [[-0.5, -0.5], [7.6, 1]]))
    np.testing.assert_array_equal(mask, box(slice(0, 2), slice(0, 8)))


def test_image_size_mismatch(make_labelme):
    assert "8x9 does not match the image, 8x8" in _error(make_labelme([], imageWidth=9))
    path = make_labelme([], image=np.zeros((4, 6, 3)), imageHeight=6, imageWidth=4)
    assert "swapped" in _error(path)


def test_label_both_foreground_and_background():
    with pytest.raises(SegpipeError, match=r"label 'a' is given two roles \(foreground and "
                                           r"background\)"):
        Labels.from_config(foreground=["a", "b"], background=["a"])


# --- writing: predicted class maps as LabelMe polygons ------------------------------------

EXACT = Simplification(tolerance=0, min_area=0)


def written_back(shapes, size, tmp_path, labels: Labels) -> np.ndarray:
    """The class map segpipe's rasteriser paints from a written LabelMe file of ``shapes``."""
    image = tmp_path / "image.png"
    cv2.imwrite(str(image), np.zeros((*size, 3), np.uint8))
    path = tmp_path / "predicted" / "image.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(labelme_document(shapes, image, path, size)))
    return rasterise(load_annotation(path), None, labels)


def test_a_ring_with_an_island_in_its_hole(tmp_path):
    """A 7x7 square of class 1 with a 3x3 hole holding a one-pixel island of class 2: the
    square's 4 corners, then its hole (the background label, erasing), then the island."""
    classes = np.zeros((10, 10), np.uint8)
    classes[1:8, 2:9] = 1
    classes[3:6, 4:7] = 0
    classes[4, 5] = 2
    labels = Labels(("ring", "dot"), (("ring",), ("dot", "spot")), ("_background_",),
                    configured=True)
    shapes = mask_shapes(classes, labels, EXACT)
    assert [s["label"] for s in shapes] == ["ring", "_background_", "dot"]
    assert shapes[0]["points"] == [[2.0, 1.0], [2.0, 7.0], [8.0, 7.0], [8.0, 1.0]]
    assert sorted(map(tuple, shapes[1]["points"])) == [(4.0, 3.0), (4.0, 5.0), (6.0, 3.0),
                                                       (6.0, 5.0)]
    assert len(shapes[2]["points"]) == 3  # one pixel: its point, repeated to a polygon
    assert all(s["shape_type"] == "polygon" and s["flags"] == {"predicted": True}
               for s in shapes)
    np.testing.assert_array_equal(written_back(shapes, classes.shape, tmp_path, labels), classes)


def test_min_area_drops_small_regions_and_fills_small_holes(tmp_path):
    classes = np.zeros((12, 12), np.uint8)
    classes[1:9, 1:9] = 1
    classes[4, 4] = 0                 # a hole of 1 pixel
    classes[10:12, 10:12] = 1         # a region of 4 pixels
    shapes = mask_shapes(classes, Labels(), Simplification(tolerance=0, min_area=5))
    assert [s["label"] for s in shapes] == ["foreground"]
    expected = np.zeros_like(classes)
    expected[1:9, 1:9] = 1
    np.testing.assert_array_equal(
        written_back(shapes, classes.shape, tmp_path, Labels(background=("_background_",))),
        expected)


def test_the_hole_label_is_the_studys_background_label():
    classes = np.zeros((9, 9), np.uint8)
    classes[1:8, 1:8] = 1
    classes[3:6, 3:6] = 0
    labels = Labels.from_config(foreground=["leaf"], background=["grass", "sky"])
    assert [s["label"] for s in mask_shapes(classes, labels, EXACT)] == ["leaf", "grass"]


def test_a_binary_study_refuses_the_hole_label_as_foreground():
    """Without data.background, `_background_` (the holes of predicted files) would paint
    foreground in a binary study: it must be named a background label."""
    assert Labels().unnamed(["cat", "_background_"]) == ["_background_"]
    # with data.foreground it would not be drawn at all: the holes stay filled
    assert Labels.from_config(foreground=["cat"]).unnamed(["cat", "_background_"]) == [
        "_background_"]
    assert Labels(background=("_background_",)).unnamed(["cat", "_background_"]) == []


@pytest.mark.parametrize("classes", [None, ["leaf", "stone"]], ids=["binary", "classes"])
def test_round_trip_of_the_demo_test_images(tmp_path, classes):
    """The demo's test images (the synthetic data of config.yaml: 16 at 192x256, seed 1),
    their masks at the original size written as LabelMe polygons with the default
    simplification and rasterised back: per class IoU >= 0.99 on every image."""
    from segpipe.data.synthetic import write_dataset

    write_dataset(tmp_path / "demo", count=16, seed=1, size=(192, 256))
    labels = Labels.from_config(classes, background=["grass"])
    reader = Labels.from_config(classes, background=["grass"])  # grass: the hole label
    ious = []
    for path in sorted((tmp_path / "demo").glob("*.json")):
        truth = rasterise(load_annotation(path), None, labels)
        back = written_back(mask_shapes(truth, labels), truth.shape, tmp_path, reader)
        for value in range(1, labels.outputs if not labels.binary else 2):
            a, b = truth == value, back == value
            if a.any() or b.any():
                ious.append((a & b).sum() / (a | b).sum())
    assert len(ious) >= 16 and min(ious) >= 0.99, (len(ious), min(ious))


def test_an_edited_prediction_is_told_from_an_unedited_one(tmp_path):
    classes = np.zeros((9, 9), np.uint8)
    classes[2:7, 2:7] = 1
    shapes = mask_shapes(classes, Labels(), EXACT)
    document = labelme_document(shapes, tmp_path / "x.png", tmp_path / "x.json", (9, 9))
    resaved = json.loads(json.dumps(document).replace("2.0", "2"))  # ints: as LabelMe may save
    assert is_unedited_prediction(document) and is_unedited_prediction(resaved)
    moved = json.loads(json.dumps(document))
    moved["shapes"][0]["points"][0] = [1.5, 2.0]  # one point dragged
    relabelled = json.loads(json.dumps(document))
    relabelled["shapes"][0]["label"] = "cat"
    added = json.loads(json.dumps(document))
    added["shapes"].append({**shapes[0], "label": "dog"})
    reviewed = json.loads(json.dumps(document))
    reviewed["shapes"][0]["flags"]["predicted"] = False  # an annotator's tick
    described = json.loads(json.dumps(document))
    described["shapes"][0]["description"] = "checked"
    flagged = json.loads(json.dumps(document))
    flagged["flags"] = {"done": True}
    human = {k: v for k, v in document.items() if k != "segpipe"}
    for edited in (moved, relabelled, added, reviewed, described, flagged, human, None,
                   {"segpipe": 1, "shapes": []}):
        assert not is_unedited_prediction(edited)
