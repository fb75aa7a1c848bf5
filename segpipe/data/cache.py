"""HDF5 cache of a LabelMe folder: images and masks at the training size, and the split.

Layout (docs/formats.md): ``images`` uint8 (N, H, W, 3) RGB resized with area
interpolation, ``masks`` uint8 (N, H, W) class indices (:mod:`segpipe.labels`: 0 background, 1…K, 255
ignore; {0, 1} in a binary study) rasterised at (H, W) from scaled
coordinates, ``names`` (N,) utf-8 JSON file stems, ``groups`` (N,) utf-8 their groups,
``orig_size`` int32 (N, 2) original (height, width), and the split (:mod:`segpipe.data.split`):
``is_val`` bool (N,), or with ``folds`` the cross-validation fold ``fold`` int64 (N,); one image
per chunk; attributes ``segpipe_version``, ``source``, ``foreground``, ``background``, ``labels``
(with classes or ignore labels: :meth:`segpipe.labels.Labels.attrs`),
``group`` (JSON), ``size``, ``count``, ``split_seed``, and ``val_fraction`` or ``folds``.
Images are sorted by file name, so the same folder gives the same file.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections import Counter
from pathlib import Path

import cv2
import h5py
import numpy as np
from tqdm import tqdm

from segpipe import SegpipeError, __version__
from segpipe.data.labelme import load_annotation, rasterise
from segpipe.labels import IGNORE, Labels
from segpipe.data.split import (assign_folds, group_count, group_ids, group_keys,
                                split_validation)
from segpipe.files import atomic_path, labelme_files

log = logging.getLogger(__name__)


def build_cache(
    input_dir: str | Path,
    output: str | Path,
    size: tuple[int, int],
    labels: Labels | None = None,
    val_fraction: float = 0.0,
    split_seed: int = 0,
    folds: int | None = None,
    group: str | None = None,
) -> None:
    """Rasterise the LabelMe files of ``input_dir`` (:func:`segpipe.files.labelme_files`) into
    the HDF5 file ``output``, with the validation split ``val_fraction`` or, with ``folds``, the
    cross-validation folds, both drawn by ``split_seed`` over the groups of the regular
    expression ``group``.

    The file is written under a temporary name, with its disk space reserved before the first
    image, and renamed when complete. Raises :class:`SegpipeError` for a folder without
    LabelMe files, any invalid file (see :func:`segpipe.data.labelme.load_annotation`), two
    files of one image, a label rule that selects no shape in the whole folder, a split the
    groups cannot make, an output that cannot be written and a disk without room for it;
    a label that a study with classes does not name; labels the config names that never occur
    are logged. ``labels``: the classes (:class:`segpipe.labels.Labels`; default binary).
    """
    input_dir, output = Path(input_dir), Path(output)
    size = height, width = int(size[0]), int(size[1])
    labels = Labels() if labels is None else labels
    if height < 1 or width < 1:
        raise SegpipeError(f"size must be positive, got {height}x{width}")
    if not 0.0 <= val_fraction < 1.0:
        raise SegpipeError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if folds is not None and val_fraction > 0:
        raise SegpipeError("folds and val_fraction exclude each other: with folds, the "
                           "validation images of a fold are those of the next fold")
    files = labelme_files(input_dir)

    n = len(files)
    names = [p.stem for p in files]
    keys = group_keys(names, group)
    groups = group_ids(keys)
    try:
        if folds is None:
            split = {"is_val": split_validation(groups, val_fraction, split_seed)}
        else:
            split = {"fold": assign_folds(groups, folds, split_seed)}
    except SegpipeError as exc:
        raise SegpipeError(f"{input_dir}: {exc}") from None
    attrs = {
        "segpipe_version": __version__,
        "source": str(input_dir.resolve()),
        **labels.attrs(),
        "group": json.dumps(group),
        "size": np.array(size),
        "count": n,
        "split_seed": split_seed,
        **({"val_fraction": val_fraction} if folds is None else {"folds": folds}),
    }
    layout = _layout(names, keys, size, split, attrs)
    found, skipped, pixels, first_file = Counter(), Counter(), Counter(), {}
    files_of: dict[str, list[str]] = {}
    with atomic_path(output) as partial:
        _create_reserved(partial, layout, n, size, output)
        with h5py.File(partial, "r+") as h5:
            images, masks, orig_size = h5["images"], h5["masks"], h5["orig_size"]
            for i, path in enumerate(tqdm(files, desc="rasterise", unit="image", disable=None)):
                annotation = load_annotation(path)
                if annotation.image_digest in first_file:
                    raise SegpipeError(
                        f"{path}: the same image as {first_file[annotation.image_digest]} "
                        "(identical image bytes); annotate each image once"
                    )
                first_file[annotation.image_digest] = path
                image = cv2.resize(annotation.image, (width, height), interpolation=cv2.INTER_AREA)
                images[i] = image
                _check_named(path, annotation, labels)
                masks[i] = mask = rasterise(annotation, size, labels)
                orig_size[i] = annotation.size
                pixels.update(dict(zip(*np.unique(mask, return_counts=True))))
                found.update(s.label for s in annotation.shapes)
                skipped.update(annotation.skipped)
            _check_labels(input_dir, found, labels)
    log.info(
        "%s: %d images%s at %dx%d, %s; %s of pixels; shapes: %s; skipped (no area): %s",
        output, n, _describe_split(split, groups), height, width, labels.describe(),
        _shares(pixels, labels, n * height * width), _counts(found), _counts(skipped),
    )


def _describe_split(split: dict[str, np.ndarray], groups: np.ndarray) -> str:
    """E.g. " in 12 groups (9 train, 3 val)" or " in 12 groups (folds of 4, 4, 4 images)"."""
    n_groups = group_count(groups)
    in_groups = f" in {n_groups} groups" if n_groups < len(groups) else ""
    if "fold" in split:
        sizes = ", ".join(map(str, np.bincount(split["fold"])))
        return f"{in_groups} (folds of {sizes} images)"
    is_val = split["is_val"]
    if not is_val.any():
        return in_groups
    return f"{in_groups} ({len(is_val) - is_val.sum()} train, {is_val.sum()} val)"


def _layout(names: list[str], groups: list[str], size: tuple[int, int],
            split: dict[str, np.ndarray], attrs: dict) -> bytes:
    """The cache as HDF5 file bytes with every dataset created and no pixel written yet."""
    n = len(names)
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as h5:
        h5.create_dataset("images", (n, *size, 3), np.uint8, chunks=(1, *size, 3))
        h5.create_dataset("masks", (n, *size), np.uint8, chunks=(1, *size))
        h5.create_dataset("orig_size", (n, 2), np.int32)
        h5.create_dataset("names", data=names, dtype=h5py.string_dtype())
        h5.create_dataset("groups", data=groups, dtype=h5py.string_dtype())
        for key, values in split.items():
            h5.create_dataset(key, data=values)
        h5.attrs.update(attrs)
    return buffer.getvalue()


def _create_reserved(path: Path, layout: bytes, count: int, size: tuple[int, int],
                     output: Path) -> None:
    """Write ``layout`` to ``path`` and reserve the disk space of the whole cache of ``count``
    images of ``size`` for it; HDF5 gives back what it does not use when it closes the file.

    HDF5 cannot close a file after a failed write: a full disk would end in a segmentation
    fault (h5py issue 914), while reserved space cannot run out. Reserved: the layout, 4 bytes
    per pixel (RGB and mask), 1 KiB per image and 1 MiB; HDF5 adds less than 400 bytes per
    image (the chunk index) and a few KiB in all.
    """
    reserve = len(layout) + count * (4 * size[0] * size[1] + 1024) + 2**20
    with open(path, "wb") as file:
        file.write(layout)
        try:
            os.posix_fallocate(file.fileno(), 0, reserve)
        except OSError as exc:
            raise SegpipeError(
                f"{output}: cannot reserve the {reserve / 2**20:.1f} MiB it needs ({exc.strerror})"
            ) from None


def _check_named(path: Path, annotation, labels: Labels) -> None:
    """A study with ``classes`` names every label of its files (LabelMe's VOC export refuses
    an unknown label too)."""
    unnamed = labels.unnamed(s.label for s in annotation.shapes)
    if unnamed:
        raise SegpipeError(
            f"{path}: label(s) {', '.join(map(repr, unnamed))} named by no entry of "
            "data.classes, data.background or data.ignore; add each to one of them")


def _check_labels(input_dir: Path, found: Counter, labels: Labels) -> None:
    """Some shape paints a class; labels the config names but no file has are logged."""
    names = ", ".join(sorted(found)) or "none"
    if not any(labels.value(label) not in (None, 0, IGNORE) for label in found):
        raise SegpipeError(
            f"{input_dir}: no shape paints a class ({labels.describe()}); labels of filled "
            f"shapes found: {names}")
    missing = labels.named_labels() - set(found)
    if missing:
        log.warning("%s: labels %s occur in no filled shape (found: %s)", input_dir,
                    sorted(missing), names)


def _shares(pixels: Counter, labels: Labels, total: int) -> str:
    """E.g. "foreground 12.3%" (binary) or "leaf 3.1%, stone 2.0%, ignore 0.5%"."""
    parts = [(name, pixels.get(value, 0)) for value, name in enumerate(labels.class_names)
             if value > 0]
    if IGNORE in pixels:
        parts.append(("ignore", pixels[IGNORE]))
    return ", ".join(f"{name} {100.0 * count / total:.1f}%" for name, count in parts)


def _counts(counter: Counter) -> str:
    return ", ".join(f"{key} {count}" for key, count in sorted(counter.items())) or "none"
