"""Segmentation losses on logits, built from a config definition.

A definition is a weighted sum of terms (weights are used as given, not normalised)::

    {"bce": 1.0}                          binary cross-entropy with logits
    {"bce": 1.0, "pos_weight": 5.0}       weighted BCE (positive pixels weigh 5)
    {"dice": 1.0}                         soft Dice
    {"bce": 0.3, "dice": 0.7}             BCE+Dice with dice weight alpha = 0.7
    {"focal_tversky": 1.0, "tversky_alpha": 0.7, "tversky_beta": 0.3, "tversky_gamma": 0.75}

Every loss is called as ``loss(logits, target)``: ``logits`` (N, C, H, W) or a list of such
(deep supervision: the loss is the mean over the outputs), ``target`` (N, 1, H, W) the mask
values (:mod:`segpipe.labels`) as floats. With one channel (binary) a term uses the sigmoid
and ``target`` in {0, 1}; with C = 1 + K channels (K classes) the softmax, ``bce`` is the
categorical cross-entropy and ``dice`` and ``focal_tversky`` are per foreground class, the
background left out (MONAI ``DiceCELoss(softmax=True, to_onehot_y=True,
include_background=False)``). Pixels of value :data:`~segpipe.labels.IGNORE` count in no term
(when the study has ignore labels). Everything is computed in float32, also when the logits
are bf16/fp16 under autocast. The result is a scalar (mean over the batch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segpipe.labels import IGNORE, Labels
from segpipe.spec import default

EPS = 1e-5
"""Smoothing constant of the soft Dice and Tversky ratios."""


class BinaryCrossEntropy(nn.Module):
    """Mean binary cross-entropy with logits,
    ``−[w·g·log σ(x) + (1−g)·log(1−σ(x))]`` with positive-class weight ``w`` (default 1)."""

    def __init__(self, pos_weight: float = 1.0, ignore: bool = False) -> None:
        super().__init__()
        self.pos_weight, self.ignore = pos_weight, ignore

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        weight = None if self.pos_weight == 1.0 else logits.new_tensor(self.pos_weight)
        if not self.ignore:
            return F.binary_cross_entropy_with_logits(logits, target, pos_weight=weight)
        valid = (target != IGNORE).float()
        return F.binary_cross_entropy_with_logits(
            logits, target * valid, weight=valid, pos_weight=weight, reduction="sum"
        ) / valid.sum().clamp_min(1)

    def extra_repr(self) -> str:
        return f"pos_weight={self.pos_weight}"


class SoftDiceLoss(nn.Module):
    """Soft Dice loss (Milletari et al. 2016, V-Net, arXiv:1606.04797), per sample:

    ``1 − (2·Σ p·g + ε) / (Σ p + Σ g + ε)`` with ``p = σ(logits)``, sums over each sample's
    pixels, averaged over the batch (MONAI ``DiceLoss(sigmoid=True)``). An empty target with
    an empty prediction costs 0. With several classes, ``p`` is the softmax and the ratio is
    taken per sample and foreground class, averaged over both (MONAI ``DiceLoss(softmax=True,
    to_onehot_y=True, include_background=False)``).
    """

    def __init__(self, eps: float = EPS, ignore: bool = False) -> None:
        super().__init__()
        self.eps, self.ignore = eps, ignore

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        p, g = _probabilities_and_truth(logits, target, self.ignore)
        dice = (2 * (p * g).sum(-1) + self.eps) / (p.sum(-1) + g.sum(-1) + self.eps)
        return (1 - dice).mean()

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


class FocalTverskyLoss(nn.Module):
    """Focal Tversky loss (Abraham & Khan 2019, arXiv:1810.07842) on the Tversky index
    (Salehi et al. 2017, arXiv:1706.05721), per sample:

    ``TI = (TP + ε) / (TP + α·FN + β·FP + ε)`` with soft counts ``TP = Σ p·g``,
    ``FN = Σ (1−p)·g``, ``FP = Σ p·(1−g)``; loss ``(1 − TI)^γ`` averaged over the batch.
    α weighs false negatives. With α = β = 0.5 and γ = 1 this is the soft Dice loss (up to ε).
    ``1 − TI`` is clamped at 1e-12 so that the gradient of ``x^γ`` (γ < 1) stays finite at a
    perfect prediction. With several classes: per sample and foreground class on the softmax,
    averaged over both.
    """

    def __init__(self, alpha: float, beta: float, gamma: float, eps: float = EPS,
                 ignore: bool = False) -> None:
        super().__init__()
        self.alpha, self.beta, self.gamma, self.eps, self.ignore = alpha, beta, gamma, eps, ignore

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        p, g = _probabilities_and_truth(logits, target, self.ignore)
        valid = _valid(target, p.shape) if self.ignore else 1
        tp = (p * g).sum(-1)
        fn = ((1 - p) * g).sum(-1)
        fp = (p * (1 - g) * valid).sum(-1)
        tversky = (tp + self.eps) / (tp + self.alpha * fn + self.beta * fp + self.eps)
        return ((1 - tversky).clamp_min(1e-12) ** self.gamma).mean()

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, gamma={self.gamma}, eps={self.eps}"


class CrossEntropy(nn.Module):
    """Softmax cross-entropy over the classes, ``−Σ w_g·log softmax(x)_g / Σ w_g`` over the
    pixels that are not ignored, ``g`` the true class and ``w`` the ``class_weights``
    (default all 1): ``torch.nn.functional.cross_entropy(weight=w, ignore_index=255)``."""

    def __init__(self, class_weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.class_weights = None if class_weights is None else list(class_weights)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        weight = None if self.class_weights is None else logits.new_tensor(self.class_weights)
        return F.cross_entropy(logits, target[:, 0].long(), weight=weight, ignore_index=IGNORE)

    def extra_repr(self) -> str:
        return f"class_weights={self.class_weights}"


def _valid(target: Tensor, shape: torch.Size) -> Tensor:
    """1.0 where a pixel is not ignored, broadcast to the (N, C, pixels) of ``shape``."""
    return (target != IGNORE).flatten(1)[:, None].float().expand(shape)


def _probabilities_and_truth(logits: Tensor, target: Tensor, ignore: bool
                             ) -> tuple[Tensor, Tensor]:
    """(N, C', pixels) probabilities and one-hot truth of the foreground classes (binary: C' = 1,
    the sigmoid; else the softmax without its background channel); ignored pixels 0 in both."""
    if logits.shape[1] == 1:
        p, g = torch.sigmoid(logits).flatten(2), target.flatten(2)
    else:
        classes = target[:, 0].long()
        p = torch.softmax(logits, dim=1).flatten(2)[:, 1:]
        g = F.one_hot(classes.where(classes != IGNORE, 0), logits.shape[1])
        g = g.permute(0, 3, 1, 2).flatten(2)[:, 1:].float()
    if ignore:
        valid = _valid(target, p.shape)
        p, g = p * valid, g * valid
    return p, g


class WeightedSumLoss(nn.Module):
    """``Σ wᵢ·termᵢ(logits, target)`` in float32; a list of logits (deep supervision) gives
    the mean of the loss over the outputs."""

    def __init__(self, terms: dict[str, tuple[float, nn.Module]]) -> None:
        super().__init__()
        self.weights = {name: weight for name, (weight, _) in terms.items()}
        self.terms = nn.ModuleDict({name: term for name, (_, term) in terms.items()})

    def forward(self, logits: Tensor | Sequence[Tensor], target: Tensor) -> Tensor:
        if isinstance(logits, Tensor):
            logits = [logits]
        with torch.autocast(target.device.type, enabled=False):
            target = target.float()
            return torch.stack([self._weighted_sum(x.float(), target) for x in logits]).mean()

    def _weighted_sum(self, logits: Tensor, target: Tensor) -> Tensor:
        if (logits.shape[0], *logits.shape[2:]) != (target.shape[0], *target.shape[2:]) or \
                target.shape[1] != 1:
            raise ValueError(f"logits {tuple(logits.shape)} and target "
                             f"{tuple(target.shape)} differ in shape")
        return sum(self.weights[name] * term(logits, target) for name, term in self.terms.items())

    def extra_repr(self) -> str:
        return "weights=" + repr(self.weights)


TERMS: dict[str, Callable[[dict, Labels], nn.Module]] = {}
"""The terms a loss definition weighs, by name: ``builder(definition, labels)`` → the term's
module (:func:`term`)."""


def term(name: str):
    """Register ``builder(definition, labels) -> nn.Module`` as the loss term ``name``: what a
    new term takes here, with its name and options under ``$defs.loss.terms`` of the config
    schema (tests/test_losses.py checks the two agree)."""
    def register(builder: Callable[[dict, Labels], nn.Module]):
        TERMS[name] = builder
        return builder
    return register


def _option(definition: dict, key: str) -> float:
    """An option of the definition, or the schema's default (:func:`segpipe.spec.default`)."""
    return float(definition.get(key, default(f"$defs.loss.{key}")))


@term("bce")
def _cross_entropy(definition: dict, labels: Labels) -> nn.Module:
    if labels.binary:
        return BinaryCrossEntropy(_option(definition, "pos_weight"), bool(labels.ignore))
    return CrossEntropy(_class_weights(definition, labels))


@term("dice")
def _soft_dice(definition: dict, labels: Labels) -> nn.Module:
    return SoftDiceLoss(ignore=bool(labels.ignore))


@term("focal_tversky")
def _focal_tversky(definition: dict, labels: Labels) -> nn.Module:
    return FocalTverskyLoss(*(_option(definition, f"tversky_{key}")
                              for key in ("alpha", "beta", "gamma")), ignore=bool(labels.ignore))


def build_loss(definition: dict, labels: Labels = Labels()) -> nn.Module:
    """The loss of a schema-valid config definition (see the module docstring) for the classes
    of ``labels`` (one output channel: binary terms, else softmax terms): the terms of
    :data:`TERMS` with a weight > 0, weighted.

    ``pos_weight`` (> 0) applies to ``bce``: the weight of positive pixels, with several
    classes of every foreground class (background 1) unless ``class_weights`` (one per class,
    background first) gives them; ``tversky_alpha``, ``tversky_beta``, ``tversky_gamma`` to
    ``focal_tversky``. An option left out takes the schema's default
    (:func:`segpipe.spec.default`). The definition is trusted: it was checked where it entered
    (:func:`segpipe.spec.check_spec`, :func:`segpipe.spec.loss_errors`).
    """
    return WeightedSumLoss({name: (float(definition[name]), build(definition, labels))
                            for name, build in TERMS.items() if definition.get(name, 0) > 0})


def _class_weights(definition: dict, labels: Labels) -> list[float] | None:
    """The cross-entropy weights of a multi-class study (None: all 1)."""
    if "class_weights" in definition:
        return list(map(float, definition["class_weights"]))
    if "pos_weight" in definition:
        return [1.0] + [float(definition["pos_weight"])] * (labels.outputs - 1)
    return None
