"""Inference from self-describing checkpoints: ``segpipe predict`` on a folder of new images.

A checkpoint (``model.pt`` or a snapshot, :mod:`segpipe.checkpoint`) holds the
architecture and backbone definitions, the input size and the normalisation, so no config is
needed. Several checkpoints (the seeds and folds of a run) predict as an **ensemble**: their
probabilities are averaged, as nnU-Net predicts with its five folds (Isensee et al. 2021,
Nat. Methods 18:203); with ``tta`` each also sees the image mirrored horizontally, vertically
and both ways, the mirrored predictions flipped back and averaged the same way. Each image
goes through the models as the checkpoints say (:class:`segpipe.inference.Predictor`):
squashed to the training size, or at the study's scale by Gaussian-weighted sliding windows;
the averaged probabilities are resized back to the original size bilinearly, as evaluation
scores them. A binary model's pixels with ``probability >= threshold`` are foreground, else
the class of the largest probability (argmax; 0 background).

Formats (docs/formats.md): ``png``, a binary 0/255 mask or for several classes a palette PNG of
class indices with the VOC colours (as LabelMe's VOC export writes it); ``labelme``, a LabelMe
JSON of polygons (:func:`segpipe.data.labelme.mask_shapes`) for an annotator to correct. Every
run also writes ``uncertainty.csv`` (:func:`uncertainty`), which ranks the images most
uncertain first: those to annotate next.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import itertools
import json
import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.PngImagePlugin
from tqdm import tqdm

from segpipe import SegpipeError
from segpipe.columns import REFERENCE_RUNS
from segpipe.data.geometry import to_original
from segpipe.data.labelme import (Simplification, decode_image, is_unedited_prediction,
                                  labelme_document, mask_shapes)
from segpipe.files import (PREDICTION_FORMATS, UNCERTAINTY_CSV, atomic_path, check_outputs,
                           existing_predictions, image_files, prediction_paths, write_csv)
from segpipe.inference import Predictor, image_batch
from segpipe.labels import Labels
from segpipe.runtime import acquire_device
from segpipe.spec import default

log = logging.getLogger(__name__)

PNG_SOFTWARE = "segpipe predict"
"""The ``Software`` text of the masks segpipe writes, which tells them from a user's."""
PNG_DIGEST = "segpipe-sha256"
"""The text of a mask segpipe writes that holds the SHA-256 of its pixels."""
UNCERTAINTY_COLUMNS = ("rank", "name", "image", "disagreement", "entropy", "members",
                       "foreground")


def read_image(path: Path) -> np.ndarray:
    """RGB uint8 (H, W, 3) of an image file, converted as for the cache
    (:func:`segpipe.data.labelme.decode_image`)."""
    try:
        encoded = path.read_bytes()
    except OSError as exc:
        raise SegpipeError(f"{path}: cannot read ({exc.strerror})") from None
    return decode_image(encoded, str(path))


def checkpoint_paths(sources: Sequence[str | Path], listed_in: str | None = None) -> list[Path]:
    """The checkpoints named by ``sources``: a file is one; a folder gives every ``model.pt``
    in or below it (a run folder: its own, or one per fold; never its snapshots); ``@list``
    reads one source per line of the file ``list`` (relative to the working directory, as
    the workflow writes them). Each once, in order."""
    where = "" if listed_in is None else f" (listed in {listed_in})"
    found: dict[Path, None] = {}
    for source in sources:
        source = str(source)
        if source.startswith("@"):
            try:
                lines = Path(source[1:]).read_text().splitlines()
            except OSError as exc:
                raise SegpipeError(f"{source[1:]}: cannot read ({exc.strerror})") from None
            listed = [line.strip() for line in lines if line.strip()]
            if not listed:
                raise SegpipeError(f"{source[1:]}: lists no checkpoint or run folder (an "
                                   f"experiment's {REFERENCE_RUNS} is empty when no run "
                                   "recorded a validation Dice to choose its reference)")
            found.update(dict.fromkeys(checkpoint_paths(listed, source[1:])))
        elif Path(source).is_dir():
            models = sorted(p for p in Path(source).rglob("model.pt")
                            if "snapshots" not in p.relative_to(source).parts)
            if not models:
                raise SegpipeError(f"{source}: holds no model.pt (a run folder, or a folder of "
                                   f"runs, holds one per run and fold){where}")
            found.update(dict.fromkeys(models))
        elif not Path(source).is_file():
            raise SegpipeError(f"{source}: checkpoint not found{where}")
        else:
            found[Path(source)] = None
    return list(found)


def uncertainty(members: Iterable[np.ndarray], labels: Labels, threshold: float = 0.5
                ) -> tuple[dict, np.ndarray]:
    """How unsure an ensemble is of an image, from its members' probabilities (C, h, w) (an
    iterable, consumed once: one member's probabilities in memory at a time, beside every
    member's class map), and the members' mean probabilities (C, h, w):

    - ``entropy``: the mean over the pixels of the entropy of the averaged probabilities,
      divided by its maximum (ln 2 for a binary model, ln C otherwise), so in [0, 1];
    - ``disagreement``: 1 − the mean Dice between the masks of every two members (the
      committee's disagreement, Seung et al. 1992, COLT), NaN with one member. Two masks'
      Dice is the mean over the foreground classes either holds; both empty is agreement (1).
    """
    total, masks = None, []
    for member in members:
        member = np.asarray(member, dtype=np.float32)
        total = member.copy() if total is None else total + member
        masks.append(labels.predict(member[0] if labels.binary else member, threshold))
    mean = total / len(masks)
    p = np.clip(mean, 1e-12, 1.0)
    if labels.binary:
        q = np.clip(1.0 - mean[0], 1e-12, 1.0)
        entropy = -(p[0] * np.log(p[0]) + q * np.log(q)) / math.log(2)
    else:
        entropy = -(p * np.log(p)).sum(axis=0) / math.log(len(p))
    pairs = [_dice(a, b, labels.binary) for a, b in itertools.combinations(masks, 2)]
    return ({"entropy": float(entropy.mean()),
             "disagreement": 1.0 - float(np.mean(pairs)) if pairs else float("nan"),
             "members": len(masks)}, mean)


def _dice(a: np.ndarray, b: np.ndarray, binary: bool) -> float:
    """Dice of two class maps: the mean over the foreground classes either holds (1: none)."""
    classes = [1] if binary else [c for c in np.union1d(np.unique(a), np.unique(b)) if c > 0]
    scores = [2.0 * ((a == c) & (b == c)).sum() / ((a == c).sum() + (b == c).sum())
              for c in classes if (a == c).any() or (b == c).any()]
    return float(np.mean(scores)) if scores else 1.0


def ranked(rows: list[dict]) -> list[dict]:
    """``rows`` (:func:`uncertainty` of each image) most uncertain first, numbered ``rank``:
    by disagreement, then entropy (disagreement is NaN for one member: by entropy alone)."""
    def key(row: dict) -> tuple[float, float]:
        disagreement = row["disagreement"]
        return (0.0 if math.isnan(disagreement) else -disagreement, -row["entropy"])
    return [{**row, "rank": rank} for rank, row in enumerate(sorted(rows, key=key), start=1)]


def predict_folder(checkpoints: Path | Sequence[Path], input_dir: Path, output_dir: Path,
                   threshold: float | None = None, formats: Sequence[str] = ("png",),
                   tta: bool | None = None, simplification: Simplification | None = None,
                   embed_image: bool | None = None, device: str = "auto") -> None:
    """Predict every image of ``input_dir`` with the ensemble of ``checkpoints``
    (:func:`checkpoint_paths`) into ``output_dir``: each format's file per image
    (:func:`segpipe.files.prediction_paths`) and :data:`UNCERTAINTY_CSV`; all of them or,
    after an error, none (each is written under a temporary name, and all are renamed once
    every one is written). The predictions of a folder are one set
    (:func:`segpipe.files.existing_predictions`): the new set replaces the one ``output_dir``
    holds as a whole, its files for images no longer in ``input_dir`` removed, and only when
    every file of it is segpipe's and unchanged since (:func:`_check_replaceable`): a mask,
    annotation or uncertainty.csv of the user's, or a corrected prediction, stops it before
    anything is written. ``output_dir`` may be neither ``input_dir`` nor hold a path that
    would replace an input (an image, a LabelMe file, a checkpoint). ``embed_image``: LabelMe
    files carry the image (``imageData``) instead of only its path. Settings left None take
    the config's defaults (``evaluate.threshold``, ``predict.tta``, ``predict.embed_image``;
    the polygons': :meth:`Simplification.default`)."""
    threshold = default("evaluate.threshold") if threshold is None else threshold
    tta = default("predict.tta") if tta is None else tta
    embed_image = default("predict.embed_image") if embed_image is None else embed_image
    simplification = simplification or Simplification.default()
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    checkpoints = checkpoint_paths([checkpoints] if isinstance(checkpoints, (str, Path))
                                   else checkpoints)
    unknown = [f for f in formats if f not in PREDICTION_FORMATS]
    if unknown or not formats:
        raise SegpipeError(f"format {', '.join(unknown) or 'none'}: expected some of "
                           f"{', '.join(PREDICTION_FORMATS)}")
    formats = list(dict.fromkeys(formats))
    images = image_files(input_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise SegpipeError(f"{output_dir}: exists and is not a folder: choose another --output")
    if output_dir.resolve() == input_dir.resolve():
        raise SegpipeError(f"{output_dir}: is the input folder; the predictions would replace or "
                           "join the images and their annotations: choose another --output")
    outputs = {path: prediction_paths(output_dir, path.stem, formats) for path in images}
    csv_path = output_dir / UNCERTAINTY_CSV
    inputs = {**{path: "an input image" for path in images},
              **{path: "a LabelMe file of the input" for path in input_dir.glob("*.json")},
              **{path: "a checkpoint" for path in checkpoints}}
    targets = [p for paths in outputs.values() for p in paths.values()]
    check_outputs([csv_path, *targets], inputs)
    previous = existing_predictions(output_dir)  # one set: replaced as a whole, or not at all
    for path in previous:
        _check_replaceable(path)
    predictor = Predictor.load(checkpoints, acquire_device(device), tta)
    labels = predictor.labels
    rows = []
    with _removed_if_empty_on_error({csv_path.parent, *(p.parent for p in targets)}), \
            contextlib.ExitStack() as written:  # renamed together when the block succeeds
        for path in tqdm(images, desc="predict", unit="image", disable=None):
            image = read_image(path)
            members = predictor.members(image_batch([predictor.working(image)]))
            scores, mean = uncertainty((member[0].numpy() for member in members), labels,
                                       threshold)
            probs = to_original(mean, image.shape[:2])
            classes = labels.predict(probs[0] if labels.binary else probs, threshold)
            rows.append({"name": path.stem, "image": str(path), **scores,
                         "foreground": float((classes > 0).mean())})
            for fmt, target in outputs[path].items():
                tmp = written.enter_context(atomic_path(target))
                if fmt == "png":
                    write_png(tmp, classes, labels)
                else:
                    own = probs[0] if labels.binary else np.take_along_axis(
                        probs, classes[None].astype(np.intp), axis=0)[0]
                    shapes = mask_shapes(classes, labels, simplification, own)
                    document = labelme_document(shapes, path, target, image.shape[:2],
                                                path.read_bytes() if embed_image else None)
                    tmp.write_text(json.dumps(document, indent=2))
        write_csv(written.enter_context(atomic_path(csv_path)), UNCERTAINTY_COLUMNS, ranked(rows))
    for path in set(previous) - {csv_path, *targets}:  # of another input folder, or format
        path.unlink(missing_ok=True)
    key = "disagreement, then entropy" if rows[0]["members"] > 1 else "entropy"
    log.info("wrote %s of %d image(s) (%s, ensemble of %d%s) and %s (ranked by %s) to %s",
             " and ".join(formats), len(images), labels.describe(), len(checkpoints),
             ", mirrored" if tta else "", UNCERTAINTY_CSV, key, output_dir)


@contextlib.contextmanager
def _removed_if_empty_on_error(folders: set[Path]):
    """Folders (and their parents) that do not exist yet are removed again, when empty, if the
    block fails: a failed prediction leaves nothing behind."""
    new = {f for folder in folders for f in (folder, *folder.parents) if not f.exists()}
    try:
        yield
    except BaseException:
        for folder in sorted(new, key=lambda f: len(f.parts), reverse=True):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _check_replaceable(path: Path) -> None:
    """An existing prediction file may be replaced (or removed) only when segpipe wrote it and
    nobody has changed it since: a mask whose pixels are those it wrote (:func:`write_png`), a
    LabelMe file (:func:`~segpipe.data.labelme.is_unedited_prediction`), an uncertainty.csv of
    its columns."""
    if not path.exists():
        return
    if path.name == UNCERTAINTY_CSV:
        try:
            with open(path, newline="") as file:
                ours = next(csv.reader(file), None) == list(UNCERTAINTY_COLUMNS)
        except (OSError, UnicodeDecodeError, csv.Error):
            ours = False
        if not ours:
            raise SegpipeError(f"{path}: exists and is not the {UNCERTAINTY_CSV} segpipe writes "
                               "(a file of yours?); it is never overwritten: choose another "
                               "--output")
        return
    if path.suffix.lower() == ".png":
        if not _is_unedited_mask(path):
            raise SegpipeError(f"{path}: exists and is not a mask segpipe predicted, unchanged "
                               "since (a mask of yours, or a corrected one?); it is never "
                               "overwritten: choose another --output")
        return
    try:
        document = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        document = None
    if not is_unedited_prediction(document):
        raise SegpipeError(f"{path}: exists and is not an unedited segpipe prediction (an "
                           "annotation, or a prediction corrected since); it is never "
                           "overwritten: move it to your annotations, or choose another --output")


def write_png(path: Path, classes: np.ndarray, labels: Labels) -> None:
    """A class map (H, W) uint8 as a PNG marked as segpipe's (``Software``: see
    :data:`PNG_SOFTWARE`) with the SHA-256 of its pixels (``segpipe-sha256``), which tells a
    mask changed since: 0/255 for a binary model, else a palette PNG of the class indices with
    the VOC colours."""
    pixels = np.where(classes > 0, 255, 0).astype(np.uint8) if labels.binary else classes
    info = PIL.PngImagePlugin.PngInfo()
    info.add_text("Software", PNG_SOFTWARE)
    info.add_text(PNG_DIGEST, _pixel_digest(pixels))
    image = PIL.Image.fromarray(pixels)  # mode L: putpalette makes it P
    if not labels.binary:
        image.putpalette([value for rgb in labels.palette() for value in rgb])
    image.save(path, format="PNG", pnginfo=info)


def _pixel_digest(pixels: np.ndarray) -> str:
    return hashlib.sha256(repr(pixels.shape).encode() + pixels.tobytes()).hexdigest()


def _is_unedited_mask(path: Path) -> bool:
    """Whether ``path`` is a mask :func:`write_png` wrote whose pixels nobody has changed."""
    try:
        with PIL.Image.open(path) as png:
            if png.info.get("Software") != PNG_SOFTWARE:
                return False
            digest = png.info.get(PNG_DIGEST)
            pixels = np.asarray(png) if png.mode in ("L", "P") else None
    except (OSError, ValueError, SyntaxError):
        return False
    return pixels is not None and digest == _pixel_digest(pixels)
