"""Synthetic demo dataset: LabelMe-compatible files, determinism, content properties."""

from __future__ import annotations

import json

import numpy as np
import pytest

from segpipe import SegpipeError
from segpipe.data.labelme import load_annotation, rasterise
from segpipe.labels import Labels

GRASS_ERASES = Labels.from_config(background=["grass"])
from segpipe.data.synthetic import write_dataset
from segpipe.files import demo_files

SHAPE_KEYS = {"label", "points", "group_id", "description", "shape_type", "flags", "mask"}
FILE_KEYS = {"version", "flags", "shapes", "imagePath", "imageData", "imageHeight", "imageWidth"}


@pytest.fixture(scope="module")
def twenty(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synth") / "twenty"
    write_dataset(folder, count=20, seed=0, size=(48, 64))
    return [load_annotation(p) for p in sorted(folder.glob("*.json"))]


def test_files_are_labelme_output(labelme_folder):
    names = sorted(p.name for p in labelme_folder.iterdir())
    assert names == [f"synth_{i:04d}.{ext}" for i in range(6) for ext in ("jpg", "json")]
    document = json.loads((labelme_folder / "synth_0002.json").read_text())
    assert set(document) == FILE_KEYS and document["imagePath"] == "synth_0002.jpg"
    assert (document["imageHeight"], document["imageWidth"]) == (48, 64)
    assert all(set(shape) == SHAPE_KEYS for shape in document["shapes"])


def test_every_image_has_1_to_3_objects_and_foreground(twenty):
    for annotation in twenty:
        assert annotation.size == (48, 64)
        objects = [s for s in annotation.shapes if s.label != "grass"]
        assert 1 <= len(objects) <= 3
        assert {s.label for s in objects} <= {"stone", "leaf"}
        assert rasterise(annotation, labels=GRASS_ERASES).any()


def test_shape_types_borders_and_erasing_grass_occur(twenty):
    assert {s.shape_type for a in twenty for s in a.shapes} == {"polygon", "circle", "rectangle"}
    on_border = [
        a for a in twenty
        if any(((s.points == 0) | (s.points == [63, 47])).any() for s in a.shapes)
    ]
    assert len(on_border) >= 5
    erased = [
        a for a in twenty
        if (rasterise(a, labels=GRASS_ERASES)
            < rasterise(a, labels=Labels.from_config(foreground=["stone", "leaf"]))).any()
    ]
    assert erased


def test_colour_alone_does_not_separate_objects(twenty):
    # Best pooled Dice of a quadratic RGB classifier fitted by least squares on the very
    # pixels it is scored on, against always predicting foreground (0.26 here).
    rgb = np.concatenate([a.image.reshape(-1, 3) for a in twenty]) / 255.0
    truth = np.concatenate([rasterise(a, labels=GRASS_ERASES).ravel() for a in twenty])
    features = np.column_stack([rgb, rgb**2, rgb * np.roll(rgb, 1, axis=1), np.ones(len(rgb))])
    score = features @ np.linalg.lstsq(features, truth, rcond=None)[0]
    predictions = [score > threshold for threshold in (0.2, 0.3, 0.5)]
    dice = [2 * (truth & p).sum() / (p.sum() + truth.sum()) for p in predictions]
    assert max(dice) < 0.45
    assert 2 * truth.mean() / (1 + truth.mean()) < 0.3


def test_deterministic_and_independent_of_count(labelme_folder, tmp_path):
    write_dataset(tmp_path / "again", count=2, seed=0, size=(48, 64))
    for name in ("synth_0000.jpg", "synth_0001.json", "synth_0001.jpg"):
        assert (tmp_path / "again" / name).read_bytes() == (labelme_folder / name).read_bytes()
    write_dataset(tmp_path / "other", count=1, seed=1, size=(48, 64))
    assert (tmp_path / "other" / "synth_0000.jpg").read_bytes() != (
        labelme_folder / "synth_0000.jpg"
    ).read_bytes()


def test_output_folder_rules(labelme_folder, tmp_path):
    assert sorted(demo_files(labelme_folder, 6)) == sorted(map(str, labelme_folder.iterdir()))
    write_dataset(labelme_folder, count=2, size=(48, 64))  # an earlier demo dataset: replaced
    assert sorted(map(str, labelme_folder.iterdir())) == sorted(demo_files(labelme_folder, 2))
    (labelme_folder / "notes.txt").write_text("mine")
    with pytest.raises(SegpipeError, match="exists and holds more than an earlier demo dataset"):
        write_dataset(labelme_folder, count=1)
    (tmp_path / "empty").mkdir()
    write_dataset(tmp_path / "empty", count=1, size=(32, 32))
    assert len(list((tmp_path / "empty").iterdir())) == 2
    with pytest.raises(SegpipeError, match="count must be at least 1"):
        write_dataset(tmp_path / "none", count=0)
    with pytest.raises(SegpipeError, match="at least 32x32"):
        write_dataset(tmp_path / "tiny", count=1, size=(16, 64))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "labelme"]
