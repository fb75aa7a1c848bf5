"""The model every family builds: encoder → decoder (ending in a logit head), any H×W."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from segpipe.models.encoders import Encoder


FAMILIES: dict[str, type[SegmentationModel]] = {}
"""The model families by name, as their modules register them (:func:`family`)."""


def family(name: str):
    """Class decorator: register a :class:`SegmentationModel` subclass as the model family
    ``name`` (the ``model`` of an architecture definition). A module of segpipe/models/ that
    defines one is all a new family takes in Python: the package imports every module; its
    options (the keyword arguments of the class but ``encoder`` and ``outputs``) are listed
    under ``$defs.architecture.families`` of the config schema (tests/test_models.py checks)."""
    def register(cls: type[SegmentationModel]) -> type[SegmentationModel]:
        FAMILIES[name] = cls
        return cls
    return register


class SegmentationModel(nn.Module):
    """``forward(x)``: normalised RGB batch (N, 3, H, W), any H and W → logits (N, C, H, W),
    C the ``outputs`` of the family (1: binary; background + K classes: softmax).

    The input is zero-padded at the bottom and right to a multiple of ``2**encoder.depth``
    and the logits are cropped back, so every size works. A decoder may return a list of
    logits (U-Net++ deep supervision in training mode); each is cropped.
    """

    def __init__(self, encoder: Encoder, decoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def _pad(self, x: Tensor) -> Tensor:
        multiple = 2**self.encoder.depth
        height, width = x.shape[-2:]
        if not (height % multiple or width % multiple):
            return x
        return F.pad(x, (0, -width % multiple, 0, -height % multiple))

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        height, width = x.shape[-2:]
        logits = self.decoder(self.encoder(self._pad(x)))
        if isinstance(logits, list):
            return [t[..., :height, :width] for t in logits]
        return logits[..., :height, :width]

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Every parameter exactly once: ``encoder`` (e.g. a pretrained ResNet, which training
        may give a lower learning rate) and ``decoder`` (decoder and logit head)."""
        return {"encoder": list(self.encoder.parameters()),
                "decoder": list(self.decoder.parameters())}
