"""U-Net with an atrous (dilated-convolution) decoder."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from segpipe.models.base import SegmentationModel, family
from segpipe.models.blocks import AtrousBlock, DoubleConv
from segpipe.models.encoders import Encoder, conv_encoder
from segpipe.models.unet import UNetDecoder


@family("atrous_unet")
class AtrousUNet(SegmentationModel):
    """U-Net skip structure with atrous decoder blocks: each decoder level applies parallel
    dilated 3×3 convolutions (``rates``, 1 meaning a 1×1 convolution) fused by a 1×1
    convolution, the atrous spatial pyramid of DeepLabv3 (Chen et al. 2017, "Rethinking atrous
    convolution for semantic image segmentation", arXiv:1706.05587) without image pooling.
    The scratch encoder is U-Net's; the seed study put a ResNet-50 encoder under it.
    """

    def __init__(self, *, width: int, depth: int, down: str, up: str, head: int,
                 rates: Sequence[int], encoder: Encoder | None = None,
                 outputs: int = 1) -> None:
        if encoder is None:
            encoder = conv_encoder(DoubleConv, width, depth, down)
        block = partial(AtrousBlock, rates=tuple(rates))
        super().__init__(encoder, UNetDecoder(encoder.out_channels, width, block, up, head,
                                              outputs=outputs))
