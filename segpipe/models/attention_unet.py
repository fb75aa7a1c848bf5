"""Attention U-Net."""

from __future__ import annotations

from segpipe.models.base import family
from segpipe.models.unet import UNet


@family("attention_unet")
class AttentionUNet(UNet):
    """Attention U-Net (Oktay et al. 2018, "Attention U-Net: learning where to look for the
    pancreas", MIDL, arXiv:1804.03999): the :class:`~segpipe.models.unet.UNet` whose every
    skip connection passes through an additive :class:`~segpipe.models.blocks.AttentionGate`
    gated by the coarser decoder feature.
    """

    attention = True
