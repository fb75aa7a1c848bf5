"""Encoders: an image batch → the feature pyramid that every decoder consumes.

The interface follows segmentation_models_pytorch: ``Encoder(x)`` returns ``[f_0, …, f_D]``,
``f_i`` at stride ``2**i`` with ``out_channels[i]`` channels; H and W must be multiples of
``2**depth`` (the model pads to that). The scratch encoder of a family is :func:`conv_encoder`
with the family's block; :func:`resnet_encoder` puts a torchvision ResNet under any decoder.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from segpipe import SegpipeError
from segpipe.models.blocks import downsample
from segpipe.weights import how_to_supply, imagenet_file

RESNETS = {  # name: channels at strides 1 (none: no skip), 2, 4, 8, 16, 32 of torchvision's
    "resnet18": [0, 64, 64, 128, 256, 512],
    "resnet34": [0, 64, 64, 128, 256, 512],
    "resnet50": [0, 64, 256, 512, 1024, 2048],
}


class Encoder(nn.Module):
    """A sequence of stages; stage ``i`` maps ``f_{i−1}`` to ``f_i`` (stride ``2**i``).
    ``out_channels[0] == 0``: ``f_0`` (the image passed on to stage 1) is given to the decoder
    as a feature of 0 channels, a level it upsamples to without a skip to concatenate."""

    def __init__(self, stages: list[nn.Module], out_channels: list[int]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.out_channels = list(out_channels)

    @property
    def depth(self) -> int:
        """Number of ×2 downsamplings: the deepest feature is at stride ``2**depth``."""
        return len(self.stages) - 1

    def forward(self, x: Tensor) -> list[Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        if not self.out_channels[0]:
            features[0] = features[0][:, :0]
        return features


def conv_encoder(block: Callable[[int, int], nn.Module], width: int, depth: int,
                 down: str) -> Encoder:
    """U-Net's contracting path: ``block(3, w)``, then ``depth`` times downsample and
    ``block(c, 2c)``; level ``i`` has ``width·2**i`` channels."""
    channels = [width * 2**i for i in range(depth + 1)]
    stages = [block(3, channels[0])] + [
        nn.Sequential(downsample(channels[i - 1], down), block(channels[i - 1], channels[i]))
        for i in range(1, depth + 1)]
    return Encoder(stages, channels)


def resnet_encoder(name: str, weights: str, depth: int, stem: str = "imagenet") -> Encoder:
    """A torchvision ResNet (He et al. 2016, arXiv:1512.03385) as an encoder.

    ``stem``: ``imagenet`` — stage 0 is the image, given to the decoder as no feature (0
    channels: the finest level concatenates no skip, as in smp's Unet; the raw image as a skip
    measured worse, docs/models.md), then conv1-bn-relu (7×7, stride 2), maxpool + layer1 (4),
    layer2 (8), layer3 (16), layer4 (32);
    ``small`` — conv1 is a 3×3 convolution of stride 1, as in the CIFAR ResNets of He et al.
    (§4.2), so stage 0 is conv1-bn-relu at the image's resolution, then maxpool + layer1 (2),
    layer2 (4), layer3 (8), layer4 (16): one stride-2 stage fewer. ``depth`` < the number of
    stride-2 stages drops the deepest layers. ``weights``: ``imagenet`` (torchvision's
    IMAGENET1K_V1, read from the torch hub cache, never downloaded: :mod:`segpipe.weights`),
    ``none`` (random initialisation) or
    the path of a saved ``state_dict()`` of that torchvision ResNet (its ``fc`` entries are
    ignored); the small stem takes ``none`` only (the schema says so)."""
    import torchvision  # here, not at the top: a job without a ResNet is spared its import

    channels = RESNETS[name]
    net = getattr(torchvision.models, name)(weights=None)
    net.fc = nn.Identity()
    if weights != "none":
        state = _imagenet_state_dict(name) if weights == "imagenet" else \
            _local_state_dict(Path(weights))
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            detail = textwrap.shorten(str(exc).splitlines()[1], 300, placeholder=" …")
            raise SegpipeError(f"{weights}: not a state dict of a torchvision {name}: "
                               f"{detail}") from None
    stages = [nn.Identity(), nn.Sequential(net.conv1, net.bn1, net.relu),
              nn.Sequential(net.maxpool, net.layer1), net.layer2, net.layer3, net.layer4]
    if stem == "small":
        net.conv1 = nn.Conv2d(3, channels[1], 3, padding=1, bias=False)  # torchvision's init:
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        stages[1] = nn.Sequential(net.conv1, net.bn1, net.relu)
        stages, channels = stages[1:], channels[1:]
    return Encoder(stages[:depth + 1], channels[:depth + 1])


def _imagenet_state_dict(name: str) -> dict:
    """The ImageNet weights of ``name`` from their file (:func:`segpipe.weights.imagenet_file`):
    training never reaches the network."""
    path = imagenet_file(name)
    if not path.is_file():
        raise SegpipeError(f"backbone {name} with weights: imagenet: {path} not found (training "
                           f"never downloads): {how_to_supply(name)}")
    return _local_state_dict(path)


def _local_state_dict(path: Path) -> dict:
    if not path.is_file():
        raise SegpipeError(f"{path}: backbone weights file not found (weights must be "
                           f"'imagenet', 'none' or the path of a saved state dict)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle, zip and torch errors alike
        raise SegpipeError(f"{path}: not a readable PyTorch state dict ({exc})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise SegpipeError(f"{path}: not a state dict (expected torch.save(model.state_dict()))")
    return state
