"""Segmentation losses on logits, built from a config definition.

A definition is a weighted sum of terms (weights are used as given, not normalised)::

    {"bce": 1.0}                          binary cross-entropy with logits
    {"bce": 1.0, "pos_weight": 5.0}       weighted BCE (positive pixels weigh 5)
    {"dice": 1.0}                         soft Dice
    {"bce": 0.3, "dice": 0.7}             BCE+Dice with dice weight alpha = 0.7
    {"focal_tversky": 1.0, "tversky_alpha": 0.7, "tversky_beta": 0.3, "tversky_gamma": 0.75}

Every loss is called as ``loss(logits, target)``: ``logits`` (N, 1, H, W) or a list of such
(deep supervision: the loss is the mean over the outputs), ``target`` float in {0, 1} of the
same shape. Sigmoid is applied inside; everything is computed in float32, also when the
logits are bf16/fp16 under autocast. The result is a scalar (mean over the batch).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segpipe.spec import check_definition

EPS = 1e-5
"""Smoothing constant of the soft Dice and Tversky ratios."""


class BinaryCrossEntropy(nn.Module):
    """Mean binary cross-entropy with logits,
    ``−[w·g·log σ(x) + (1−g)·log(1−σ(x))]`` with positive-class weight ``w`` (default 1)."""

    def __init__(self, pos_weight: float = 1.0) -> None:
        super().__init__()
        self.pos_weight = pos_weight

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        weight = None if self.pos_weight == 1.0 else logits.new_tensor(self.pos_weight)
        return F.binary_cross_entropy_with_logits(logits, target, pos_weight=weight)

    def extra_repr(self) -> str:
        return f"pos_weight={self.pos_weight}"


class SoftDiceLoss(nn.Module):
    """Soft Dice loss (Milletari et al. 2016, V-Net, arXiv:1606.04797), per sample:

    ``1 − (2·Σ p·g + ε) / (Σ p + Σ g + ε)`` with ``p = σ(logits)``, sums over each sample's
    pixels, averaged over the batch (MONAI ``DiceLoss(sigmoid=True)``). An empty target with
    an empty prediction costs 0.
    """

    def __init__(self, eps: float = EPS) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        p = torch.sigmoid(logits).flatten(1)
        g = target.flatten(1)
        dice = (2 * (p * g).sum(1) + self.eps) / (p.sum(1) + g.sum(1) + self.eps)
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
    perfect prediction.
    """

    def __init__(
        self, alpha: float = 0.7, beta: float = 0.3, gamma: float = 0.75, eps: float = EPS
    ) -> None:
        super().__init__()
        self.alpha, self.beta, self.gamma, self.eps = alpha, beta, gamma, eps

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        p = torch.sigmoid(logits).flatten(1)
        g = target.flatten(1)
        tp = (p * g).sum(1)
        fn = ((1 - p) * g).sum(1)
        fp = (p * (1 - g)).sum(1)
        tversky = (tp + self.eps) / (tp + self.alpha * fn + self.beta * fp + self.eps)
        return ((1 - tversky).clamp_min(1e-12) ** self.gamma).mean()

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, gamma={self.gamma}, eps={self.eps}"


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
        if logits.shape != target.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and target "
                             f"{tuple(target.shape)} differ in shape")
        return sum(self.weights[name] * term(logits, target) for name, term in self.terms.items())

    def extra_repr(self) -> str:
        return "weights=" + repr(self.weights)


def build_loss(definition: dict) -> nn.Module:
    """The loss of a config definition (see the module docstring), checked against the
    config schema's ``$defs.loss`` (:mod:`segpipe.spec`; bad input raises
    :class:`~segpipe.SegpipeError` naming the key).

    Term weights are ≥ 0, at least one positive; terms of weight 0 are not computed.
    ``pos_weight`` (> 0, default 1) applies to ``bce``; ``tversky_alpha`` (0.7),
    ``tversky_beta`` (0.3), ``tversky_gamma`` (0.75) to ``focal_tversky``.
    """
    check_definition("loss", definition)
    terms = {
        "bce": lambda: BinaryCrossEntropy(float(definition.get("pos_weight", 1.0))),
        "dice": SoftDiceLoss,
        "focal_tversky": lambda: FocalTverskyLoss(
            alpha=float(definition.get("tversky_alpha", 0.7)),
            beta=float(definition.get("tversky_beta", 0.3)),
            gamma=float(definition.get("tversky_gamma", 0.75)),
        ),
    }
    return WeightedSumLoss({name: (float(definition[name]), make())
                            for name, make in terms.items() if definition.get(name, 0) > 0})
