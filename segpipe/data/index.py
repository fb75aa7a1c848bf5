"""What a LabelMe folder holds, each file read once per change.

:func:`labelme_index` reads LabelMe files as far as the workflow's start checks and rasterise's
first pass need, before any image is rasterised: every file is a LabelMe document whose image
exists and decodes, its ``imageHeight`` × ``imageWidth`` (when given) are the image's, the
labels of its filled shapes, and the image's identity (:func:`segpipe.data.identity.photo_id`).

Given a :class:`FileIndex`, what it learns of each file (a JSON file: its labels, declared size
and image file, or the identity and size of its embedded image; an image file: its identity
and size) is kept in a JSON file under the file's absolute path, with the size and the
modification time (ns) the file had before it was read. A later call stats each file and
re-reads only those whose size or modification time differ, as git's index does. A file
modified less than :data:`RACY_SECONDS` before it was read is not kept: a second change within
the file system's timestamp resolution might leave both unchanged (git's "racily clean" files).
The facts kept are those of this version of segpipe (:data:`FORMAT`): another version's index
is read again from scratch.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from segpipe import SegpipeError
from segpipe.data.identity import photo_id
from segpipe.files import (atomic_path, filled_labels, image_reference, named_image,
                           read_image_file, read_labelme, size_error)

log = logging.getLogger(__name__)

FORMAT = "segpipe-labelme-index-2"
"""The version of what the index keeps; change it whenever what is learnt of a file changes."""
RACY_SECONDS = 2.0
"""A file modified this recently when read is read again next time (FAT's 2 s resolution)."""


@dataclass(frozen=True)
class LabelmeEntry:
    """A LabelMe file, the image file it reads (None: embedded), the image's identity
    (:func:`segpipe.data.identity.photo_id`) and (height, width), the labels of its filled
    shapes (:data:`segpipe.files.FILLED_TYPES`), in file order, and the file its ``imagePath``
    names (:func:`segpipe.files.named_image`; read or not, it is an input: never an output)."""

    path: Path
    image_file: Path | None
    photo: str
    size: tuple[int, int]
    labels: tuple[str, ...] = ()
    named_image: Path | None = None


class FileIndex:
    """Facts learnt of files (JSON-serialisable dicts), kept in the JSON file ``path`` (None:
    in memory only), each valid while its file keeps the size and modification time it had."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.read = self.reused = 0
        self._kept: dict[str, list] = {}
        self._used: dict[str, list] = {}
        if self.path is not None and self.path.is_file():
            try:
                stored = json.loads(self.path.read_bytes())
                if stored.get("format") == FORMAT:
                    self._kept = stored["files"]
            except (OSError, ValueError, AttributeError, KeyError):
                log.warning("%s: unreadable, every file is read again", self.path)

    def learn(self, file: Path, read: Callable[[], dict]) -> dict:
        """The facts of ``file``: those kept, if it has the size and modification time it had
        then, else ``read()``'s (whose errors propagate), which are kept unless the file was
        modified too recently to tell a later change (:data:`RACY_SECONDS`)."""
        key = os.path.abspath(file)
        try:
            status = os.stat(key)
        except (OSError, ValueError):
            status = None  # read() says what is wrong
        if status is None or not stat.S_ISREG(status.st_mode):
            return read()
        identity = [status.st_size, status.st_mtime_ns]
        kept = self._kept.get(key)
        if kept is not None and kept[:2] == identity:
            self.reused += 1
            self._used[key] = kept
            return kept[2]
        facts = read()
        self.read += 1
        if time.time_ns() - status.st_mtime_ns > RACY_SECONDS * 1e9:
            self._used[key] = [*identity, facts]
        return facts

    def save(self) -> None:
        """Keep the facts of the files learnt since it was opened (only those), if they
        changed; a file that cannot be written is a warning (the index is an optimisation)."""
        if self.path is None or self._used == self._kept:
            return
        try:
            with atomic_path(self.path) as tmp:
                tmp.write_text(json.dumps({"format": FORMAT, "files": self._used}))
        except SegpipeError as exc:
            log.warning("%s: the file index is not kept (%s)", self.path, exc)
            return
        self._kept = dict(self._used)


def labelme_index(files: Iterable[Path], index: FileIndex | None = None) -> list[LabelmeEntry]:
    """Each LabelMe file of ``files`` read as far as its image's identity and size, checked as
    the module says, through ``index`` (default: a new one in memory). Raises
    :class:`SegpipeError` naming the first file that is wrong and what is wrong with it."""
    index = FileIndex() if index is None else index
    entries = []
    for path in map(Path, files):
        facts = index.learn(path, lambda: _json_facts(path))
        if facts["image"] is None:
            image_file, image = None, facts
        else:
            image_file = path.parent / facts["image"]
            image = index.learn(image_file, lambda: _image_facts(path, image_file))
        size = tuple(image["size"])
        error = size_error(path, facts["declared"], size)
        if error:
            raise SegpipeError(error)
        named = facts.get("named")
        entries.append(LabelmeEntry(path, image_file, image["photo"], size,
                                    tuple(facts["labels"]),
                                    None if named is None else path.parent / named))
    return entries


def _json_facts(path: Path) -> dict:
    document = read_labelme(path)
    named = named_image(path, document)
    facts = {"labels": filled_labels(document),
             "declared": [document.get("imageHeight"), document.get("imageWidth")],
             "named": None if named is None else str(named.relative_to(path.parent))}
    reference = image_reference(path, document)
    if isinstance(reference, bytes):
        return {**facts, "image": None, **_identity(reference, f"{path}: imageData", False)}
    return {**facts, "image": str(reference.relative_to(path.parent))}


def _image_facts(path: Path, image_file: Path) -> dict:
    encoded = read_image_file(path, image_file)
    return _identity(encoded, f"{path}: image {image_file}", True)


def _identity(encoded: bytes, source: str, exif: bool) -> dict:
    photo, size = photo_id(encoded, source, exif)
    return {"photo": photo, "size": list(size)}


def found_labels(entries: Iterable[LabelmeEntry]) -> dict[str, list[Path]]:
    """``{label: [files]}`` of the filled shapes of LabelMe files (:func:`labelme_index`)."""
    found: dict[str, list[Path]] = {}
    for entry in entries:
        for label in dict.fromkeys(entry.labels):
            found.setdefault(label, []).append(entry.path)
    return found
