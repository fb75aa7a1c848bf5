"""Building blocks shared by the model families.

Every convolution followed by BatchNorm has no bias (the BatchNorm shift replaces it) and
"same" padding, so a block keeps the spatial size of its input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn



def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 dilation: int = 1) -> nn.Sequential:
    """Convolution (same padding, no bias) → BatchNorm (Ioffe & Szegedy 2015) → ReLU."""
    padding = dilation * (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class DoubleConv(nn.Sequential):
    """U-Net's block (Ronneberger et al. 2015): two 3×3 conv-BN-ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(conv_bn_relu(in_channels, out_channels),
                         conv_bn_relu(out_channels, out_channels))


def downsample(channels: int, mode: str) -> nn.Module:
    """Halve H and W, keeping the channels: ``maxpool`` (2×2 max pooling, Ronneberger et al.
    2015) or ``strided`` (3×3 conv-BN-ReLU with stride 2, the all-convolutional replacement of
    pooling of Springenberg et al. 2015)."""
    if mode == "maxpool":
        return nn.MaxPool2d(2)
    return conv_bn_relu(channels, channels, stride=2)


def upsample(in_channels: int, out_channels: int, mode: str) -> nn.Module:
    """Double H and W: ``transpose`` (2×2 transposed convolution with stride 2, U-Net's
    "up-convolution") or ``bilinear`` (bilinear ×2, then a 1×1 convolution), both to
    ``out_channels``; or ``nearest`` (nearest ×2 of every one of the ``in_channels``, no
    convolution: the decoder block after it reduces them, as segmentation_models_pytorch's
    Unet decoder does). :func:`upsampled_channels` says which."""
    if mode == "transpose":
        return nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
    if mode == "nearest":
        return nn.Upsample(scale_factor=2, mode="nearest")
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                         nn.Conv2d(in_channels, out_channels, 1))


def upsampled_channels(in_channels: int, out_channels: int, mode: str) -> int:
    """The channels :func:`upsample` returns."""
    return in_channels if mode == "nearest" else out_channels


class LogitHead(nn.Conv2d):
    """The convolution that makes the logits: 1×1 (U-Net's) or 3×3 (smp's), same padding."""

    def __init__(self, in_channels: int, outputs: int, kernel: int) -> None:
        super().__init__(in_channels, outputs, kernel, padding=kernel // 2)


class AttentionGate(nn.Module):
    """Additive attention gate of Attention U-Net (Oktay et al. 2018, arXiv:1804.03999, eq. 1-2).

    For a skip feature ``x`` (H×W grid) and the gating feature ``g`` of the next coarser level
    (H/2×W/2 grid)::

        α = σ(ψᵀ ReLU(W_xᵀ x + W_gᵀ g + b_g) + b_ψ),    output = α ⊙ x

    computed on g's grid (W_x is a 2×2 convolution with stride 2, as in the authors' code;
    W_g and ψ are 1×1 convolutions) and resampled bilinearly to x's grid. ``self.psi`` outputs
    the coefficients α ∈ [0, 1].
    """

    def __init__(self, skip_channels: int, gate_channels: int, inter_channels: int) -> None:
        super().__init__()
        self.theta_x = nn.Conv2d(skip_channels, inter_channels, 2, stride=2, bias=False)
        self.phi_g = nn.Conv2d(gate_channels, inter_channels, 1)
        self.psi = nn.Sequential(nn.Conv2d(inter_channels, 1, 1), nn.Sigmoid())

    def forward(self, x: Tensor, g: Tensor) -> Tensor:
        alpha = self.psi(F.relu(self.theta_x(x) + self.phi_g(g)))
        return x * F.interpolate(alpha, size=x.shape[-2:], mode="bilinear", align_corners=False)


class RecurrentConv(nn.Module):
    """Recurrent convolutional layer (Liang & Hu 2015) as used in R2U-Net (Alom et al. 2018,
    arXiv:1802.06955): ONE conv-BN-ReLU ``f`` shared over the time steps::

        h₀ = f(x),   h_k = f(x + h_{k−1})  for k = 1..t,   output h_t

    The convolution and the BatchNorm's scale and shift are shared, as in the reference code;
    the BatchNorm's running statistics are kept per step, as in recurrent BatchNorm
    (Cooijmans et al. 2017, "Recurrent Batch Normalization", ICLR). The steps' inputs differ,
    so one running average over all steps matches none of them, and in evaluation mode the
    model then computes something it never trained on (on the demo data: test Dice 0.25 in
    evaluation mode against 0.54 with batch statistics). In training mode the output is the
    reference's; the parameters are the same.
    """

    def __init__(self, channels: int, t: int) -> None:
        super().__init__()
        self.t = t
        self.conv = conv_bn_relu(channels, channels)  # its BatchNorm keeps step 0's statistics
        self.step_stats = nn.ModuleList(nn.BatchNorm2d(channels, affine=False)
                                        for _ in range(t))

    def forward(self, x: Tensor) -> Tensor:
        conv, norm, relu = self.conv
        scale, shift = norm.weight.view(-1, 1, 1), norm.bias.view(-1, 1, 1)
        h = self.conv(x)
        for stats in self.step_stats:
            h = relu(stats(conv(x + h)) * scale + shift)
        return h


class RRCNNBlock(nn.Module):
    """Recurrent residual convolutional block of R2U-Net (Alom et al. 2018, arXiv:1802.06955):
    ``x₀ = W₁ₓ₁ x`` (1×1 convolution to the output width), ``output = x₀ + RCL(RCL(x₀))`` with
    two stacked :class:`RecurrentConv` layers."""

    def __init__(self, in_channels: int, out_channels: int, t: int) -> None:
        super().__init__()
        self.project = nn.Conv2d(in_channels, out_channels, 1)
        self.recurrent = nn.Sequential(RecurrentConv(out_channels, t),
                                       RecurrentConv(out_channels, t))

    def forward(self, x: Tensor) -> Tensor:
        x = self.project(x)
        return x + self.recurrent(x)


class AtrousBlock(nn.Module):
    """Parallel atrous convolutions fused by a 1×1 convolution: the atrous spatial pyramid of
    DeepLabv3 (Chen et al. 2017, arXiv:1706.05587) without its image-pooling branch::

        y = F([f_r₁(x), …, f_rₙ(x)]),  f_1 = 1×1 conv-BN-ReLU,
        f_r = 3×3 conv-BN-ReLU with dilation r (r > 1),  F = 1×1 conv-BN-ReLU
    """

    def __init__(self, in_channels: int, out_channels: int, rates: tuple[int, ...]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            conv_bn_relu(in_channels, out_channels, 1) if rate == 1
            else conv_bn_relu(in_channels, out_channels, 3, dilation=rate)
            for rate in rates)
        self.fuse = conv_bn_relu(len(rates) * out_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fuse(torch.cat([branch(x) for branch in self.branches], dim=1))
