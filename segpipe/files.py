"""Files a step reads and writes: the files of a LabelMe folder and their images, outputs that
never replace an input, and outputs written so that a reader never sees a partial file.
Standard library only: the workflow's start checks use it."""

from __future__ import annotations

import base64
import binascii
import contextlib
import csv
import errno
import hashlib
import json
import logging
import os
import re
import socket
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path, PureWindowsPath

from segpipe import SegpipeError

log = logging.getLogger(__name__)

HOST = socket.gethostname()
# A temporary file of atomic_path on this host: .<stem>@<host>.<pid>.tmp<suffix>. A host name
# holds no "@", so what follows the last "@" names the host.
_TEMPORARY = re.compile(rf"\..*@{re.escape(HOST)}\.(\d{{1,9}})\.tmp(\.[^.]*)?")
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_swept: set[Path] = set()  # folders whose stale temporaries this process has removed


def labelme_files(folder: str | Path) -> list[Path]:
    """The LabelMe files of ``folder``, sorted by name: every ``*.json`` directly inside it,
    the suffix in any case (``a.JSON`` too, as on Windows).

    Raises :class:`SegpipeError` for a missing folder, one without such files, a path that is
    not valid UTF-8 (the cache stores names and the source folder as UTF-8) and two files
    whose names differ only in the case of the suffix (both would be named alike in the cache).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SegpipeError(f"{display(folder)}: not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".json")
    if not files:
        raise SegpipeError(f"{display(folder)}: no LabelMe .json files")
    stems: dict[str, Path] = {}
    for path in [folder.resolve(), *files]:
        try:
            str(path).encode()
        except UnicodeEncodeError:
            raise SegpipeError(f"{display(path)}: the name is not valid UTF-8; rename it") from None
    for path in files:
        if path.stem in stems:
            raise SegpipeError(f"{stems[path.stem]} and {path.name}: two files for one image name")
        stems[path.stem] = path
    return files


def read_labelme(path: Path) -> dict:
    """The JSON document of the LabelMe file ``path``: an object with a ``shapes`` list. Raises
    :class:`SegpipeError` naming the file when it cannot be read or is not such a document."""
    try:
        document = json.loads(path.read_bytes())
    except OSError as exc:
        raise SegpipeError(f"{path}: cannot read ({exc.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SegpipeError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise SegpipeError(f"{path}: not valid JSON (nested too deeply)") from None
    except ValueError:  # the only other: an integer longer than Python converts
        raise SegpipeError(f"{path}: not valid JSON (a number of more than "
                           f"{sys.get_int_max_str_digits()} digits)") from None
    if not isinstance(document, dict) or not isinstance(document.get("shapes"), list):
        raise SegpipeError(f"{path}: not a LabelMe file (no 'shapes' list)")
    return document


def labelme_image(path: Path, document: dict) -> tuple[bytes, str, Path | None]:
    """The encoded image of the LabelMe file ``path`` (its ``document``), where it comes from
    (for messages) and the image file it was read from: None for the embedded ``imageData``
    (:func:`image_reference`)."""
    reference = image_reference(path, document)
    if isinstance(reference, bytes):
        return reference, f"{path}: imageData", None
    return read_image_file(path, reference), f"{path}: image {reference}", reference


def image_reference(path: Path, document: dict) -> bytes | Path:
    """The image of the LabelMe file ``path`` (its ``document``): the embedded ``imageData``
    decoded from base64, which takes precedence (LabelMe's own rule: it is the image the shapes
    were drawn on), else the path of the image file ``imagePath``, relative to the JSON
    (Windows separators accepted)."""
    if document.get("imageData"):
        try:
            return base64.b64decode(document["imageData"])
        except (binascii.Error, TypeError, ValueError):
            raise SegpipeError(f"{path}: imageData is not valid base64") from None
    image_path = named_image(path, document)
    if image_path is None:
        raise SegpipeError(f"{path}: has neither imageData nor imagePath")
    return image_path


def read_image_file(path: Path, image_path: Path) -> bytes:
    """The bytes of ``image_path``, the image file of the LabelMe file ``path``; raises
    :class:`SegpipeError` naming both when it cannot be read."""
    try:
        return image_path.read_bytes()
    except IsADirectoryError:
        raise SegpipeError(f"{path}: image {image_path} is a folder, not an image file") from None
    except (FileNotFoundError, NotADirectoryError, ValueError):  # ValueError: a NUL character
        raise SegpipeError(f"{path}: image {image_path} not found and no imageData") from None
    except OSError as exc:
        raise SegpipeError(f"{path}: image {image_path}: cannot read ({exc.strerror})") from None


def named_image(path: Path, document: dict) -> Path | None:
    """The file the ``imagePath`` of the LabelMe file ``path`` (its ``document``) names,
    relative to the JSON, Windows separators accepted; None when it names none."""
    image_path = document.get("imagePath")
    if not isinstance(image_path, str) or not image_path:
        return None
    return path.parent / PureWindowsPath(image_path).as_posix()


def image_digest(encoded: bytes) -> str:
    """The SHA-256 (hex) of an encoded image's bytes."""
    return hashlib.sha256(encoded).hexdigest()


def size_error(path: Path, declared: tuple, size: tuple[int, int]) -> str | None:
    """What is wrong when the ``declared`` (imageHeight, imageWidth) of the LabelMe file
    ``path`` (either None: nothing) are not the (height, width) ``size`` of its image."""
    size = tuple(size)
    if None in declared or tuple(declared) == size:
        return None
    hint = " (swapped: EXIF orientation?)" if tuple(declared) == size[::-1] else ""
    return (f"{path}: imageHeight x imageWidth {declared[0]!r}x{declared[1]!r} does not "
            f"match the image, {size[0]}x{size[1]}{hint}")


FILLED_TYPES = frozenset({"polygon", "rectangle", "circle", "oriented_rectangle", "mask"})
"""The LabelMe shape types that enclose an area, so paint a mask (no ``shape_type``, LabelMe
< 3: a polygon); the others (line, point, ...) paint nothing."""


def filled_labels(document: dict) -> tuple[str, ...]:
    """The labels of the filled shapes (:data:`FILLED_TYPES`) of a LabelMe ``document``, in
    file order (shapes without a string label are left to rasterise's checks)."""
    return tuple(shape["label"] for shape in document["shapes"]
                 if isinstance(shape, dict) and isinstance(shape.get("label"), str)
                 and _filled(shape.get("shape_type")))


def _filled(shape_type: object) -> bool:
    return shape_type is None or isinstance(shape_type, str) and shape_type in FILLED_TYPES


DEMO_NAME = "synth_{:04d}"
"""The stem of image ``i`` of ``segpipe synth``: ``synth_0000.jpg`` beside ``synth_0000.json``."""


def demo_files(folder: str | Path, count: int) -> list[str]:
    """The files ``segpipe synth --output folder --count count`` writes."""
    return [f"{folder}/{DEMO_NAME.format(i)}.{suffix}" for i in range(count)
            for suffix in ("json", "jpg")]


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
"""The images ``segpipe predict`` reads from a folder."""
PREDICTION_FORMATS = {"png": ".png", "labelme": ".json"}
"""The formats of ``segpipe predict`` and the suffix of their files."""
PREDICTION_FOLDERS = {"png": "masks", "labelme": "labelme"}
"""The sub-folder of each format when several are written at once."""
UNCERTAINTY_CSV = "uncertainty.csv"
"""``segpipe predict``: the images most uncertain first."""


def image_files(folder: str | Path) -> list[Path]:
    """The images (:data:`IMAGE_SUFFIXES`, any case) of a folder, sorted; raises
    :class:`SegpipeError` for a missing folder, a file, no image, or two of one stem (their
    predictions would be one file)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise SegpipeError(f"{folder}: not a folder; the input is a folder of images")
    if not folder.is_dir():
        raise SegpipeError(f"{folder}: input folder not found")
    images = folder_images(folder)
    if not images:
        raise SegpipeError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    stems: dict[str, Path] = {}
    for path in images:
        if path.stem in stems:
            raise SegpipeError(f"{stems[path.stem]} and {path}: two images of one name; their "
                               f"predictions would both be written as {path.stem}.*")
        stems[path.stem] = path
    return images


def folder_images(folder: str | Path) -> list[Path]:
    """The image files (:data:`IMAGE_SUFFIXES`, any case) directly in ``folder``, sorted."""
    return sorted(p for p in Path(folder).iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def prediction_paths(output_dir: str | Path, stem: str, formats: Sequence[str]) -> dict[str, Path]:
    """Where each format's file of image ``stem`` goes: ``output_dir/<stem><suffix>`` for one
    format, ``output_dir/<masks|labelme>/<stem><suffix>`` for several (LabelMe would list the
    PNG masks of its folder as images to annotate)."""
    if len(formats) == 1:
        return {formats[0]: Path(output_dir) / f"{stem}{PREDICTION_FORMATS[formats[0]]}"}
    return {f: Path(output_dir) / PREDICTION_FOLDERS[f] / f"{stem}{PREDICTION_FORMATS[f]}"
            for f in formats}


def existing_predictions(output_dir: str | Path) -> list[Path]:
    """The prediction files ``output_dir`` holds, in every layout of :func:`prediction_paths`
    (``<stem>.png``, ``<stem>.json``, ``masks/<stem>.png``, ``labelme/<stem>.json``) and
    :data:`UNCERTAINTY_CSV`: one set, which ``segpipe predict`` replaces as a whole. Hidden
    files (the temporaries of :func:`atomic_path`) are none of them."""
    output_dir = Path(output_dir)
    places = [(output_dir, suffix) for suffix in PREDICTION_FORMATS.values()]
    places += [(output_dir / PREDICTION_FOLDERS[f], PREDICTION_FORMATS[f])
               for f in PREDICTION_FORMATS]
    found = [output_dir / UNCERTAINTY_CSV] if (output_dir / UNCERTAINTY_CSV).exists() else []
    for folder, suffix in places:
        if folder.is_dir():
            found += sorted(p for p in folder.iterdir() if p.suffix.lower() == suffix
                            and not p.name.startswith(".") and not p.is_dir())
    return found


def check_outputs(outputs: Iterable[Path], inputs: Mapping[Path, str]) -> None:
    """Raise :class:`SegpipeError` if writing one of ``outputs`` would replace one of ``inputs``
    (path: what it is, for the message): the output names the input, or the file an input
    links to. (Writing replaces the directory entry: an output that links to an input
    replaces the link, not the input.)"""
    def entry(path: Path) -> Path:
        return Path(path).absolute().parent.resolve() / Path(path).name

    where = {}
    for path, what in inputs.items():
        where[entry(path)] = (path, what)
        where.setdefault(Path(path).resolve(), (path, what))
    for output in outputs:
        if entry(output) in where:
            path, what = where[entry(output)]
            named = "" if entry(output) == entry(path) else f" (via {path})"
            raise SegpipeError(f"{output}: is {what}{named}; writing it would destroy it: "
                               "choose another output")


def display(path: str | Path) -> str:
    """``path`` as text, bytes that are not UTF-8 shown as ``\\xff`` escapes."""
    return os.fsencode(path).decode(errors="backslashreplace")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` (same suffix) that replaces ``path`` when the block
    succeeds and is removed when it fails, so readers never see a partial file.

    The temporary file is created at once: an output that cannot be written (a folder, no
    permission, a read-only file system) fails before the work, and a block that runs out of
    space (ENOSPC, EDQUOT, EFBIG) fails too, with :class:`SegpipeError` naming ``path``. The
    name ``.<stem>@<host>.<pid>.tmp<suffix>`` tells which process writes it: the first time a
    process writes into a folder, it removes the temporaries of processes of its host that
    no longer run (killed ones; see :func:`remove_stale_temporaries`).
    """
    path = Path(path)
    if path.is_dir():
        raise SegpipeError(f"{path}: is a folder, expected a file name")
    tmp = path.with_name(f".{path.stem}@{HOST}.{os.getpid()}.tmp{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SegpipeError(f"{path.parent}: cannot create the folder ({exc.strerror})") from None
    try:
        folder = path.parent.resolve()
        if folder not in _swept:
            remove_stale_temporaries(folder)
            _swept.add(folder)
        tmp.touch()
    except OSError as exc:
        raise SegpipeError(f"{path}: cannot write ({exc.strerror})") from None
    try:
        try:
            yield tmp
        except OSError as exc:
            if exc.errno not in _NO_SPACE:
                raise
            raise SegpipeError(f"{path}: not enough space to write it ({exc.strerror})") from None
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temporaries(folder: str | Path) -> None:
    """Remove the temporary files of :func:`atomic_path` in ``folder`` whose process no longer
    runs (it was killed). Only those of this host: on a file system shared by cluster nodes, a
    process id of another node says nothing here."""
    for entry in os.scandir(folder):
        match = _TEMPORARY.fullmatch(entry.name)
        if match and not _running(int(match[1])):
            Path(entry.path).unlink(missing_ok=True)
            log.info("removed %s, left by process %s, which no longer runs", entry.path, match[1])


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def write_csv(path: Path, columns: Sequence[str], rows: Iterable[Mapping]) -> None:
    """Write ``rows`` (mappings with the keys ``columns``) under a header of ``columns`` as a
    CSV file at ``path``, atomically; None and NaN are empty cells, as pandas writes them."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([_cell(row[column]) for column in columns] for row in rows)


def _cell(value: object) -> object:
    return "" if value is None or value != value else value  # NaN != NaN
