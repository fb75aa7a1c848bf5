"""Bad input to `segpipe rasterise` and `segpipe predict`: `segpipe: error: <path>: <problem>`,
exit status 1, no traceback, the old output untouched and no partial file left."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

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
        image = np.full((8, 8, 3), value, np.uint8)
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


def same_image(folder: Path) -> tuple[str, str]:
    shutil.copy(folder / "a.json", folder / "c.json")  # imagePath a.png
    problem = (f"the same image as {folder / 'a.json'} (identical image bytes); "
               "annotate each image once")
    return str(folder / "c.json"), problem


@pytest.mark.parametrize(
    "case",
    [empty_image, empty_image_data, huge_image, name_not_utf8, deep_json,
     points_as([["1", "1"], ["4", "4"]]), points_as([[True, False], [4, 4]]), zero_radius,
     same_image],
    ids=["empty image", "imageData ====", "50000x50000 PNG", "name not UTF-8", "JSON 100000 deep",
         "points as strings", "points as booleans", "circle of radius 0", "two files one image"],
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
    # reserved before HDF5 writes (HDF5 cannot close a file after a failed write: this used to
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
    assert result.stderr.endswith(
        f"segpipe: error: {cache}: cannot reserve the 3.0 MiB it needs ({reason})\n"
    )
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
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "x.png").write_bytes(content)
    capsys.readouterr()
    arguments = ["predict", "--checkpoint", str(checkpoint), "--input", str(tmp_path / "photos")]
    assert main([*arguments, "--output", str(tmp_path / "masks")]) == 1
    image = tmp_path / "photos" / "x.png"
    assert capsys.readouterr().err == f"segpipe: error: {image}: {problem}\n"
    assert list((tmp_path / "masks").iterdir()) == []


def test_predict_output_that_is_a_file(checkpoint, tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "x.png").write_bytes(png_header(8, 8))
    (tmp_path / "masks").write_text("")
    capsys.readouterr()
    arguments = ["predict", "--checkpoint", str(checkpoint), "--input", str(tmp_path / "photos")]
    assert main([*arguments, "--output", str(tmp_path / "masks")]) == 1
    expected = f"segpipe: error: {tmp_path / 'masks'}: cannot create the folder (File exists)\n"
    assert capsys.readouterr().err == expected
