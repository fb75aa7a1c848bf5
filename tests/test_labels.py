"""The labels object: classes from the config, mask values, columns, palette, painting."""

from __future__ import annotations

import numpy as np
import pytest

from segpipe import SegpipeError
from segpipe.data.labelme import load_annotation, rasterise
from segpipe.labels import IGNORE, Labels, voc_colour


def test_binary_is_the_one_class_case():
    labels = Labels.from_config(background=["grass"])
    assert (labels.binary, labels.outputs, labels.activation, labels.prediction) == (
        True, 1, "sigmoid", "threshold")
    assert labels.class_columns("dice") == [] and labels.per_image_columns() == []
    assert labels.value("grass") == 0 and labels.value("anything") == 1
    assert labels.to_dict() is None  # the binary study stores nothing new
    assert labels.attrs() == {"foreground": "null", "background": '["grass"]'}
    assert Labels.from_attrs(labels.attrs()) == labels


def test_classes_with_merged_labels():
    labels = Labels.from_config(["leaf", {"rock": ["stone", "pebble"]}], background=["grass"],
                                ignore=["__ignore__"])
    assert labels.names == ("leaf", "rock") and labels.class_names == ("background", "leaf", "rock")
    assert (labels.outputs, labels.activation, labels.prediction) == (3, "softmax", "argmax")
    assert [labels.value(x) for x in ("leaf", "stone", "pebble", "grass", "__ignore__", "cat")
            ] == [1, 2, 2, 0, IGNORE, None]
    assert labels.unnamed(["leaf", "cat", "grass", "dog"]) == ["cat", "dog"]
    assert labels.class_columns("iou") == ["iou.leaf", "iou.rock"]
    assert labels.per_image_columns()[:2] == ["dice.leaf", "dice.rock"]
    assert labels.per_image_columns()[-2:] == ["pred.leaf", "pred.rock"]
    assert Labels.from_attrs(labels.attrs()) == labels
    assert Labels.from_dict(labels.to_dict()) == labels
    assert Labels.from_columns(["name", "dice", "dice.leaf", "iou.leaf", "dice.rock"]).names == (
        "leaf", "rock")


def test_predict_thresholds_or_takes_the_argmax():
    probs = np.array([[0.2, 0.5], [0.7, 0.49]])
    np.testing.assert_array_equal(Labels().predict(probs, 0.5), [[0, 1], [1, 0]])
    several = np.stack([1 - probs, probs * 0.6, probs * 0.4])
    np.testing.assert_array_equal(Labels(("a", "b")).predict(several), [[0, 0], [1, 0]])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"classes": ["leaf"], "foreground": ["leaf"]}, "exclude each other"),
    ({"classes": ["leaf", "leaf"]}, "class 'leaf' named twice"),
    ({"classes": ["leaf", {"rock": ["leaf"]}]}, "label 'leaf' is given two roles"),
    ({"classes": ["leaf"], "background": ["leaf"]}, r"two roles \(class leaf and background\)"),
    ({"classes": ["leaf"], "ignore": ["leaf"]}, r"two roles \(class leaf and ignore\)"),
    ({"classes": ["potted plant"]}, r"'potted plant' is not a class name .*\{potted_plant: \["),
    ({"classes": ["background"]}, "not a class name"),
    ({"classes": [{"rock": "stone"}]}, r"classes\[0\]: expected a label or \{name: \[labels\]\}"),
    ({"classes": [{"a": ["x"], "b": ["y"]}]}, r"classes\[0\]"),
    ({"classes": []}, "1 to 254 classes"),
])
def test_bad_classes_are_refused(kwargs, message):
    with pytest.raises(SegpipeError, match=message):
        Labels.from_config(**kwargs)


def test_voc_palette():
    """The colours LabelMe's VOC export writes: labelme2voc.py's colour map."""
    assert [voc_colour(i) for i in range(6)] == [(0, 0, 0), (128, 0, 0), (0, 128, 0),
                                                 (128, 128, 0), (0, 0, 128), (128, 0, 128)]
    assert voc_colour(255) == (224, 224, 192)
    assert len(set(Labels().palette())) == 256


def test_painting_follows_labelmes_voc_export(make_labelme):
    """Overlapping rectangles on an 8x8 image, painted in file order: leaf, then stone over
    it, grass (background) erasing part of both, ignore on top, then leaf again."""
    shapes = [("leaf", "rectangle", [[0, 0], [4, 4]]),     # rows/cols 0-4: leaf
              ("stone", "rectangle", [[3, 3], [6, 6]]),    # 3-6: stone, over the leaf
              ("grass", "rectangle", [[2, 2], [3, 3]]),    # 2-3: erased to background
              ("void", "rectangle", [[6, 0], [7, 1]]),     # cols 6-7, rows 0-1: ignore
              ("leaf", "rectangle", [[6, 6], [7, 7]])]     # 6-7 corner: leaf over stone
    labels = Labels.from_config(["leaf", "stone"], background=["grass"], ignore=["void"])
    mask = rasterise(load_annotation(make_labelme(shapes)), labels=labels)
    expected = np.zeros((8, 8), np.uint8)
    expected[0:5, 0:5] = 1
    expected[3:7, 3:7] = 2
    expected[2:4, 2:4] = 0
    expected[0:2, 6:8] = IGNORE
    expected[6:8, 6:8] = 1
    np.testing.assert_array_equal(mask, expected)
