"""The checkpoint format of ``model.pt`` and ``snapshots/epoch_<k>.pt`` (docs/formats.md).

A checkpoint is self-describing: a dict holding the weights and everything needed to rebuild and
feed the model without a config (:data:`REQUIRED_KEYS`), plus the training ``meta`` data (epoch,
val_dice, parameters, train_seconds, epochs, best_epoch, peak_memory_mb). Written by training
with :func:`save_checkpoint`, read by evaluation and prediction with :func:`load_checkpoint`.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from segpipe import SegpipeError, __version__
from segpipe.data.geometry import Geometry
from segpipe.files import atomic_path
from segpipe.labels import Labels
from segpipe.runtime import IMAGENET_MEAN, IMAGENET_STD, place
from segpipe.spec import smp_decoder

REQUIRED_KEYS = ("state_dict", "architecture", "backbone", "spec", "size", "mean", "std")
"""What a reader needs: weights, the architecture and backbone definitions, the run spec, the
model's input size [H, W] (the training size, or at a native scale the patch) and the
normalisation mean/std. ``geometry`` (:meth:`segpipe.data.geometry.Geometry.attrs`: ``size``
or ``scale``) is the working resolution; a checkpoint without it squashed to ``size``."""


def make_checkpoint(spec: dict, state_dict: dict, size: Sequence[int],
                    labels: Labels = Labels(), geometry: Geometry | None = None,
                    **meta: object) -> dict:
    """The checkpoint of a model trained from run ``spec`` at input ``size`` [H, W] on the
    classes ``labels`` (key ``labels``, absent for the binary study without classes) at the
    working resolution ``geometry`` (default: squashed to ``size``)."""
    classes = labels.to_dict()
    geometry = Geometry(size=tuple(size)) if geometry is None else geometry
    return {"state_dict": state_dict, "architecture": spec["architecture"],
            "backbone": spec["backbone"], "spec": spec, "size": list(size),
            "geometry": geometry.attrs(),
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
            **({} if classes is None else {"labels": classes}),
            "segpipe_version": __version__, **meta}


def checkpoint_labels(checkpoint: dict) -> Labels:
    """The classes a checkpoint's model predicts (:class:`segpipe.labels.Labels`)."""
    return Labels.from_dict(checkpoint.get("labels"))


def checkpoint_geometry(checkpoint: dict) -> Geometry:
    """The working resolution of a checkpoint's model (:mod:`segpipe.data.geometry`)."""
    return Geometry.from_attrs(checkpoint.get("geometry") or {"size": checkpoint["size"]})


def save_checkpoint(path: Path, spec: dict, state_dict: dict, size: Sequence[int],
                    labels: Labels = Labels(), geometry: Geometry | None = None,
                    **meta: object) -> None:
    """Write :func:`make_checkpoint` to ``path`` atomically."""
    with atomic_path(Path(path)) as tmp:
        torch.save(make_checkpoint(spec, state_dict, size, labels, geometry, **meta), tmp)


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """The model of a checkpoint (eval mode, on ``device`` in channels_last:
    :func:`segpipe.runtime.place`) and the checkpoint dict. Pretrained backbones are rebuilt
    with ``weights: none`` (nothing is downloaded) before the stored weights are loaded."""
    from segpipe.models import build_model

    path, device = Path(path), torch.device(device)
    if not path.is_file():
        raise SegpipeError(f"{path}: checkpoint not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle, zip and torch errors alike
        if not zipfile.is_zipfile(path):  # torch.save writes a zip archive, its index last
            raise SegpipeError(f"{path}: not a readable checkpoint: truncated or corrupt (not a "
                               f"complete zip archive, {path.stat().st_size} bytes)") from None
        raise SegpipeError(f"{path}: not a readable checkpoint ({exc})") from None
    missing = [k for k in REQUIRED_KEYS
               if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise SegpipeError(f"{path}: not a segpipe checkpoint (missing {', '.join(missing)})")
    backbone = dict(checkpoint["backbone"])
    if "weights" in backbone:
        backbone["weights"] = "none"
    model = build_model(checkpoint["architecture"], backbone,
                        checkpoint_labels(checkpoint).outputs)
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as exc:  # e.g. "size mismatch for ...", one line per tensor
        problems = [line.strip().rstrip(".") for line in str(exc).splitlines()[1:]
                    if line.strip()] or [str(exc)]
        earlier = ("; the decoder under a ResNet has changed (docs/models.md, Backbones): a "
                   "run trained before must be trained again" if smp_decoder(checkpoint["backbone"])
                   and "head" not in checkpoint["architecture"] else "")
        raise SegpipeError(f"{path}: the weights do not fit the model its architecture and "
                           f"backbone describe ({len(problems)} problem(s), the first: "
                           f"{problems[0]}){earlier}") from None
    return place(model, device).eval(), checkpoint
