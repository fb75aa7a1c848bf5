"""Attention U-Net."""

from __future__ import annotations

from segpipe.models.base import SegmentationModel
from segpipe.models.blocks import DoubleConv
from segpipe.models.encoders import Encoder, conv_encoder
from segpipe.models.unet import UNetDecoder


class AttentionUNet(SegmentationModel):
    """Attention U-Net (Oktay et al. 2018, "Attention U-Net: learning where to look for the
    pancreas", MIDL, arXiv:1804.03999): the U-Net of :class:`segpipe.models.unet.UNet` whose
    every skip connection passes through an additive
    :class:`~segpipe.models.blocks.AttentionGate` gated by the coarser decoder feature.
    ``attention_maps(x)`` returns the gate coefficients for figures.
    """

    def __init__(self, width: int = 64, depth: int = 4, down: str = "maxpool",
                 up: str = "transpose", encoder: Encoder | None = None) -> None:
        if encoder is None:
            encoder = conv_encoder(DoubleConv, width, depth, down)
        super().__init__(encoder, UNetDecoder(encoder.out_channels, width, DoubleConv, up,
                                              attention=True))
