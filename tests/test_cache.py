"""HDF5 cache: exact round trip of hand-made LabelMe files, split, atomic output, errors."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest

from cachefile import open_stacked
from segpipe import SegpipeError, __version__
from segpipe.data.cache import build_cache
from segpipe.data.dataset import split_indices
from segpipe.data.labelme import load_annotation, load_annotations, rasterise
from segpipe.files import HOST
from segpipe.labels import Labels

ROOT = Path(__file__).resolve().parents[1]


def blocks(values: np.ndarray) -> np.ndarray:
    """An RGB image of 2x2 blocks: area-downsampling by 2 gives back ``values`` exactly."""
    return np.repeat(np.repeat(values, 2, axis=0), 2, axis=1).astype(np.uint8)


@pytest.fixture
def folder(make_labelme, tmp_path):
    """Three 8x8 / 8x12 files whose 4x4 / 4x6 masks are computed by hand in the tests."""
    rng = np.random.default_rng(0)
    small = [rng.integers(0, 256, (4, w, 3)) for w in (4, 4, 6)]
    folder = tmp_path / "in"
    # 8x8 -> 4x4 maps 1.7 -> 0.6 and 5.3 -> 2.4: centres 1..2 are inside.
    make_labelme([("obj", "rectangle", [[1.7, 1.7], [5.3, 5.3]])],
                 image=blocks(small[0]), name="a", folder=folder)
    make_labelme([("obj", "polygon", [[1.7, 1.7], [5.3, 1.7], [5.3, 5.6]]),
                  ("obj", "line", [[0, 0], [7, 7]])],
                 image=blocks(small[1]), name="b", folder=folder, embed=True)
    # 8x12 -> 4x6; the hole 3.7..5.3 -> 1.6..2.4 erases column 2 of row 2.
    make_labelme([("obj", "rectangle", [[1.7, 1.7], [9.3, 5.3]]),
                  ("hole", "rectangle", [[3.7, 3.7], [5.3, 5.3]])],
                 image=blocks(small[2]), name="c", folder=folder)
    return folder, small


def read(path):
    with open_stacked(path) as h5:
        return {key: h5[key] if isinstance(h5[key], list) else h5[key][()] for key in h5}, \
            dict(h5.attrs)


def test_round_trip_of_hand_made_files(folder, tmp_path, caplog):
    (folder, small), output = folder, tmp_path / "out" / "cache.h5"
    with caplog.at_level(logging.INFO):
        build_cache(folder, output, geometry=(4, 6), labels=Labels.from_config(background=["hole"]),
                    val_fraction=0.34)
    data, attrs = read(output)
    assert data["images"].dtype == np.uint8 and data["images"].shape == (3, 4, 6, 3)
    np.testing.assert_array_equal(data["images"][2], small[2])
    assert data["masks"].dtype == np.uint8 and data["masks"].shape == (3, 4, 6)
    expected_c = np.zeros((4, 6), np.uint8)
    expected_c[1:3, 1:5] = 1
    expected_c[2, 2] = 0
    np.testing.assert_array_equal(data["masks"][2], expected_c)
    assert [n.decode() for n in data["names"]] == ["a", "b", "c"]
    np.testing.assert_array_equal(data["orig_size"], [[8, 8], [8, 8], [8, 12]])
    assert data["orig_size"].dtype == np.int32
    assert data["is_val"].dtype == bool and data["is_val"].sum() == 1  # round(0.34 * 3)
    assert attrs["segpipe_version"] == __version__ and attrs["count"] == 3
    assert attrs["source"] == str(folder.resolve())
    assert json.loads(attrs["foreground"]) is None and json.loads(attrs["background"]) == ["hole"]
    assert attrs["size"].tolist() == [4, 6] and attrs["val_fraction"] == 0.34
    assert attrs["split_seed"] == 0
    with h5py.File(output, "r") as h5:  # squashed: one chunk per image, masks compressed
        assert h5["images/0000002"].chunks == (4, 6, 3) and h5["masks/0000002"].chunks == (4, 6)
        assert h5["masks/0000002"].compression == "gzip"
        assert h5.attrs["layout"] == 2 and "scale" not in h5.attrs
    np.testing.assert_array_equal(data["shape"], [[4, 6]] * 3)
    # the truth at the original size, LabelMe's own rule (test_labelme pins it to LabelMe's)
    labels = Labels.from_config(background=["hole"])
    for k, name in enumerate("abc"):
        truth = rasterise(load_annotation(folder / f"{name}.json"), None, labels)
        np.testing.assert_array_equal(data["truth"][k], truth)
    assert data["truth"][2].shape == (8, 12) and data["truth"][2].any()
    assert "3 images (2 train, 1 val)" in caplog.text
    assert "shapes: hole 1, obj 3" in caplog.text and "skipped (no area): line 1" in caplog.text


def test_square_images_at_their_masks(folder, tmp_path):
    (folder, small), output = folder, tmp_path / "cache.h5"
    build_cache(folder, output, geometry=(4, 4), labels=Labels.from_config(foreground=["obj"]))
    data, _ = read(output)
    np.testing.assert_array_equal(data["images"][0], small[0])
    np.testing.assert_array_equal(data["images"][1], small[1])  # from embedded imageData
    square = np.zeros((4, 4), np.uint8)
    square[1:3, 1:3] = 1
    np.testing.assert_array_equal(data["masks"][0], square)
    # The triangle lies below the line y = 1.08 x - 0.05 through its corners at 4x4.
    np.testing.assert_array_equal(data["masks"][1], np.triu(square))
    assert data["is_val"].sum() == 1  # the config's default val_fraction: 0.2 of 2, at least 1


def test_same_input_same_cache(labelme_folder, tmp_path):
    for name in ("one.h5", "two.h5"):
        build_cache(labelme_folder, tmp_path / name, (12, 16),
                    Labels.from_config(background=["grass"]), 0.5, 3)
    one, two = read(tmp_path / "one.h5")[0], read(tmp_path / "two.h5")[0]
    for key in one:
        if isinstance(one[key], list):  # images of several sizes
            assert len(one[key]) == len(two[key])
            for a, b in zip(one[key], two[key]):
                np.testing.assert_array_equal(a, b)
        else:
            np.testing.assert_array_equal(one[key], two[key])
    assert one["masks"].any() and one["is_val"].sum() == 3


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SegpipeError, match="empty: no LabelMe .json files"):
        build_cache(tmp_path / "empty", tmp_path / "out.h5", geometry=(4, 4))
    with pytest.raises(SegpipeError, match="missing: not a folder"):
        build_cache(tmp_path / "missing", tmp_path / "out.h5", geometry=(4, 4))
    assert not (tmp_path / "out.h5").exists()


def test_a_bad_file_leaves_no_output_and_keeps_the_old_one(folder, tmp_path):
    (folder, _), output = folder, tmp_path / "cache" / "out.h5"
    build_cache(folder, output, geometry=(4, 4))
    before = output.read_bytes()
    (folder / "d.json").write_text("{not json")
    with pytest.raises(SegpipeError, match=r"d\.json: not valid JSON"):
        build_cache(folder, output, geometry=(2, 2))
    assert output.read_bytes() == before
    assert [p.name for p in output.parent.iterdir()] == ["out.h5"]  # no partial file left


def test_upper_case_suffix_is_read(folder, tmp_path):
    folder = folder[0]
    (folder / "b.json").rename(folder / "b.JSON")
    build_cache(folder, tmp_path / "out.h5", geometry=(4, 4))
    data, _ = read(tmp_path / "out.h5")
    assert [n.decode() for n in data["names"]] == ["a", "b", "c"]


def test_names_that_differ_only_in_the_suffix_case_are_an_error(folder, tmp_path):
    folder = folder[0]
    (folder / "b.JSON").write_bytes((folder / "a.json").read_bytes())
    with pytest.raises(SegpipeError, match=r"b\.JSON and b\.json: two files for one image name"):
        build_cache(folder, tmp_path / "out.h5", geometry=(4, 4))


@pytest.fixture
def with_copies(make_labelme, tmp_path):
    """Seven 8x8 files: b is a copy of a (image and shape), d of c's image with another shape,
    and three more images."""
    folder = tmp_path / "copies"
    for name, value, corner in [("a", 10, 5), ("b", 10, 5), ("c", 60, 5), ("d", 60, 7),
                                ("e", 110, 5), ("f", 160, 5), ("g", 210, 5)]:
        make_labelme([("obj", "rectangle", [[1, 1], [corner, corner]])], name=name,
                     image=np.full((8, 8, 3), value, np.uint8), folder=folder)
    return folder


@pytest.mark.parametrize("split", [{"folds": 3}, {"val_fraction": 0.4}])
def test_identical_images_are_one_group_on_one_side_of_the_split(with_copies, tmp_path, caplog,
                                                                  split):
    for seed in range(4):
        build_cache(with_copies, tmp_path / "out.h5", geometry=(4, 4), split_seed=seed, **split)
        data, _ = read(tmp_path / "out.h5")
        assert [g.decode() for g in data["groups"]] == ["a", "a", "c", "c", "e", "f", "g"]
        side = data["fold"] if "folds" in split else data["is_val"]
        assert side[0] == side[1] and side[2] == side[3]
    assert len(set(data["photos"])) == 5
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING][:3]
    assert warnings == [
        f"{with_copies / 'a.json'} and {with_copies / 'b.json'}: the same photo: one group, 'a', "
        "on one side of every split",
        f"{with_copies / 'c.json'} and {with_copies / 'd.json'}: the same photo: one group, 'c', "
        "on one side of every split",
        f"{with_copies / 'c.json'} and {with_copies / 'd.json'}: the same image annotated "
        "differently (the masks differ in 24 of 8x8 pixels)"]


def test_a_rebuilt_cache_has_the_same_content_digest(with_copies, tmp_path):
    build_cache(with_copies, tmp_path / "one.h5", geometry=(4, 4), val_fraction=0.4)
    build_cache(with_copies, tmp_path / "two.h5", geometry=(4, 4), val_fraction=0.4)
    build_cache(with_copies, tmp_path / "other.h5", geometry=(4, 4), val_fraction=0.4, split_seed=1)
    digests = [read(tmp_path / f"{name}.h5")[1]["content_sha256"]
               for name in ("one", "two", "other")]
    assert digests[0] == digests[1] != digests[2]


def test_file_name_that_is_not_utf8_is_an_error_before_any_work(folder, tmp_path):
    folder = folder[0]
    os.rename(folder / "b.json", os.fsencode(folder / "b") + b"\xff.json")
    with pytest.raises(SegpipeError, match=r"/b\\xff\.json: the name is not valid UTF-8"):
        build_cache(folder, tmp_path / "cache" / "out.h5", geometry=(4, 4))
    assert not (tmp_path / "cache").exists()  # stopped before the output was touched


def test_disk_space_is_reserved_and_the_rest_given_back(folder, tmp_path):
    # 3 images of 64x64 hold 3 * 4 * 64 * 64 = 49152 bytes of pixels; 1 MiB + 1 KiB per image
    # more is reserved while the file is written, and given back when HDF5 closes it.
    output = tmp_path / "out.h5"
    build_cache(folder[0], output, geometry=(64, 64))
    assert 3 * 4 * 64 * 64 < output.stat().st_size < 3 * 4 * 64 * 64 + 64 * 1024
    data, _ = read(output)
    assert data["masks"][0].sum() > 0


def test_next_rasterise_removes_the_temporary_file_of_a_killed_one(folder, tmp_path):
    folder, output = folder[0], tmp_path / "cache" / "out.h5"
    os.mkfifo(folder / "z.png")  # reading the image of z.json blocks until one writes to it
    (folder / "z.json").write_text(json.dumps({"shapes": [], "imagePath": "z.png"}))
    command = [sys.executable, "-m", "segpipe", "rasterise", "--input", str(folder),
               "--output", str(output), "--size", "4", "4"]
    child = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.DEVNULL)
    # The first read of the image (its identity) ends, the second (rasterising it) blocks.
    with open(folder / "z.png", "wb") as fifo:
        fifo.write(cv2.imencode(".png", np.full((8, 8, 3), 123, np.uint8))[1].tobytes())
    left = output.parent / f".out@{HOST}.{child.pid}.tmp.h5"
    deadline = time.monotonic() + 60
    while not (left.exists() and left.stat().st_size > 2**20):  # reserved, writing images
        assert child.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    child.kill()  # SIGKILL: the temporary file stays
    child.wait()
    assert left.exists()
    (folder / "z.png").unlink()
    (folder / "z.json").unlink()
    build_cache(folder, output, geometry=(4, 4))
    assert list(output.parent.iterdir()) == [output]


def test_unknown_foreground_label_is_an_error(folder, tmp_path):
    with pytest.raises(SegpipeError, match=r"^data.foreground: no LabelMe file of \S+ has a "
                       r"shape labelled 'ob' \(their labels: hole, obj\)$"):
        build_cache(folder[0], tmp_path / "out.h5", geometry=(4, 4),
                    labels=Labels.from_config(foreground=["ob"]))
    assert list(tmp_path.glob("*out.h5*")) == []


def test_labels_that_never_occur_in_a_training_folder_are_an_error(folder, tmp_path):
    """The workflow's rule (a label the config names must be learnable), by hand too."""
    with pytest.raises(SegpipeError) as error:
        build_cache(folder[0], tmp_path / "out.h5", (4, 4),
                    Labels.from_config(foreground=["obj", "ob"], background=["grass"]))
    assert str(error.value) == (f"data.foreground: no LabelMe file of {folder[0]} has a shape "
                                "labelled 'ob' (their labels: hole, obj)")


@pytest.mark.parametrize("key", ["background", "ignore"])
def test_background_and_ignore_labels_that_no_file_has_are_logged(folder, tmp_path, caplog, key):
    """A file merely may hold them (e.g. _background_, the holes of corrected predictions)."""
    labels = Labels.from_config(foreground=["obj"], **{key: ["hole", "_background_"]})
    caplog.set_level(logging.INFO)
    build_cache(folder[0], tmp_path / "out.h5", (4, 4), labels)
    assert (f"data.{key}: no LabelMe file of {folder[0]} has a shape labelled '_background_' "
            "(their labels: hole, obj)") in caplog.messages


def test_only_background_labels_is_an_error(make_labelme, tmp_path):
    make_labelme([("hole", "rectangle", [[1, 1], [2, 2]])], folder=tmp_path / "in")
    with pytest.raises(SegpipeError, match="no shape paints a class"):
        build_cache(tmp_path / "in", tmp_path / "out.h5", geometry=(4, 4),
                    labels=Labels.from_config(background=["hole"]))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"geometry": (0, 4)}, "size must be positive"),
        ({"geometry": (4, 4), "val_fraction": 1.0}, r"val_fraction must be in \[0, 1\)"),
    ],
)
def test_bad_arguments(folder, tmp_path, arguments, message):
    with pytest.raises(SegpipeError, match=message):
        build_cache(folder[0], tmp_path / "out.h5", **arguments)


def test_validation_split_needs_two_images(make_labelme, tmp_path):
    make_labelme([("obj", "rectangle", [[1, 1], [2, 2]])], folder=tmp_path / "one")
    with pytest.raises(SegpipeError, match="one: a validation split needs at least 2 groups"):
        build_cache(tmp_path / "one", tmp_path / "out.h5", geometry=(4, 4), val_fraction=0.5)


# Augmented copies of 6 photos (Roboflow's naming), and one photo without copies.
COPIES = {"IMG_1": 3, "IMG_2": 1, "IMG_10": 2, "IMG_11": 2, "IMG_3": 1, "IMG_4": 3, "IMG_5": 1}


@pytest.fixture
def grouped(make_labelme, tmp_path):
    """A LabelMe folder of the photos in COPIES: ``<photo>.rf.<hash>`` copies, and ``IMG_5``
    itself; returns the folder and each file stem's photo."""
    folder, photos = tmp_path / "grouped", {}
    for photo, copies in COPIES.items():
        for copy in range(copies):
            name = photo if photo == "IMG_5" else f"{photo}.rf.{copy:02d}{len(photos):04x}"
            make_labelme([("obj", "rectangle", [[1, 1], [5, 5]])], name=name, folder=folder,
                         image=np.full((8, 8, 3), 10 * len(photos), np.uint8))  # distinct photos
            photos[name] = photo
    return folder, photos


def test_no_group_crosses_a_fold_or_the_validation_boundary(grouped, tmp_path):
    folder, photos = grouped
    pattern = r"^(.*)\.rf\."
    build_cache(folder, tmp_path / "cv.h5", (4, 4), folds=3, split_seed=2, group=pattern)
    build_cache(folder, tmp_path / "fixed.h5", (4, 4), val_fraction=0.3, group=pattern)
    data, attrs = read(tmp_path / "cv.h5")
    names = [n.decode() for n in data["names"]]
    assert [g.decode() for g in data["groups"]] == [photos[n] for n in names]
    assert attrs["folds"] == 3 and json.loads(attrs["group"]) == pattern
    assert "val_fraction" not in attrs and "is_val" not in data
    assert data["fold"].dtype == np.int64 and sorted(np.bincount(data["fold"])) == [4, 4, 5]
    photo_of = np.array([photos[n] for n in names])
    for photo in COPIES:
        assert len(set(data["fold"][photo_of == photo])) == 1
    for fold in range(3):
        parts = [set(photo_of[rows]) for rows in split_indices(tmp_path / "cv.h5", fold)]
        assert sum(map(len, parts)) == len(COPIES)  # train, val, test share no photo
        assert parts[1] and parts[2]

    data, attrs = read(tmp_path / "fixed.h5")
    assert attrs["val_fraction"] == 0.3 and "fold" not in data
    train, val, test = split_indices(tmp_path / "fixed.h5")
    assert len(test) == 0 and len(val) >= round(0.3 * 13) and len(train)
    assert not set(photo_of[train]) & set(photo_of[val])


def test_fold_errors_leave_no_file(grouped, tmp_path):
    folder, _ = grouped
    output = tmp_path / "out.h5"
    with pytest.raises(SegpipeError, match="grouped: 8 folds need at least 8 groups, got 7"):
        build_cache(folder, output, (4, 4), folds=8, group=r"^(.*)\.rf\.")
    with pytest.raises(SegpipeError, match=r"data.group = 'frame': matches none of the 13"):
        build_cache(folder, output, (4, 4), folds=3, group="frame")
    with pytest.raises(SegpipeError, match="folds and val_fraction exclude each other"):
        build_cache(folder, output, (4, 4), folds=3, val_fraction=0.2)
    assert not output.exists()


@pytest.fixture
def photos(make_labelme, tmp_path):
    """Twelve LabelMe files of distinct 40x56 photos, e.json's embedded."""
    folder = tmp_path / "photos"
    rng = np.random.default_rng(3)
    for i, name in enumerate("abcdefghijkl"):
        make_labelme([("obj", "polygon", rng.uniform(0, 40, (5, 2)).tolist())], name=name,
                     folder=folder, image=rng.integers(0, 256, (40, 56, 3), np.uint8),
                     embed=name == "e")
    return folder


def test_parallel_decoding_writes_the_same_file(photos, tmp_path):
    build_cache(photos, tmp_path / "serial.h5", geometry=(16, 24), workers=1)
    build_cache(photos, tmp_path / "parallel.h5", geometry=(16, 24), workers=3)
    assert (tmp_path / "serial.h5").read_bytes() == (tmp_path / "parallel.h5").read_bytes()


def test_load_annotations_keeps_the_order_and_reads_ahead_a_bounded_number(photos):
    files = sorted(photos.glob("*.json"))
    pulled = []

    def listed():
        for path in files:
            pulled.append(path)
            yield path

    annotations = load_annotations(listed(), workers=2)
    first = next(annotations)
    assert first.path == files[0] and len(pulled) == 4  # 2 x workers in flight, no more
    rest = list(annotations)
    assert [a.path for a in [first, *rest]] == files
    for parallel, path in zip([first, *rest], files):
        serial = load_annotation(path)
        np.testing.assert_array_equal(parallel.image, serial.image)
        assert parallel.image_digest == serial.image_digest


def test_the_first_bad_file_in_order_raises(photos):
    files = sorted(photos.glob("*.json"))
    (photos / "c.png").unlink()
    (photos / "k.json").write_text("{")
    with pytest.raises(SegpipeError, match=r"c\.json: image .*c\.png not found"):
        list(load_annotations(files, workers=4))
