"""U-Net++: nested, dense skip pathways."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segpipe.models.base import SegmentationModel, family
from segpipe.models.blocks import DoubleConv, LogitHead, upsample, upsampled_channels
from segpipe.models.encoders import Encoder, conv_encoder


class NestedDecoder(nn.Module):
    """U-Net++'s decoder over encoder features ``X^{i,0} = f_i``::

        X^{i,j} = H([X^{i,0}, …, X^{i,j−1}, U(X^{i+1,j−1})]),   j ≥ 1,  i + j ≤ D

    H is two 3×3 conv-BN-ReLU with ``width·2**i`` output channels, U upsamples ×2 by ``up``
    (to that width, or keeping its channels with ``nearest``). A ``head``×``head`` convolution
    makes logits from ``X^{0,D}``, or with ``deep_supervision`` from every ``X^{0,j}``: a list
    of D logits in training mode; in evaluation mode the logit of their mean probability
    (:func:`mean_probability_logit`).
    """

    def __init__(self, encoder_channels: list[int], width: int, up: str, head: int,
                 deep_supervision: bool, outputs: int = 1) -> None:
        super().__init__()
        depth = len(encoder_channels) - 1
        widths = [width * 2**i for i in range(depth)]

        def channels(i: int, j: int) -> int:  # of X^{i,j}
            return encoder_channels[i] if j == 0 else widths[i]

        self.ups = nn.ModuleList(
            nn.ModuleList(upsample(channels(i + 1, j - 1), widths[i], up)
                          for i in range(depth - j + 1)) for j in range(1, depth + 1))
        self.blocks = nn.ModuleList(
            nn.ModuleList(DoubleConv(encoder_channels[i] + (j - 1) * widths[i] + upsampled_channels(
                channels(i + 1, j - 1), widths[i], up), widths[i])
                          for i in range(depth - j + 1)) for j in range(1, depth + 1))
        self.deep_supervision = deep_supervision
        self.heads = nn.ModuleList(LogitHead(widths[0], outputs, head)
                                   for _ in range(depth if deep_supervision else 1))

    def forward(self, features: list[Tensor]) -> Tensor | list[Tensor]:
        nodes = [[f] for f in features]  # nodes[i][j] = X^{i,j}
        for j, (ups, blocks) in enumerate(zip(self.ups, self.blocks), start=1):
            for i, (up, block) in enumerate(zip(ups, blocks)):
                inputs = [n for n in nodes[i] if n.shape[1]]  # f_0 of 0 channels: no skip
                nodes[i].append(block(torch.cat([*inputs, up(nodes[i + 1][j - 1])], dim=1)))
        if not self.deep_supervision:
            return self.heads[0](nodes[0][-1])
        logits = [head(x) for head, x in zip(self.heads, nodes[0][1:])]
        return logits if self.training else mean_probability_logit(logits)


def mean_probability_logit(logits: Sequence[Tensor]) -> Tensor:
    """The logit of the heads' mean probability, as U-Net++'s "accurate mode" averages its
    outputs (Zhou et al. 2018), returned as a logit like every model's output.

    One channel (sigmoid): ``logit(mean_k σ(l_k))``, computed without overflow as
    ``logsumexp_k log σ(l_k) − logsumexp_k log σ(−l_k)`` (the 1/K of both means cancels).
    Heads (−10, 1, 1, 1) give σ = 0.548; the mean of the logits would give σ(−1.75) = 0.148.
    Several channels (softmax): ``log(mean_k softmax(l_k))``, whose softmax is that mean,
    computed as ``logsumexp_k log_softmax(l_k) − log K``."""
    stacked = torch.stack(list(logits))
    if stacked.shape[2] > 1:
        return torch.logsumexp(F.log_softmax(stacked, dim=2), 0) - math.log(len(stacked))
    return torch.logsumexp(F.logsigmoid(stacked), 0) - torch.logsumexp(F.logsigmoid(-stacked), 0)


@family("unetpp")
class UNetPlusPlus(SegmentationModel):
    """U-Net++ (Zhou et al. 2018, "UNet++: a nested U-Net architecture for medical image
    segmentation", DLMIA, arXiv:1807.10165): U-Net's encoder (``width``, ``depth``, ``down``)
    under the :class:`NestedDecoder`. ``deep_supervision``: training returns the logits of
    every nested output X^{0,1..D} (the loss averages them), evaluation the logit of the mean
    of their probabilities (the paper's "accurate mode", :func:`mean_probability_logit`).
    """

    def __init__(self, *, width: int, depth: int, down: str, up: str, head: int,
                 deep_supervision: bool, encoder: Encoder | None = None,
                 outputs: int = 1) -> None:
        if encoder is None:
            encoder = conv_encoder(DoubleConv, width, depth, down)
        super().__init__(encoder, NestedDecoder(encoder.out_channels, width, up, head,
                                                deep_supervision, outputs))
