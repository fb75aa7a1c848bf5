"""HDF5 cache of a LabelMe folder: images and masks at the training size, and the split.

Layout (docs/formats.md): ``images`` uint8 (N, H, W, 3) RGB resized with area
interpolation, ``masks`` uint8 (N, H, W) class indices (:mod:`segpipe.labels`: 0 background, 1…K, 255
ignore; {0, 1} in a binary study) rasterised at (H, W) from scaled
coordinates, ``names`` (N,) utf-8 JSON file stems, ``groups`` (N,) utf-8 their groups,
``orig_size`` int32 (N, 2) original (height, width), ``photos`` (N,) the identity of each
image (:func:`segpipe.data.identity.photo_id`), and the split (:mod:`segpipe.data.split`):
``is_val`` bool (N,), or with ``folds`` the cross-validation fold ``fold`` int64 (N,); one image
per chunk; attributes ``segpipe_version``, ``source``, ``foreground``, ``background``, ``labels``
(with classes or ignore labels: :meth:`segpipe.labels.Labels.attrs`), ``group`` (JSON),
``size``, ``count``, ``split_seed``, ``val_fraction`` or ``folds``, and ``content_sha256``
(:func:`content_digest`). Images are sorted by file name, so the same folder gives the same
file.
"""

from __future__ import annotations

import hashlib
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
from segpipe.data.groups import group_keys, merge_identical
from segpipe.data.identity import same_photos, seen_in
from segpipe.data.index import found_labels, labelme_index
from segpipe.data.labelme import load_annotations, rasterise
from segpipe.data.split import assign_folds, group_count, group_ids, split_validation
from segpipe.files import atomic_path, check_outputs, labelme_files
from segpipe.labels import IGNORE, Labels
from segpipe.spec import default

CONTENT_KEY = "content_sha256"

log = logging.getLogger(__name__)


def build_cache(
    input_dir: str | Path,
    output: str | Path,
    size: tuple[int, int],
    labels: Labels | None = None,
    val_fraction: float | None = None,
    split_seed: int = default("data.split_seed"),
    folds: int | None = default("data.folds"),
    group: str | None = default("data.group"),
    train_cache: str | Path | None = None,
    drop_duplicates: bool = default("data.drop_test_duplicates"),
    workers: int = default("resources.rasterise_threads"),
) -> None:
    """Rasterise the LabelMe files of ``input_dir`` (:func:`segpipe.files.labelme_files`) into
    the HDF5 file ``output``, with the validation split ``val_fraction`` or, with ``folds``, the
    cross-validation folds, both drawn by ``split_seed`` over the groups of the regular
    expression ``group``; the images of one photo (:mod:`segpipe.data.identity`: however
    stored) are one group, logged as a warning, with a second one where their masks differ.

    ``val_fraction`` ``None`` is the config's default (``data.val_fraction``) for a training
    folder, and no validation split with ``folds`` or for a test folder, which is built against
    the ``train_cache`` of its study: an image of it is an error, or with ``drop_duplicates``
    left out of this cache with a warning. The other defaults are the config's too
    (:func:`segpipe.spec.default`).

    Every file is read as far as its image's identity (:func:`segpipe.data.index.labelme_index`)
    before any is rasterised. The file is written
    under a temporary name, with its disk space reserved before the first image, and renamed
    when complete. Raises :class:`SegpipeError` for a folder without LabelMe files, any invalid
    file (see :func:`segpipe.data.labelme.load_annotation`), an output that would replace an
    input (a LabelMe file, an image, the training cache), a folder that breaks the label rule
    (:meth:`segpipe.labels.Labels.folder_errors`, the workflow's: a training folder is one
    without ``train_cache``), a split the groups cannot make, an output that cannot be written
    and a disk without room for it. ``labels``: the classes (:class:`segpipe.labels.Labels`;
    default binary). ``workers``: threads that decode the photos
    (:func:`segpipe.data.labelme.load_annotations`); the cache is the same byte for byte.
    """
    input_dir, output = Path(input_dir), Path(output)
    size = height, width = int(size[0]), int(size[1])
    labels = Labels() if labels is None else labels
    if val_fraction is None:
        val_fraction = 0.0 if folds is not None or train_cache is not None else \
            default("data.val_fraction")
    if height < 1 or width < 1:
        raise SegpipeError(f"size must be positive, got {height}x{width}")
    if not 0.0 <= val_fraction < 1.0:
        raise SegpipeError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if folds is not None and val_fraction > 0:
        raise SegpipeError("folds and val_fraction exclude each other: with folds, the "
                           "validation images of a fold are those of the next fold")
    index = _read_folder(input_dir, output, labels, train_cache, drop_duplicates)
    names, photos = [entry.path.stem for entry in index], [entry.photo for entry in index]
    same = same_photos(photos)
    keys = merge_identical(group_keys(names, group), same)
    for positions in same:
        log.warning("%s: the same photo: one group, %r, on one side of every split",
                    " and ".join(str(index[i].path) for i in positions), keys[positions[0]])
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
        "count": len(index),
        "split_seed": split_seed,
        **({"val_fraction": val_fraction} if folds is None else {"folds": folds}),
    }
    found, skipped, pixels = _write(output, [entry.path for entry in index], size, labels,
                                    _layout(names, keys, photos, size, split, attrs), workers)
    log.info(
        "%s: %d images%s at %dx%d, %s; %s of pixels; shapes: %s; skipped (no area): %s",
        output, len(index), _describe_split(split, groups), height, width, labels.describe(),
        _shares(pixels, labels, len(index) * height * width), _counts(found), _counts(skipped),
    )


def _read_folder(input_dir: Path, output: Path, labels: Labels, train_cache: str | Path | None,
                 drop_duplicates: bool) -> list:
    """The LabelMe files of ``input_dir`` read as far as their images' identities
    (:func:`segpipe.data.index.labelme_index`), checked before any is rasterised: the output
    replaces no input, the folder keeps the label rule, and (a test folder) no image is one of
    the training cache, or with ``drop_duplicates`` those are left out."""
    files = labelme_files(input_dir)
    inputs = {path: f"a LabelMe file of {input_dir}" for path in files}
    if train_cache is not None:
        inputs[Path(train_cache)] = "the training cache (--train-cache)"
    check_outputs([output], inputs)
    index = labelme_index(files)
    check_outputs([output], {entry.image_file: f"the image of {entry.path}"
                             for entry in index if entry.image_file is not None})
    errors = labels.folder_errors(found_labels(index), str(input_dir),
                                  training=train_cache is None)
    if errors:
        raise SegpipeError("\n".join(errors))
    return index if train_cache is None else _unseen(index, Path(train_cache), drop_duplicates)


def _write(output: Path, files: list[Path], size: tuple[int, int], labels: Labels,
           layout: bytes, workers: int) -> tuple[Counter, Counter, Counter]:
    """Rasterise ``files`` into the cache ``output`` of ``layout`` (:func:`_layout`), written
    under a temporary name with its space reserved and renamed when complete; the labels of
    the filled shapes, the shapes skipped and the pixels of each mask value, counted."""
    height, width = size
    found, skipped, pixels, first_row = Counter(), Counter(), Counter(), {}
    with atomic_path(output) as partial:
        _create_reserved(partial, layout, len(files), size, output)
        with h5py.File(partial, "r+") as h5:
            images, masks, orig_size = h5["images"], h5["masks"], h5["orig_size"]
            for i, annotation in enumerate(tqdm(load_annotations(files, workers), total=len(files),
                                                desc="rasterise", unit="image", disable=None)):
                images[i] = cv2.resize(annotation.image, (width, height),
                                       interpolation=cv2.INTER_AREA)
                masks[i] = mask = rasterise(annotation, size, labels)
                first = first_row.setdefault(annotation.image_digest, i)
                if first != i and (masks[first] != mask).any():
                    log.warning("%s and %s: the same image annotated differently (the masks "
                                "differ in %d of %dx%d pixels)", files[first], files[i],
                                int((masks[first] != mask).sum()), height, width)
                orig_size[i] = annotation.size
                pixels.update(dict(zip(*np.unique(mask, return_counts=True))))
                found.update(s.label for s in annotation.shapes)
                skipped.update(annotation.skipped)
            h5.attrs[CONTENT_KEY] = content_digest(h5)
    return found, skipped, pixels


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


def _unseen(index: list, train_cache: Path, drop: bool) -> list:
    """The entries of ``index`` whose photo is not one of ``train_cache``
    (:func:`segpipe.data.identity.seen_in`); one that is, is an error or (``drop``) left out
    with a warning."""
    try:
        with h5py.File(train_cache, "r") as h5:
            if "photos" not in h5:
                raise SegpipeError(f"{train_cache}: holds no photo identities (written by an "
                                   "older segpipe): rasterise it again")
            photos, names = list(h5["photos"].asstr()[:]), list(h5["names"].asstr()[:])
    except OSError as exc:
        raise SegpipeError(f"{train_cache}: not a readable segpipe cache ({exc})") from None
    seen = seen_in([entry.photo for entry in index], photos)
    repeated = [f"{entry.path}: the same photo as {names[j]!r} of the training cache "
                f"{train_cache}" for entry, j in zip(index, seen) if j is not None]
    if repeated and not drop:
        raise SegpipeError("\n".join([*repeated, "a test image must be unseen in training: remove "
                                       "it from one folder, or leave it out of the test cache "
                                       "(--drop-duplicates; data.drop_test_duplicates: true)"]))
    for line in repeated:
        log.warning("%s: left out of this cache", line)
    kept = [entry for entry, j in zip(index, seen) if j is None]
    if not kept:
        raise SegpipeError(f"every image is one of the training cache {train_cache}")
    return kept


def content_digest(h5: h5py.File) -> str:
    """SHA-256 (hex) of what a cache holds: every dataset (name, dtype, shape, values) and every
    attribute but this digest and the provenance (``source``, ``segpipe_version``), in name
    order. Two caches of equal content have equal digests, whenever, wherever and by whichever
    segpipe version they were written; training recognises its data by it."""
    digest = hashlib.sha256()
    for name in sorted(h5):
        data = h5[name]
        digest.update(json.dumps([name, data.dtype.str, data.shape]).encode())
        if h5py.check_string_dtype(data.dtype):
            digest.update(json.dumps(list(data.asstr()[:])).encode())
        else:
            for start in range(0, len(data), 64):
                digest.update(np.ascontiguousarray(data[start:start + 64]).tobytes())
    for key in sorted(set(h5.attrs) - {CONTENT_KEY, "source", "segpipe_version"}):
        digest.update(json.dumps([key, np.asarray(h5.attrs[key]).tolist()]).encode())
    return digest.hexdigest()


def _layout(names: list[str], groups: list[str], photos: list[str], size: tuple[int, int],
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
        h5.create_dataset("photos", data=photos, dtype=h5py.string_dtype())
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


def _shares(pixels: Counter, labels: Labels, total: int) -> str:
    """E.g. "foreground 12.3%" (binary) or "leaf 3.1%, stone 2.0%, ignore 0.5%"."""
    parts = [(name, pixels.get(value, 0)) for value, name in enumerate(labels.class_names)
             if value > 0]
    if IGNORE in pixels:
        parts.append(("ignore", pixels[IGNORE]))
    return ", ".join(f"{name} {100.0 * count / total:.1f}%" for name, count in parts)


def _counts(counter: Counter) -> str:
    """E.g. "leaf 3, stone 4"; a label that is empty or has outer spaces quoted: "'' 1"."""
    return ", ".join(f"{key if key and key == key.strip() else repr(key)} {count}"
                     for key, count in sorted(counter.items())) or "none"
