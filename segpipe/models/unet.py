"""U-Net and the U-Net decoder that the attention, recurrent and atrous families reuse."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from segpipe.models.base import SegmentationModel, family
from segpipe.models.blocks import (AttentionGate, DoubleConv, LogitHead, upsample,
                                    upsampled_channels)
from segpipe.models.encoders import Encoder, conv_encoder


class UNetDecoder(nn.Module):
    """U-Net's expanding path over any encoder's features ``[f_0, …, f_D]``.

    From the deepest feature down to level 0: upsample ×2 by ``up`` (to ``width·2**i``
    channels, or every coarser channel with ``nearest``), concatenate the skip ``f_i`` (after an
    :class:`AttentionGate` of ``width·2**i / 2`` intermediate channels, gated by the coarser
    decoder feature, when ``attention``; an encoder feature of 0 channels is no skip), apply
    ``block(c_in, width·2**i)``; a ``head``×``head`` convolution makes the ``outputs`` logits.
    """

    def __init__(self, encoder_channels: list[int], width: int,
                 block: Callable[[int, int], nn.Module], up: str, head: int,
                 attention: bool = False, outputs: int = 1) -> None:
        super().__init__()
        depth = len(encoder_channels) - 1
        widths = [width * 2**i for i in range(depth)]
        coarser = widths[1:] + [encoder_channels[depth]]  # channels arriving at level i
        self.ups = nn.ModuleList(upsample(coarser[i], widths[i], up) for i in range(depth))
        self.gates = nn.ModuleList(
            AttentionGate(encoder_channels[i], coarser[i], max(widths[i] // 2, 1))
            if encoder_channels[i] else nn.Identity()
            for i in range(depth)) if attention else None
        self.blocks = nn.ModuleList(
            block(encoder_channels[i] + upsampled_channels(coarser[i], widths[i], up), widths[i])
            for i in range(depth))
        self.head = LogitHead(widths[0], outputs, head)

    def forward(self, features: list[Tensor]) -> Tensor:
        x = features[-1]
        for i in reversed(range(len(self.blocks))):
            skip, up = features[i], self.ups[i](x)
            if skip.shape[1]:  # else no skip: nothing to gate or concatenate
                if self.gates is not None:
                    skip = self.gates[i](skip, x)
                up = torch.cat([skip, up], dim=1)
            x = self.blocks[i](up)
        return self.head(x)


@family("unet")
class UNet(SegmentationModel):
    """U-Net (Ronneberger, Fischer & Brox 2015, "U-Net: convolutional networks for biomedical
    image segmentation", MICCAI, arXiv:1505.04597), with BatchNorm and same padding.

    Scratch encoder: ``depth`` levels of two 3×3 conv-BN-ReLU, ``width·2**i`` channels at
    level ``i``, downsampled by ``down`` (``maxpool`` or ``strided``); the decoder mirrors it,
    upsampling by ``up`` (``transpose``, ``bilinear`` or ``nearest``), logits by a
    ``head``×``head`` convolution. With ``encoder`` given (a ResNet), ``depth`` and ``down``
    are the encoder's and ``width`` sets the decoder widths.
    """

    attention = False

    def __init__(self, *, width: int, depth: int, down: str, up: str, head: int,
                 encoder: Encoder | None = None, outputs: int = 1) -> None:
        if encoder is None:
            encoder = conv_encoder(DoubleConv, width, depth, down)
        super().__init__(encoder, UNetDecoder(encoder.out_channels, width, DoubleConv, up, head,
                                              attention=self.attention, outputs=outputs))
