"""R2U-Net and Attention R2U-Net: recurrent residual blocks in encoder and decoder."""

from __future__ import annotations

from functools import partial

from segpipe.models.base import SegmentationModel, family
from segpipe.models.blocks import RRCNNBlock
from segpipe.models.encoders import Encoder, conv_encoder
from segpipe.models.unet import UNetDecoder


@family("r2unet")
class R2UNet(SegmentationModel):
    """R2U-Net (Alom et al. 2018, "Recurrent residual convolutional neural network based on
    U-Net (R2U-Net) for medical image segmentation", arXiv:1802.06955): U-Net with every
    double convolution, in the encoder and in the decoder, replaced by a
    :class:`~segpipe.models.blocks.RRCNNBlock` (two recurrent convolutional layers of ``t``
    steps, each applying one shared convolution, inside a residual unit).
    """

    attention = False

    def __init__(self, *, width: int, depth: int, down: str, up: str, head: int, t: int,
                 encoder: Encoder | None = None, outputs: int = 1) -> None:
        block = partial(RRCNNBlock, t=t)
        if encoder is None:
            encoder = conv_encoder(block, width, depth, down)
        super().__init__(encoder, UNetDecoder(encoder.out_channels, width, block, up, head,
                                              attention=self.attention, outputs=outputs))


@family("attention_r2unet")
class AttentionR2UNet(R2UNet):
    """Attention R2U-Net: the :class:`R2UNet` with the additive attention gates of Attention
    U-Net (Oktay et al. 2018, arXiv:1804.03999) on every skip connection. With a ResNet-34
    encoder it is the seed study's "pretrained Attention R2U-Net".
    """

    attention = True
