"""Bad input to `segpipe rasterise` and `segpipe predict`: `segpipe: error: <path>: <problem>`,
exit status 1, no traceback, the old output untouched and no partial file left."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from cachefile import open_stacked
from segpipe.cli import main

ROOT = Path(__file__).resolve().parents[1]
RECTANGLE = {"label": "obj", "shape_type": "rectangle", "points": [[1, 1], [4, 4]]}


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height RGB pixels, followed by hardly any data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0"))
            + chunk(b"IEND", b""))


@pytest.fixture
def study(make_labelme, tmp_path):
    """A LabelMe folder of two 8x8 images, a.json and b.json, and its cache at 4x4."""
    folder = tmp_path / "in"
    for value, name in enumerate("ab"):
        image = np.full((8, 8, 3), 100 * value, np.uint8)  # distinct photos
        make_labelme([RECTANGLE], image=image, name=name, folder=folder)
    cache = tmp_path / "cache" / "train.h5"
    assert rasterise(folder, cache) == 0
    return folder, cache


def rasterise(folder: Path, output: Path, size: int = 4) -> int:
    return main(["rasterise", "--input", str(folder), "--output", str(output),
                 "--size", str(size), str(size)])


def edit(path: Path, **fields) -> Path:
    document = json.loads(path.read_text())
    path.write_text(json.dumps({**document, **fields}))
    return path


def empty_image(folder: Path) -> tuple[str, str]:
    (folder / "b.png").write_bytes(b"")
    return f"{folder / 'b.json'}: image {folder / 'b.png'}", "empty (0 bytes), not an image"


def empty_image_data(folder: Path) -> tuple[str, str]:
    edit(folder / "b.json", imageData="====")  # base64 of nothing
    return f"{folder / 'b.json'}: imageData", "empty (0 bytes), not an image"


def huge_image(folder: Path) -> tuple[str, str]:
    (folder / "b.png").write_bytes(png_header(50000, 50000))
    problem = ("too large: OpenCV decodes at most 2^30 pixels, 2^20 per side (the environment "
               "variables OPENCV_IO_MAX_IMAGE_PIXELS, _WIDTH, _HEIGHT raise it)")
    return f"{folder / 'b.json'}: image {folder / 'b.png'}", problem


def name_not_utf8(folder: Path) -> tuple[str, str]:
    os.rename(folder / "b.json", os.fsencode(folder / "b") + b"\xff.json")  # Latin-1 "bÿ"
    return f"{folder}/b\\xff.json", "the name is not valid UTF-8; rename it"


def deep_json(folder: Path) -> tuple[str, str]:
    (folder / "b.json").write_text("[" * 100_000 + "]" * 100_000)
    return str(folder / "b.json"), "not valid JSON (nested too deeply)"


def points_as(value: list) -> Callable[[Path], tuple[str, str]]:
    def case(folder: Path) -> tuple[str, str]:
        edit(folder / "b.json", shapes=[RECTANGLE, {**RECTANGLE, "points": value}])
        problem = "'points' must be a list of [x, y] numbers (finite; not strings or booleans)"
        return f"{folder / 'b.json'}: shape 1 ('obj', rectangle)", problem

    return case


def zero_radius(folder: Path) -> tuple[str, str]:
    edit(folder / "b.json", shapes=[{**RECTANGLE, "shape_type": "circle", "points": [[3, 3]] * 2}])
    problem = "radius 0 (the centre and the rim point coincide)"
    return f"{folder / 'b.json'}: shape 0 ('obj', circle)", problem


def long_integer(folder: Path) -> tuple[str, str]:
    text = json.dumps({**json.loads((folder / "b.json").read_text()), "shapes": [RECTANGLE]})
    (folder / "b.json").write_text(text.replace("[4, 4]", "[4, " + "4" * 5000 + "]"))
    return str(folder / "b.json"), "not valid JSON (a number of more than 4300 digits)"


def shape_type_as(value: object) -> Callable[[Path], tuple[str, str]]:
    def case(folder: Path) -> tuple[str, str]:
        edit(folder / "b.json", shapes=[{**RECTANGLE, "shape_type": value}])
        problem = "is empty" if value == "" else "is not a string"
        return (f"{folder / 'b.json'}: shape 0",
                f"'shape_type' {value!r} {problem} (a missing key or null means polygon)")

    return case


def image_is_a_folder(folder: Path) -> tuple[str, str]:
    (folder / "b.png").unlink()
    (folder / "b.png").mkdir()
    return str(folder / "b.json"), f"image {folder / 'b.png'} is a folder, not an image file"


@pytest.mark.parametrize(
    "case",
    [empty_image, empty_image_data, huge_image, name_not_utf8, deep_json, long_integer,
     points_as([["1", "1"], ["4", "4"]]), points_as([[True, False], [4, 4]]), zero_radius,
     shape_type_as(0), shape_type_as(False), shape_type_as(""), image_is_a_folder],
    ids=["empty image", "imageData ====", "50000x50000 PNG", "name not UTF-8", "JSON 100000 deep",
         "integer of 5000 digits", "points as strings", "points as booleans",
         "circle of radius 0", "shape_type 0", "shape_type false", "shape_type ''",
         "imagePath a folder"],
)
def test_bad_labelme_file(study, capsys, case):
    folder, cache = study
    before = cache.read_bytes()
    capsys.readouterr()
    named, problem = case(folder)
    assert rasterise(folder, cache) == 1
    assert capsys.readouterr().err == f"segpipe: error: {named}: {problem}\n"
    assert cache.read_bytes() == before
    assert list(cache.parent.iterdir()) == [cache]  # no temporary file left


@pytest.mark.parametrize(
    ("output", "named", "problem"),
    [("folder.h5", "folder.h5", "is a folder, expected a file name"),
     ("a.json/train.h5", "a.json", "cannot create the folder (File exists)")],
    ids=["output is a folder", "output under a file"],
)
def test_output_that_cannot_be_written(study, capsys, output, named, problem):
    folder = study[0]
    (folder / "folder.h5").mkdir()
    capsys.readouterr()
    assert rasterise(folder, folder / output) == 1
    assert capsys.readouterr().err == f"segpipe: error: {folder / named}: {problem}\n"
    assert (folder / "folder.h5").is_dir() and (folder / "a.json").is_file()


def checksums(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    ("output", "problem"),
    [("a.json", "is a LabelMe file of {folder}"),
     ("a.png", "is the image of {folder}/a.json"),
     ("link/a.png", "is the image of {folder}/a.json (via {folder}/link/a.png)")],
    ids=["output names a LabelMe file", "output names an image", "output where a link points"],
)
def test_output_that_would_replace_an_input(study, capsys, tmp_path, output, problem):
    """The rasterise error naming the output and the input, and every input untouched."""
    folder = study[0]
    (folder / "link").mkdir()
    (folder / "link" / "a.png").symlink_to(folder / "a.png")
    if output.startswith("link/"):  # a LabelMe folder whose image is a link to the output
        shutil.move(folder / "a.json", folder / "link" / "a.json")
        folder, output = folder / "link", Path("..") / "a.png"
    before = checksums(study[0])
    capsys.readouterr()
    assert rasterise(folder, folder / output) == 1
    named = (folder / output).absolute()
    problem = problem.format(folder=study[0])
    if str(output).startswith(".."):
        named = folder / output
        problem = f"is the image of {folder / 'a.json'} (via {folder / 'a.png'})"
    assert capsys.readouterr().err == (f"segpipe: error: {named}: {problem}; writing it would "
                                       "destroy it: choose another output\n")
    assert checksums(study[0]) == before


@pytest.mark.parametrize(("output", "problem"),
                         [("a.png", "is the image of {folder}/a.json"),
                          ("photo.JPG", "is an image of {folder}")],
                         ids=["the photo an embedding file names", "a photo no file names"])
def test_output_that_would_replace_a_photo_that_is_not_read(make_labelme, capsys, tmp_path,
                                                            output, problem):
    """LabelMe's default save embeds the image (imageData, read instead of imagePath): the photo
    imagePath names is still the user's, as is every other image of the folder."""
    folder = tmp_path / "in"
    for value, name in enumerate("ab"):
        make_labelme([RECTANGLE], image=np.full((8, 8, 3), value, np.uint8), name=name,
                     folder=folder, embed=True)
    (folder / "a.png").write_bytes(b"the photo")
    (folder / "photo.JPG").write_bytes(b"another photo")
    before = checksums(folder)
    capsys.readouterr()
    assert rasterise(folder, folder / output) == 1
    assert capsys.readouterr().err == (f"segpipe: error: {folder / output}: "
                                       f"{problem.format(folder=folder)}; writing it would "
                                       "destroy it: choose another output\n")
    assert checksums(folder) == before


def test_identical_images_are_one_group_and_logged(study, caplog):
    folder, cache = study
    shutil.copy(folder / "a.json", folder / "c.json")  # imagePath a.png: the same image
    edit(folder / "c.json", shapes=[])
    assert rasterise(folder, cache) == 0
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"{folder / 'a.json'} and {folder / 'c.json'}: the same photo: one group, 'a', on one "
        "side of every split",
        f"{folder / 'a.json'} and {folder / 'c.json'}: the same image annotated differently (the "
        "masks differ in 16 of 8x8 pixels)"]
    with open_stacked(cache) as h5:
        assert list(h5["groups"].asstr()[:]) == ["a", "b", "a"]


@pytest.mark.parametrize("drop", [False, True], ids=["refused", "dropped"])
def test_test_image_that_is_a_training_image(study, make_labelme, tmp_path, capsys, caplog, drop):
    folder, cache = study
    test = tmp_path / "test"
    make_labelme([RECTANGLE], image=np.full((8, 8, 3), 200, np.uint8), name="t", folder=test)
    make_labelme([RECTANGLE], image=np.full((8, 8, 3), 7, np.uint8), name="u", folder=test)
    shutil.copy(folder / "b.png", test / "u.png")  # byte-identical to the training image b
    output = tmp_path / "test.h5"
    capsys.readouterr()
    code = main(["rasterise", "--input", str(test), "--output", str(output), "--size", "4", "4",
                 "--train-cache", str(cache), *(["--drop-duplicates"] if drop else [])])
    line = f"{test / 'u.json'}: the same photo as 'b' of the training cache {cache}"
    if not drop:
        assert code == 1 and not output.exists()
        assert capsys.readouterr().err == (
            f"segpipe: error: {line}\na test image must be unseen in training: remove it from one "
            "folder, or leave it out of the test cache (--drop-duplicates; "
            "data.drop_test_duplicates: true)\n")
    else:
        assert code == 0
        assert f"{line}: left out of this cache" in caplog.text
        with open_stacked(output) as h5:
            assert list(h5["names"].asstr()[:]) == ["t"]


def test_empty_label_is_quoted_in_the_log(study, caplog):
    folder, cache = study
    edit(folder / "b.json", shapes=[{**RECTANGLE, "label": ""}])
    caplog.set_level(logging.INFO)
    assert rasterise(folder, cache) == 0
    assert "shapes: '' 1, obj 1;" in caplog.text


@pytest.fixture
def mount_tmpfs(tmp_path):
    """Factory: ``mount_tmpfs(size)`` mounts a tmpfs of ``size`` bytes; the test is skipped
    where mounting is not allowed (not root, or a container without CAP_SYS_ADMIN)."""
    mounted = []

    def mount(size: int) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        command = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)]
        if not shutil.which("mount") or subprocess.run(command, capture_output=True).returncode:
            pytest.skip("mounting a tmpfs is not allowed here")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=True)


def limit_file_size():
    """In the child: files may not grow beyond 1 MiB (EFBIG; SIGXFSZ ignored, not fatal)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))


@pytest.mark.parametrize("disk", ["tmpfs of 2 MiB", "file size limit of 1 MiB"])
def test_full_disk(study, mount_tmpfs, disk):
    # A 512x512 cache of 2 images needs 2 MiB of pixels + 1 MiB: it does not fit. The space is
    # reserved before HDF5 writes each image (HDF5 cannot close a file after a failed write: this used to
    # end in a segmentation fault).
    folder, cache = study
    if disk.startswith("tmpfs"):
        cache = mount_tmpfs(2 * 2**20) / "train.h5"
        assert rasterise(folder, cache) == 0
    before = cache.read_bytes()
    command = [sys.executable, "-m", "segpipe", "rasterise", "--input", str(folder),
               "--output", str(cache), "--size", "512", "512"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                            preexec_fn=None if disk.startswith("tmpfs") else limit_file_size)
    reason = "No space left on device" if disk.startswith("tmpfs") else "File too large"
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert re.search(rf"segpipe: error: {re.escape(str(cache))}: cannot reserve the \d+\.\d MiB "
                     rf"it needs \({reason}\)\n$", result.stderr)
    assert cache.read_bytes() == before
    assert list(cache.parent.iterdir()) == [cache]


def test_read_only_output_folder(study, mount_tmpfs, capsys):
    # As root, chmod does not stop writes: root gets a read-only mount instead.
    folder, cache = study
    if os.geteuid() == 0:
        cache = mount_tmpfs(2 * 2**20) / "train.h5"
        assert rasterise(folder, cache) == 0
        subprocess.run(["mount", "-o", "remount,ro", str(cache.parent)], check=True)
        reason = "Read-only file system"
    else:
        cache.parent.chmod(0o555)  # pytest restores it when it removes old temporary folders
        reason = "Permission denied"
    before = cache.read_bytes()
    capsys.readouterr()
    assert rasterise(folder, cache) == 1
    assert capsys.readouterr().err == f"segpipe: error: {cache}: cannot write ({reason})\n"
    assert cache.read_bytes() == before
    assert list(cache.parent.iterdir()) == [cache]


# --- segpipe predict --------------------------------------------------------------------

@pytest.fixture
def checkpoint(tmp_path) -> Path:
    from segpipe.models import build_model
    from segpipe.checkpoint import make_checkpoint

    architecture = {"model": "unet", "width": 4, "depth": 2}
    spec = {"run": "test", "architecture": architecture, "backbone": {}}
    path = tmp_path / "model.pt"
    torch.save(make_checkpoint(spec, build_model(architecture, {}).state_dict(), (8, 8)), path)
    return path


@pytest.mark.parametrize(
    ("content", "problem"),
    [(b"", "empty (0 bytes), not an image"),
     (png_header(50000, 50000), "too large: OpenCV decodes at most 2^30 pixels, 2^20 per side "
                                "(the environment variables OPENCV_IO_MAX_IMAGE_PIXELS, _WIDTH, "
                                "_HEIGHT raise it)")],
    ids=["empty image", "50000x50000 PNG"],
)
def test_predict_unreadable_image(checkpoint, tmp_path, capsys, content, problem):
    """No mask at all, not even that of the good image a.png, nor the output folder: all or
    nothing."""
    (tmp_path / "photos").mkdir()
    cv2.imwrite(str(tmp_path / "photos" / "a.png"), np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "photos" / "x.png").write_bytes(content)
    capsys.readouterr()
    arguments = ["predict", "--checkpoint", str(checkpoint), "--input", str(tmp_path / "photos")]
    assert main([*arguments, "--output", str(tmp_path / "masks")]) == 1
    image = tmp_path / "photos" / "x.png"
    assert capsys.readouterr().err == f"segpipe: error: {image}: {problem}\n"
    assert not (tmp_path / "masks").exists()  # not even the folder


def test_predict_output_that_is_a_file(checkpoint, tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "x.png").write_bytes(png_header(8, 8))
    (tmp_path / "masks").write_text("")
    capsys.readouterr()
    arguments = ["predict", "--checkpoint", str(checkpoint), "--input", str(tmp_path / "photos")]
    assert main([*arguments, "--output", str(tmp_path / "masks")]) == 1
    expected = (f"segpipe: error: {tmp_path / 'masks'}: exists and is not a folder: choose another "
                "--output\n")
    assert capsys.readouterr().err == expected


def test_predict_input_that_is_a_file(checkpoint, tmp_path, capsys):
    photo = tmp_path / "photo.png"
    cv2.imwrite(str(photo), np.zeros((8, 8, 3), np.uint8))
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(checkpoint), "--input", str(photo),
                 "--output", str(tmp_path / "masks")]) == 1
    assert capsys.readouterr().err == (f"segpipe: error: {photo}: not a folder; the input is a "
                                       "folder of images\n")
    assert not (tmp_path / "masks").exists()


ENTRY = ("a class is a LabelMe label (a non-empty string) or {name: [labels]} (one name and a "
         "non-empty list of distinct labels)")


@pytest.mark.parametrize(("classes", "message"), [
    ([{"ps4 controller": ["ps4"]}], "data.classes[0]: the class name 'ps4 controller' is not one "
     "(ASCII letters, digits, '.', '-', single '_'; not 'background'): e.g. "
     "{ps4_controller: ['ps4']}"),
    (["obj", {"Gerät": ["Gerät", "gerät"]}], "data.classes[1]: the class name 'Gerät' is not one "
     "(ASCII letters, digits, '.', '-', single '_'; not 'background'): e.g. "
     "{Gerat: ['Gerät', 'gerät']}"),
    ([{"": ["obj"]}], "data.classes[0]: the class name is empty: e.g. {obj: ['obj']}"),
    (["ps4 controller"], "data.classes[0]: the label 'ps4 controller' is not a class name (ASCII "
     "letters, digits, '.', '-', single '_'; not 'background'): give its class a name, e.g. "
     "{ps4_controller: ['ps4 controller']}"),
    ([""], f"--classes: [0]: '' should be non-empty; {ENTRY}"),
    ([{"name": []}], f"--classes: [0].name: [] should be non-empty; {ENTRY}"),
    ([["obj"]], f"--classes: [0]: ['obj'] is a list; {ENTRY}"),
    ([{"a": ["obj"], "b": ["x"]}], f"--classes: [0]: {{'a': ['obj'], 'b': ['x']}} has 2 keys, at "
     f"most 1; {ENTRY}"),
    (["obj", 5], f"--classes: [1]: 5 is a number; {ENTRY}"),
    ([{"a": [["obj"]]}], f"--classes: [0].a[0]: ['obj'] is not of type 'string'; {ENTRY}"),
], ids=["name with a space", "name with a unicode letter", "empty name", "label as name",
        "empty label", "no labels", "nested list", "two keys", "a number", "nested labels"])
def test_bad_class_entries_say_what_is_wrong_and_what_an_entry_may_be(study, tmp_path, capsys,
                                                                      classes, message):
    capsys.readouterr()
    assert main(["rasterise", "--input", str(study[0]), "--output", str(tmp_path / "x.h5"),
                 "--size", "4", "4", "--classes", json.dumps(classes)]) == 1
    assert capsys.readouterr().err == f"segpipe: error: {message}\n"


def test_predict_output_that_is_the_input_folder(checkpoint, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    cv2.imwrite(str(photos / "photo.png"), np.zeros((8, 8, 3), np.uint8))
    before = checksums(photos)
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(checkpoint), "--input", str(photos),
                 "--output", str(photos)]) == 1
    assert capsys.readouterr().err == (f"segpipe: error: {photos}: is the input folder; the "
                                       "predictions would replace or join the images and their "
                                       "annotations: choose another --output\n")
    assert checksums(photos) == before


def checkpoint_of_another_width(path: Path) -> str:
    from segpipe.checkpoint import make_checkpoint
    from segpipe.models import build_model

    spec = {"run": "test", "architecture": {"model": "unet", "width": 4, "depth": 2},
            "backbone": {}}
    wider = build_model({"model": "unet", "width": 8, "depth": 2}, {}).state_dict()
    torch.save(make_checkpoint(spec, wider, (8, 8)), path)
    return ("the weights do not fit the model its architecture and backbone describe (55 "
            "problem(s), the first: size mismatch for encoder.stages.0.0.0.weight: copying a "
            "param with shape torch.Size([8, 3, 3, 3]) from checkpoint, the shape in current "
            "model is torch.Size([4, 3, 3, 3]))")


def truncated_checkpoint(path: Path) -> str:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return ("not a readable checkpoint: truncated or corrupt (not a complete zip archive, "
            f"{len(data) // 2} bytes)")


@pytest.mark.parametrize("case", [checkpoint_of_another_width, truncated_checkpoint],
                         ids=["tensors of another size", "truncated file"])
def test_predict_bad_checkpoint(checkpoint, tmp_path, capsys, case):
    (tmp_path / "photos").mkdir()
    cv2.imwrite(str(tmp_path / "photos" / "a.png"), np.zeros((8, 8, 3), np.uint8))
    problem = case(checkpoint)
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(checkpoint), "--input", str(tmp_path / "photos"),
                 "--output", str(tmp_path / "masks")]) == 1
    assert capsys.readouterr().err == f"segpipe: error: {checkpoint}: {problem}\n"
    assert not (tmp_path / "masks").exists()  # not even the folder


@pytest.mark.parametrize(("option", "problem"), [
    (["--tolerance", "-1"], "--tolerance: -1.0 is less than the minimum of 0"),
    (["--tolerance", "inf"], "--tolerance: inf is not of type 'number'"),
    (["--min-area", "-3"], "--min-area: -3 is less than the minimum of 0"),
    (["--threshold", "1"], "--threshold: 1.0 is greater than or equal to the maximum of 1")],
    ids=["negative tolerance", "infinite tolerance", "negative min-area", "threshold 1"])
def test_predict_settings_out_of_range(checkpoint, tmp_path, capsys, option, problem):
    """Checked by the schema's rule for the config key, before anything is read or written."""
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(checkpoint), "--input", str(tmp_path / "photos"),
                 "--output", str(tmp_path / "out"), *option]) == 1
    assert capsys.readouterr().err == f"segpipe: error: {problem}\n"
    assert not (tmp_path / "out").exists()
