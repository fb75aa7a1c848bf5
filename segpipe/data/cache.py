"""The HDF5 cache of a LabelMe folder: its writer (:func:`build_cache`, ``segpipe rasterise``)
and its one reader (:class:`Cache`); no other module opens a cache.

Layout 2 (docs/formats.md). Per image ``i`` (its datasets named ``f"{i:07d}"``):
``images/<i>`` uint8 (h, w, 3) RGB at the working resolution (:mod:`segpipe.data.geometry`:
``data.size`` squashes, ``data.scale`` keeps the aspect), resized with area interpolation;
``masks/<i>`` uint8 (h, w) class indices (:mod:`segpipe.labels`: 0 background, 1…K, 255
ignore; {0, 1} in a binary study) rasterised there from scaled coordinates; ``truth/<i>``
uint8 (H, W) the same classes at the original size by LabelMe's own rule (the mask itself,
linked, when the sizes agree), what every reported score is computed against;
``locations/<i>`` int32 (n, 3) up to :data:`LOCATIONS_PER_CLASS` pixels (class, y, x) of each
foreground class, where oversampled patches are centred. Squashed images are one chunk each;
at a scale, images and masks are chunked in tiles of :data:`TILE` pixels, so a training patch
reads a few tiles and never decodes the whole photo; masks and truth are gzip-compressed
(photos barely compress losslessly and are read most, so they are not). Per cache:
``names`` (N,) utf-8 JSON file stems, ``groups`` (N,) their groups, ``photos`` (N,) the
identity of each image (:func:`segpipe.data.identity.photo_id`), ``orig_size`` and
``shape`` int32 (N, 2) the original and working (height, width), and the split
(:mod:`segpipe.data.split`): ``is_val`` bool (N,), or with ``folds`` the fold ``fold`` int64
(N,). Attributes: ``layout`` (2), ``segpipe_version``, ``source``, ``foreground``,
``background``, ``labels`` (:meth:`segpipe.labels.Labels.attrs`), ``group`` (JSON), ``size``
or ``scale`` (:meth:`segpipe.data.geometry.Geometry.attrs`), ``count``, ``split_seed``,
``val_fraction`` or ``folds``, and ``content_sha256`` (:func:`content_digest`). Images are
sorted by file name, so the same folder gives the same file.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from segpipe import SegpipeError, __version__
from segpipe.data.geometry import Geometry, to_working
from segpipe.data.groups import group_keys, merge_identical
from segpipe.data.identity import same_photos, seen_in
from segpipe.data.index import found_labels, labelme_index
from segpipe.data.labelme import load_annotations, rasterise
from segpipe.data.split import assign_folds, group_count, group_ids, split_validation
from segpipe.files import atomic_path, check_outputs, folder_images, labelme_files
from segpipe.labels import IGNORE, Labels
from segpipe.spec import default

CONTENT_KEY = "content_sha256"
LAYOUT = 2
"""The cache layout this segpipe writes and reads (attribute ``layout``)."""
TILE = 128
"""Side of the chunks of images and masks at a native scale, in pixels."""
MASK_FILTER = {"compression": "gzip", "compression_opts": 4, "shuffle": False}
LOCATIONS_PER_CLASS = 1000
LOCATIONS_SEED = 1234
IMAGE_OVERHEAD = 16 * 1024
"""Bytes of HDF5 objects (headers, chunk indexes) one image adds, at most."""
RESERVE_STEP = 2**20
"""The least disk space reserved at a time."""
"""Bytes of HDF5 objects (headers, chunk indexes) one image adds, at most."""
GROUPS = ("images", "masks", "truth", "locations")

log = logging.getLogger(__name__)


def build_cache(
    input_dir: str | Path,
    output: str | Path,
    geometry: Geometry | tuple[int, int],
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

    ``geometry``: the working resolution (:class:`segpipe.data.geometry.Geometry`; a pair
    (H, W) is ``Geometry(size=(H, W))``). Every file is read as far as its image's identity
    (:func:`segpipe.data.index.labelme_index`) before any is rasterised. The file is written
    under a temporary name, each image's disk space reserved before it is written, and renamed
    when complete. Raises :class:`SegpipeError` for a folder without LabelMe files, any invalid
    file (see :func:`segpipe.data.labelme.load_annotation`), an output that would replace an
    input (a LabelMe file, an image it names or one of the folder, the training cache), a
    folder that breaks the label rule (:meth:`segpipe.labels.Labels.folder_errors`, the
    workflow's: a training folder is one without ``train_cache``), a split the groups cannot
    make, an output that cannot be written and a disk without room for it. ``labels``: the
    classes (:class:`segpipe.labels.Labels`; default binary). ``workers``: threads that decode
    the photos (:func:`segpipe.data.labelme.load_annotations`); the cache is the same byte for
    byte.
    """
    input_dir, output = Path(input_dir), Path(output)
    if not isinstance(geometry, Geometry):
        geometry = Geometry(size=(int(geometry[0]), int(geometry[1])))
    labels = Labels() if labels is None else labels
    if val_fraction is None:
        val_fraction = 0.0 if folds is not None or train_cache is not None else \
            default("data.val_fraction")
    if geometry.size is not None and min(geometry.size) < 1:
        raise SegpipeError(f"size must be positive, got {geometry.describe()}")
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
        "layout": LAYOUT,
        **geometry.attrs(),
        "count": len(index),
        "split_seed": split_seed,
        **({"val_fraction": val_fraction} if folds is None else {"folds": folds}),
    }
    found, skipped, pixels, total = _write(output, [entry.path for entry in index], geometry,
                                           labels, _layout(names, keys, photos, split, attrs),
                                           workers)
    log.info(
        "%s: %d images%s at %s, %s; %s of pixels; shapes: %s; skipped (no area): %s",
        output, len(index), _describe_split(split, groups), geometry.describe(),
        labels.describe(), _shares(pixels, labels, total), _counts(found), _counts(skipped),
    )


def _read_folder(input_dir: Path, output: Path, labels: Labels, train_cache: str | Path | None,
                 drop_duplicates: bool) -> list:
    """The LabelMe files of ``input_dir`` read as far as their images' identities
    (:func:`segpipe.data.index.labelme_index`), checked before any is rasterised: the output
    replaces no input (a LabelMe file, a file one names, an image of the folder, the training
    cache), the folder keeps the label rule, and (a test folder) no image is one of
    the training cache, or with ``drop_duplicates`` those are left out."""
    files = labelme_files(input_dir)
    inputs = {path: f"a LabelMe file of {input_dir}" for path in files}
    if train_cache is not None:
        inputs[Path(train_cache)] = "the training cache (--train-cache)"
    check_outputs([output], inputs)
    index = labelme_index(files)
    # Every image a file names, read or not (imageData comes first), and every other photo.
    check_outputs([output], {
        **{path: f"an image of {input_dir}" for path in folder_images(input_dir)},
        **{entry.named_image: f"the image of {entry.path}" for entry in index
           if entry.named_image is not None}})
    found = found_labels(index)
    errors = labels.folder_errors(found, str(input_dir), training=train_cache is None)
    if errors:
        raise SegpipeError("\n".join(errors))
    for note in labels.folder_notes(found, str(input_dir)):
        log.info(note)
    return index if train_cache is None else _unseen(index, Path(train_cache), drop_duplicates)


def _write(output: Path, files: list[Path], geometry: Geometry, labels: Labels,
           layout: bytes, workers: int) -> tuple[Counter, Counter, Counter, int]:
    """Rasterise ``files`` into the cache ``output`` of ``layout`` (:func:`_layout`), written
    under a temporary name with disk space reserved ahead of each image (:class:`_Reservation`)
    and renamed when complete; the labels of the filled shapes, the shapes skipped, the pixels
    of each mask value and the pixels in all, counted."""
    found, skipped, pixels, first_row, total = Counter(), Counter(), Counter(), {}, 0
    with atomic_path(output) as partial:
        reservation = _Reservation(partial, layout, output)
        h5 = h5py.File(partial, "r+", libver="latest")
        try:
            for i, annotation in enumerate(tqdm(load_annotations(files, workers), total=len(files),
                                                desc="rasterise", unit="image", disable=None)):
                shape = geometry.working_size(annotation.size)
                image = to_working(annotation.image, shape)
                mask = rasterise(annotation, shape, labels)
                truth = mask if shape == annotation.size else rasterise(annotation, None, labels)
                locations = _class_locations(mask, i)
                if reservation.grow(_bytes_bound(shape, truth is not mask and truth.shape,
                                                 geometry.native, locations)):
                    h5.close()  # reopened, HDF5 learns the file's new end, and gives back
                    h5 = h5py.File(partial, "r+", libver="latest")  # what it did not use
                _write_image(h5, i, image, mask, truth, locations, geometry.native)
                first = first_row.setdefault(annotation.image_digest, i)
                differ = 0 if first == i else int((_read_truth(h5, first) != truth).sum())
                if differ:
                    log.warning("%s and %s: the same image annotated differently (the masks "
                                "differ in %d of %dx%d pixels)", files[first], files[i], differ,
                                *truth.shape)
                h5["orig_size"][i], h5["shape"][i] = annotation.size, shape
                pixels.update(dict(zip(*np.unique(mask, return_counts=True))))
                total += mask.size
                found.update(s.label for s in annotation.shapes)
                skipped.update(annotation.skipped)
            h5.attrs[CONTENT_KEY] = content_digest(h5)
        finally:
            h5.close()
    return found, skipped, pixels, total


def _bytes_bound(shape: tuple[int, int], truth: tuple[int, int] | bool, native: bool,
                 locations: np.ndarray) -> int:
    """An upper bound of the bytes one image adds to a cache: its chunks (whole tiles at a
    native scale), the RGB raw, mask and truth compressed no larger than 1 % over raw, its
    class locations and :data:`IMAGE_OVERHEAD`."""
    def stored(size: tuple[int, int]) -> int:
        return math.prod(-(-side // TILE) * TILE for side in size) if native else math.prod(size)
    masks = stored(shape) + (stored(truth) if truth else 0)
    return 3 * stored(shape) + math.ceil(1.01 * masks) + locations.nbytes + IMAGE_OVERHEAD


def _key(row: int) -> str:
    """The name of an image's datasets in their groups: zero-padded, so name order is row
    order."""
    return f"{row:07d}"


def _write_image(h5: h5py.File, row: int, image: np.ndarray, mask: np.ndarray,
                 truth: np.ndarray, locations: np.ndarray, native: bool) -> None:
    """One image's datasets (docs/formats.md): tiles of :data:`TILE` pixels as chunks at a
    native scale (a patch reads a few of them), one chunk each when squashed; masks and truth
    compressed; the truth a second name of the mask when they are one."""
    key, (height, width) = _key(row), mask.shape
    chunks = (min(height, TILE), min(width, TILE)) if native else (height, width)
    h5["images"].create_dataset(key, data=image, chunks=(*chunks, 3))
    h5["masks"].create_dataset(key, data=mask, chunks=chunks, **MASK_FILTER)
    if truth is mask:
        h5["truth"][key] = h5["masks"][key]  # a hard link: the same dataset
    else:
        h5["truth"].create_dataset(key, data=truth, chunks=(min(truth.shape[0], TILE),
                                                            min(truth.shape[1], TILE)),
                                   **MASK_FILTER)
    h5["locations"].create_dataset(key, data=locations)


def _read_truth(h5: h5py.File, row: int) -> np.ndarray:
    return h5["truth"][_key(row)][()]


def _class_locations(mask: np.ndarray, row: int) -> np.ndarray:
    """(n, 3) int32 rows (class, y, x): up to :data:`LOCATIONS_PER_CLASS` pixels of each
    foreground class of ``mask`` drawn without replacement (seeded by the row), where patches
    with foreground oversampling are centred (nnU-Net's class locations)."""
    rng = np.random.default_rng([LOCATIONS_SEED, row])
    rows = []
    for value in np.unique(mask):
        if value == 0 or value == IGNORE:
            continue
        ys, xs = np.nonzero(mask == value)
        keep = rng.choice(len(ys), min(len(ys), LOCATIONS_PER_CLASS), replace=False)
        keep.sort()
        rows.append(np.stack([np.full(len(keep), value), ys[keep], xs[keep]], 1))
    return np.concatenate(rows).astype(np.int32) if rows else np.zeros((0, 3), np.int32)


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
    with Cache(train_cache) as cache:
        photos, names = cache.photos, cache.names
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
    for name, data in _datasets(h5):
        digest.update(json.dumps([name, data.dtype.str, data.shape]).encode())
        if h5py.check_string_dtype(data.dtype):
            digest.update(json.dumps(list(data.asstr()[:])).encode())
        else:
            for start in range(0, len(data), 64):
                digest.update(np.ascontiguousarray(data[start:start + 64]).tobytes())
    for key in sorted(set(h5.attrs) - {CONTENT_KEY, "source", "segpipe_version"}):
        digest.update(json.dumps([key, np.asarray(h5.attrs[key]).tolist()]).encode())
    return digest.hexdigest()


def _datasets(h5: h5py.File):
    """(name, dataset) of every dataset of a cache, groups' members in row order."""
    for name in sorted(h5):
        if isinstance(h5[name], h5py.Group):
            for key in sorted(h5[name]):
                yield f"{name}/{key}", h5[name][key]
        else:
            yield name, h5[name]


def _layout(names: list[str], groups: list[str], photos: list[str],
            split: dict[str, np.ndarray], attrs: dict) -> bytes:
    """The cache as HDF5 file bytes with its per-cache datasets and empty per-image groups."""
    n = len(names)
    buffer = io.BytesIO()
    with h5py.File(buffer, "w", libver="latest") as h5:
        for group in GROUPS:
            h5.create_group(group)
        h5.create_dataset("orig_size", (n, 2), np.int32)
        h5.create_dataset("shape", (n, 2), np.int32)
        h5.create_dataset("names", data=names, dtype=h5py.string_dtype())
        h5.create_dataset("groups", data=groups, dtype=h5py.string_dtype())
        h5.create_dataset("photos", data=photos, dtype=h5py.string_dtype())
        for key, values in split.items():
            h5.create_dataset(key, data=values)
        h5.attrs.update(attrs)
    return buffer.getvalue()


class _Reservation:
    """Disk space reserved ahead of HDF5's writes into ``path``: the layout and
    :data:`RESERVE_STEP` at first, then, whenever the bytes the images may need (:meth:`grow`)
    pass what is reserved, those and :data:`RESERVE_STEP` more, or half as much again as was
    reserved if that is more (a few reservations for any number of images). HDF5 gives back what it did not use when it
    closes a file it opened shorter than reserved.

    HDF5 cannot close a file after a failed write: a full disk would end in a segmentation
    fault (h5py issue 914), while reserved space cannot run out."""

    def __init__(self, path: Path, layout: bytes, output: Path) -> None:
        self.path, self.output = path, output
        self.needed, self.reserved = len(layout), 0
        path.write_bytes(layout)
        self.grow(0)

    def grow(self, count: int) -> bool:
        """Count ``count`` more bytes needed; whether more space was reserved for them."""
        self.needed += count
        if self.needed <= self.reserved:
            return False
        target = max(self.needed + RESERVE_STEP, int(1.5 * self.reserved))
        with open(self.path, "r+b") as file:
            try:
                os.posix_fallocate(file.fileno(), 0, target)
            except OSError as exc:
                raise SegpipeError(f"{self.output}: cannot reserve the {target / 2**20:.1f} MiB "
                                   f"it needs ({exc.strerror})") from None
        self.reserved = target
        return True


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


class Cache:
    """A cache of :func:`build_cache` for reading: the one reader (training, evaluation and the
    workflow's checks go through it). Opened on first use in each process, so that DataLoader
    workers, which receive it pickled, open their own handle; usable as a context manager.
    Raises :class:`SegpipeError` naming the file for one that is missing, not HDF5, or not of
    this segpipe's :data:`LAYOUT` (an older segpipe's: rasterise again)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._h5: h5py.File | None = None
        self._pid: int | None = None
        h5 = self._file()
        version = h5.attrs.get("layout")
        if version != LAYOUT or not set(GROUPS) <= set(h5):
            self.close()
            raise SegpipeError(f"{self.path}: not a segpipe cache of layout {LAYOUT} "
                               f"({'layout ' + str(version) if version else 'an older one'}, "
                               "written by another segpipe): rasterise it again")
        self.labels = Labels.from_attrs(h5.attrs)
        self.geometry = Geometry.from_attrs(h5.attrs)
        self.names: list[str] = list(h5["names"].asstr()[:])
        self.orig_size = h5["orig_size"][:]
        self.shape = h5["shape"][:]

    def _file(self) -> h5py.File:
        if self._pid != os.getpid():
            try:
                self._h5 = h5py.File(self.path, "r")
            except OSError as exc:
                raise SegpipeError(f"{self.path}: cannot open HDF5 cache ({exc})") from None
            self._pid = os.getpid()
        return self._h5

    def __len__(self) -> int:
        return len(self.names)

    def __enter__(self) -> Cache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._h5 is not None and self._pid == os.getpid():
            self._h5.close()
        self._h5 = self._pid = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_h5": None, "_pid": None}

    @property
    def attrs(self) -> dict:
        return dict(self._file().attrs)

    @property
    def photos(self) -> list[str]:
        """Each image's identity (:func:`segpipe.data.identity.photo_id`)."""
        return list(self._file()["photos"].asstr()[:])

    def split(self, key: str) -> np.ndarray | None:
        """The split dataset ``is_val`` or ``fold``; None when the cache has none."""
        h5 = self._file()
        return h5[key][()] if key in h5 else None

    def image(self, row: int, window: tuple[int, int, int, int] | None = None) -> np.ndarray:
        """The image (h, w, 3) at the working resolution, or its ``window`` (y0, x0, y1, x1),
        which may reach outside the image: those pixels are 0 (black)."""
        return _read(self._file()["images"][_key(row)], window)

    def mask(self, row: int, window: tuple[int, int, int, int] | None = None) -> np.ndarray:
        """The class mask (h, w) at the working resolution, or its ``window`` (outside the
        image: 0, background)."""
        return _read(self._file()["masks"][_key(row)], window)

    def truth(self, row: int) -> np.ndarray:
        """The class mask (H, W) at the image's original size: what scores are computed on."""
        return self._file()["truth"][_key(row)][()]

    def locations(self, row: int) -> np.ndarray:
        """(n, 3) int32 rows (class, y, x) of foreground pixels (:func:`_class_locations`)."""
        return self._file()["locations"][_key(row)][()]


def _read(data: h5py.Dataset, window: tuple[int, int, int, int] | None) -> np.ndarray:
    """A dataset's values, or a window of its first two axes, zero outside."""
    if window is None:
        return data[()]
    y0, x0, y1, x1 = window
    height, width = data.shape[:2]
    out = np.zeros((y1 - y0, x1 - x0, *data.shape[2:]), data.dtype)
    top, left, bottom, right = max(y0, 0), max(x0, 0), min(y1, height), min(x1, width)
    if top < bottom and left < right:
        out[top - y0:bottom - y0, left - x0:right - x0] = data[top:bottom, left:right]
    return out
