"""Inference from a self-describing checkpoint: ``segpipe predict`` on a folder of new images.

A checkpoint (``model.pt`` or a snapshot, :mod:`segpipe.checkpoint`) holds the
architecture and backbone definitions, the input size and the normalisation, so no config is
needed. Each image is resized to the model size with area interpolation and the
probabilities are resized back to the original size bilinearly. A binary model's pixels with
``probability >= threshold`` are foreground: 255 in the written PNG mask, else 0. A model of
several classes (:mod:`segpipe.labels`) writes the class index of each pixel (argmax; 0
background) as a palette PNG with the VOC colours, as LabelMe's VOC export does.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from segpipe import SegpipeError
from segpipe.checkpoint import checkpoint_labels, load_checkpoint
from segpipe.data.labelme import decode_image
from segpipe.files import atomic_path, check_outputs
from segpipe.labels import Labels
from segpipe.runtime import acquire_device, forward_logits, probabilities

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


def read_image(path: Path) -> np.ndarray:
    """RGB uint8 (H, W, 3) of an image file, converted as for the cache
    (:func:`segpipe.data.labelme.decode_image`)."""
    try:
        encoded = path.read_bytes()
    except OSError as exc:
        raise SegpipeError(f"{path}: cannot read ({exc.strerror})") from None
    return decode_image(encoded, str(path))


@torch.no_grad()
def predict_probability(model: nn.Module, checkpoint: dict, image: np.ndarray,
                        device: torch.device) -> np.ndarray:
    """Probabilities float32 at the size of the RGB uint8 ``image``: the foreground's (H, W) of a
    binary model, every class's (C, H, W) of a model of several classes."""
    height, width = checkpoint["size"]
    resized = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    batch = torch.from_numpy(resized).permute(2, 0, 1)[None]
    logits = forward_logits(model, batch, device, checkpoint["mean"], checkpoint["std"])
    probs = probabilities(logits)[0].cpu().numpy()
    resized = [cv2.resize(p, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
               for p in probs]
    return resized[0] if len(resized) == 1 else np.stack(resized)


def predict_folder(checkpoint: Path, input_dir: Path, output_dir: Path,
                   threshold: float = 0.5, device: str = "auto") -> None:
    """Write ``output_dir/<stem>.png`` (0/255 mask at the original size) for every image
    (jpg, jpeg, png, bmp, tif, tiff) in ``input_dir``: all of them or, after an error, none
    (each is written under a temporary name, and all are renamed once every mask is written).
    ``output_dir`` may be neither ``input_dir`` nor hold a mask path that would replace an
    input (an image, the checkpoint)."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not 0 < threshold < 1:
        raise SegpipeError(f"threshold {threshold}: expected a number in (0, 1)")
    if not input_dir.is_dir():
        raise SegpipeError(f"{input_dir}: input folder not found")
    images = sorted(p for p in input_dir.iterdir()
                    if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise SegpipeError(f"{input_dir}: no images ({', '.join(IMAGE_SUFFIXES)})")
    stems: dict[str, Path] = {}
    for path in images:
        if path.stem in stems:
            raise SegpipeError(f"{stems[path.stem]} and {path} would both be written as "
                               f"{output_dir / (path.stem + '.png')}")
        stems[path.stem] = path
    if output_dir.resolve() == input_dir.resolve():
        raise SegpipeError(f"{output_dir}: is the input folder; the masks would replace or join "
                           "the images: choose another --output")
    masks = {stem: output_dir / f"{stem}.png" for stem in stems}
    inputs = {path: "an input image" for path in images}
    check_outputs(masks.values(), {**inputs, Path(checkpoint): "the checkpoint"})
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SegpipeError(f"{output_dir}: cannot create the folder ({exc.strerror})") from None
    device = acquire_device(device)
    model, ckpt = load_checkpoint(checkpoint, device)
    labels = checkpoint_labels(ckpt)
    with contextlib.ExitStack() as written:  # renamed together when the block succeeds
        for path in images:
            prob = predict_probability(model, ckpt, read_image(path), device)
            tmp = written.enter_context(atomic_path(masks[path.stem]))
            if labels.binary:
                mask = np.where(prob >= threshold, 255, 0).astype(np.uint8)
                tmp.write_bytes(cv2.imencode(".png", mask)[1].tobytes())
            else:
                write_class_png(tmp, labels.predict(prob), labels)
    log.info("wrote %d masks (%s) to %s", len(images), labels.describe(), output_dir)


def write_class_png(path: Path, classes: np.ndarray, labels: Labels) -> None:
    """A class-index map (H, W) uint8 as a palette PNG with the VOC colours."""
    import PIL.Image

    image = PIL.Image.fromarray(classes)  # mode L: putpalette makes it P
    image.putpalette([value for rgb in labels.palette() for value in rgb])
    image.save(path, format="PNG")
