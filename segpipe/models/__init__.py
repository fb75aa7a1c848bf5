"""The model zoo: U-Net variants for binary and multi-class segmentation, built from config definitions.

``build_model(architecture, backbone)`` turns an architecture definition (``{"model": <family>,
<options>}``) and a backbone definition (``{}`` or ``{"encoder": "resnet34", "weights": ...}``)
into a :class:`SegmentationModel`: normalised RGB batch (N, 3, H, W), any H and W → logits
(N, outputs, H, W): 1 for a binary study, background + K classes for several. Every family takes any encoder: its own scratch encoder or a ResNet.
See docs/models.md for the families, their options and their papers.
"""

from __future__ import annotations

import importlib
import pkgutil

import torch
from torch import nn

from segpipe.models.base import FAMILIES, SegmentationModel
from segpipe.models.blocks import LogitHead
from segpipe.models.encoders import RESNETS, resnet_encoder
from segpipe.spec import default, encoder_defaults, resnet_depth, schema, smp_decoder

for _module in pkgutil.iter_modules(__path__):  # each registers its families (models.base.family)
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["ARCHITECTURES", "BACKBONES", "SegmentationModel", "build_model", "family_options",
           "model_cost", "model_table", "print_model_table"]

_ORDER = list(schema()["$defs"]["architecture"]["families"])
ARCHITECTURES: dict[str, type[SegmentationModel]] = dict(
    sorted(FAMILIES.items(), key=lambda item: _ORDER.index(item[0]) if item[0] in _ORDER
           else len(_ORDER)))
"""Every registered model family in the schema's order (tests/test_models.py checks that the
schema lists exactly these, with their options)."""
#: ``scratch`` is each architecture's own encoder; the others are torchvision ResNets.
BACKBONES: tuple[str, ...] = ("scratch", *RESNETS)


def family_options(architecture: dict, backbone: dict) -> dict:
    """Every option of the architecture's family: as the definition gives it, else the
    schema's default (``$defs.architecture``, :func:`segpipe.spec.default`; the one place a
    model default is written). Under a ResNet, the options of
    :func:`segpipe.spec.encoder_defaults` take their encoder's defaults and ``depth`` the
    encoder's stride-2 stages (:func:`segpipe.spec.resnet_depth`)."""
    given = {k: v for k, v in architecture.items() if k != "model"}
    options = {option: default(f"$defs.architecture.{option}")
               for option in schema()["$defs"]["architecture"]["families"][architecture["model"]]}
    if backbone.get("encoder", "scratch") != "scratch":
        options.update(encoder_defaults(architecture, backbone))
        options["depth"] = resnet_depth(backbone)
    return {**options, **given}


def build_model(architecture: dict, backbone: dict, outputs: int = 1) -> SegmentationModel:
    """The model of an architecture definition under a backbone definition.

    ``architecture``: ``model`` (a key of :data:`ARCHITECTURES`) and that family's options
    (the keyword arguments of its class, e.g. ``width``, ``depth``, ``down``, ``up``); those
    left out take their defaults from the schema (:func:`family_options`).
    ``backbone``: ``{}`` for the family's scratch encoder, or ``{"encoder": "resnet18" |
    "resnet34" | "resnet50", "weights": "imagenet" | "none" | <path>, optional "stem":
    "imagenet" | "small"}``; under a ResNet, ``depth`` selects how many ResNet stages are used
    and ``down`` does not apply. The definitions are trusted:
    they were checked where they entered (:mod:`segpipe.spec`: the workflow's start, ``segpipe
    train``'s spec; a checkpoint holds checked ones). ``outputs``: channels of the logits,
    :attr:`segpipe.labels.Labels.outputs` (1 binary, else background + classes).
    """
    options = family_options(architecture, backbone)
    cls = ARCHITECTURES[architecture["model"]]
    name = backbone.get("encoder", "scratch")
    if name == "scratch":
        return cls(**options, outputs=outputs)
    options["encoder"] = resnet_encoder(name, backbone["weights"], options["depth"],
                                        backbone.get("stem", "imagenet"))
    model = cls(**options, outputs=outputs)
    if smp_decoder(backbone):  # smp.Unet's encoder: smp's decoder initialisation
        initialise_decoder(model.decoder)
    return model


def initialise_decoder(decoder: nn.Module) -> None:
    """The initialisation segmentation_models_pytorch gives the decoder of a model under an
    encoder (segpipe's under a ResNet with the ImageNet stem, :func:`segpipe.spec.smp_decoder`):
    every convolution He-uniform (He et al. 2015, arXiv:1502.01852: fan in, ReLU gain), then
    the logit heads (:class:`~segpipe.models.blocks.LogitHead`) Xavier-uniform (Glorot & Bengio
    2010); BatchNorm 1 and 0, biases 0. A transposed convolution (``up: transpose``) keeps
    PyTorch's default."""
    for module in decoder.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_uniform_(module.weight, mode="fan_in", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d) and module.affine:
            nn.init.ones_(module.weight)
        else:
            continue
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    for head in (m for m in decoder.modules() if isinstance(m, LogitHead)):
        nn.init.xavier_uniform_(head.weight)  # after the rest, as smp draws its head last


def model_cost(model: nn.Module, size: int) -> tuple[int, float]:
    """Parameters of ``model`` and its forward GFLOPs for one size×size image (the model is
    put in eval mode):
    2 FLOPs per multiply-accumulate of convolutions and matrix products, as counted by
    ``torch.utils.flop_counter``. On the meta device nothing is computed."""
    from torch.utils.flop_counter import FlopCounterMode  # imports triton where installed

    device = next(model.parameters()).device
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.eval()(torch.empty(1, 3, size, size, device=device))
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops() / 1e9


def model_table(size: int = 256) -> list[dict]:
    """:func:`model_cost` of every architecture (default options) × backbone."""
    rows = []
    for family in ARCHITECTURES:
        for backbone in BACKBONES:
            definition = {} if backbone == "scratch" else {"encoder": backbone, "weights": "none"}
            with torch.device("meta"):
                model = build_model({"model": family}, definition)
            parameters, gflops = model_cost(model, size)
            rows.append({"architecture": family, "backbone": backbone,
                         "parameters": parameters, "gflops": gflops})
    return rows


def print_model_table(size: int = 256, markdown: bool = False) -> None:
    """Prints :func:`model_table` (the ``segpipe models`` command): aligned columns, or with
    ``markdown`` the Markdown table of docs/models.md."""
    rows = model_table(size)
    if markdown:
        print(f"| architecture | backbone | parameters | GFLOPs ({size}×{size}) |")
        print("|---|---|---:|---:|")
        for row in rows:
            print(f"| {row['architecture']} | {row['backbone']} | {row['parameters']:,} | "
                  f"{row['gflops']:.1f} |")
        return
    print(f"{'architecture':<18} {'backbone':<9} {'parameters':>12} {f'GFLOPs@{size}²':>12}")
    for row in rows:
        print(f"{row['architecture']:<18} {row['backbone']:<9} {row['parameters']:>12,} "
              f"{row['gflops']:>12.2f}")
