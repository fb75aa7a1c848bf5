"""What a LabelMe folder holds, each file read once per change (segpipe.data.index)."""

from __future__ import annotations

import json
import os

import cv2
import numpy as np
import pytest

from segpipe import SegpipeError
from segpipe.data.index import FORMAT, FileIndex, found_labels, labelme_index
from segpipe.files import labelme_files

HOUR_NS = 3600 * 10**9


def age(*paths) -> None:
    """Set the modification time of ``paths`` an hour back (no longer "racily" recent)."""
    for path in paths:
        mtime = path.stat().st_mtime_ns - HOUR_NS
        os.utime(path, ns=(mtime, mtime))


@pytest.fixture
def folder(make_labelme, tmp_path):
    """Three LabelMe files of distinct photos, c's embedded, all an hour old."""
    folder = tmp_path / "in"
    for value, name in zip((20, 120, 220), "abc"):
        make_labelme([("obj", "rectangle", [[1, 1], [5, 5]])], name=name, folder=folder,
                     image=np.full((8, 10, 3), value, np.uint8), embed=name == "c")
    age(*folder.iterdir())
    return folder


def index_twice(folder, path):
    first = FileIndex(path)
    entries = labelme_index(labelme_files(folder), first)
    first.save()
    second = FileIndex(path)
    return entries, first, second, labelme_index(labelme_files(folder), second)


def test_a_second_pass_reads_nothing_and_learns_the_same(folder, tmp_path):
    entries, first, second, again = index_twice(folder, tmp_path / "index.json")
    assert (first.read, first.reused) == (5, 0)  # a.json a.png b.json b.png c.json
    assert (second.read, second.reused) == (0, 5)
    assert again == entries
    assert [(e.path.name, e.image_file and e.image_file.name, e.size, e.labels)
            for e in entries] == [("a.json", "a.png", (8, 10), ("obj",)),
                                  ("b.json", "b.png", (8, 10), ("obj",)),
                                  ("c.json", None, (8, 10), ("obj",))]
    assert found_labels(entries) == {"obj": [folder / f"{n}.json" for n in "abc"]}


def test_an_unchanged_file_is_not_read_again(folder, tmp_path):
    """Its size and modification time are what the index trusts: bytes replaced behind them
    are not seen (were a.png read, its garbage would be an error)."""
    path = tmp_path / "index.json"
    entries, *_ = index_twice(folder, path)
    image = folder / "a.png"
    status = image.stat()
    image.write_bytes(b"x" * status.st_size)
    os.utime(image, ns=(status.st_atime_ns, status.st_mtime_ns))
    index = FileIndex(path)
    assert labelme_index(labelme_files(folder), index) == entries and index.read == 0


def test_a_changed_file_is_read_again_and_checked(folder, tmp_path):
    path = tmp_path / "index.json"
    entries, *_ = index_twice(folder, path)
    cv2.imwrite(str(folder / "b.png"), np.full((8, 10, 3), 60, np.uint8))  # another photo
    document = json.loads((folder / "a.json").read_text())
    (folder / "a.json").write_text(json.dumps({**document, "shapes": []}))
    age(folder / "b.png", folder / "a.json")
    index = FileIndex(path)
    changed = labelme_index(labelme_files(folder), index)
    assert (index.read, index.reused) == (2, 3)
    assert changed[0].labels == () and changed[1].photo != entries[1].photo
    assert changed[2] == entries[2]
    index.save()

    (folder / "b.png").write_bytes(b"not an image")
    with pytest.raises(SegpipeError, match=rf"^{folder / 'b.json'}: image {folder / 'b.png'}: "
                                           "not a readable image"):
        labelme_index(labelme_files(folder), FileIndex(path))
    (folder / "b.png").unlink()
    with pytest.raises(SegpipeError, match=rf"^{folder / 'b.json'}: image {folder / 'b.png'} "
                                           "not found and no imageData"):
        labelme_index(labelme_files(folder), FileIndex(path))


def test_a_file_changed_just_before_it_was_read_is_read_again(folder, tmp_path):
    """A second change within the file system's timestamp resolution could keep its size and
    time: a file modified less than 2 s before it was read is not kept."""
    path = tmp_path / "index.json"
    os.utime(folder / "b.json")  # now
    index_twice(folder, path)
    index = FileIndex(path)
    labelme_index(labelme_files(folder), index)
    assert (index.read, index.reused) == (1, 4)


def test_an_index_of_another_format_or_unreadable_is_read_from_scratch(folder, tmp_path):
    path = tmp_path / "index.json"
    index_twice(folder, path)
    stored = json.loads(path.read_text())
    assert stored["format"] == FORMAT and len(stored["files"]) == 5
    path.write_text(json.dumps({**stored, "format": "segpipe-labelme-index-0"}))
    index = FileIndex(path)
    labelme_index(labelme_files(folder), index)
    assert index.read == 5
    path.write_text("{")
    index = FileIndex(path)
    labelme_index(labelme_files(folder), index)
    assert index.read == 5


def test_the_declared_size_is_checked_on_every_pass(folder, tmp_path):
    """Against the image's size, when either changed."""
    path = tmp_path / "index.json"
    index_twice(folder, path)
    cv2.imwrite(str(folder / "a.png"), np.full((10, 8, 3), 20, np.uint8))
    age(folder / "a.png")
    with pytest.raises(SegpipeError, match=r"a\.json: imageHeight x imageWidth 8x10 does not match "
                                           r"the image, 10x8 \(swapped: EXIF orientation\?\)"):
        labelme_index(labelme_files(folder), FileIndex(path))
