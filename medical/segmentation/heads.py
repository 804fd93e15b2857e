"""Output heads that turn a network's raw channels into nested glioma regions.

Three heads share one interface so that the same U-Net can be trained and decoded three ways, as in
the comparison of Hu et al. 2018 (arXiv 1810.09488, Sec. 3):

- :class:`MultiLevelHead` (1 channel): the multi-level activation; nested by construction.
- :class:`SoftmaxHead` (4 channels): mutually exclusive ordinal classes 0..3, soft Dice + cross-entropy.
  Regions derived from one class per voxel are nested too, so its violation count is 0 by
  construction; it is still reported, the head is simply not hierarchy-aware during training.
- :class:`SigmoidHead` (3 channels): independent WT / TC / ET sigmoids, soft Dice + BCE; nothing ties
  the three decisions together, so it can put ET outside TC.

Every head has ``out_channels``, ``loss(logits, y)``, ``scores(logits)`` (the quantity averaged over
sliding windows and flips), ``regions(scores)`` -> (B, 3, *spatial) bool in WT, TC, ET order, and
``labels(scores)`` -> ordinal (B, *spatial) int64. ``y`` is always the ordinal nested encoding
0 background, 1 edema, 2 core-not-enhancing, 3 enhancing.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from threefold.datasets.errors import ConfigError
from threefold.medical.segmentation.multilevel import (
    MultiLevelLoss,
    OrderedThresholds,
    ordinal_to_regions,
    region_probabilities,
    regions_to_ordinal,
    soft_dice_loss,
)


class MultiLevelHead(nn.Module):
    """Multi-level activation head: one channel ``z``; ``p_WT >= p_TC >= p_ET`` for every ``z``.

    ``scores`` is ``z`` itself: averaging ``z`` over windows and flips keeps a single channel, so the
    averaged prediction is still nested. A voxel is in level k when ``p_k > 0.5``, i.e. ``z > b_k``.
    """

    out_channels = 1

    def __init__(
        self,
        thresholds: Sequence[float] = (0.5, 1.5, 2.5),
        steepness: float = 4.0,
        learnable_thresholds: bool = False,
        loss_weights: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        if steepness <= 0:
            raise ConfigError(f"multi-level steepness must be > 0, got {steepness}")
        self.thresholds = OrderedThresholds(thresholds, learnable=learnable_thresholds)
        self.steepness = float(steepness)
        self.criterion = MultiLevelLoss(loss_weights)

    def forward(self, z: Tensor) -> Tensor:
        """Region probabilities (B, 3, *spatial) from ``z`` (B, 1, *spatial)."""
        return region_probabilities(z, self.thresholds(), self.steepness)

    def loss(self, logits: Tensor, y: Tensor) -> Tensor:
        return self.criterion(logits, y, self.thresholds(), self.steepness)

    def scores(self, logits: Tensor) -> Tensor:
        return logits

    def regions(self, scores: Tensor) -> Tensor:
        return self.forward(scores) > 0.5

    def labels(self, scores: Tensor) -> Tensor:
        return self.regions(scores).sum(1)


class SoftmaxHead(nn.Module):
    """4-class softmax over the ordinal classes, loss = soft Dice (classes 1..3) + cross-entropy."""

    out_channels = 4

    def __init__(self, dice_weight: float = 1.0, ce_weight: float = 1.0) -> None:
        super().__init__()
        self.dice_weight, self.ce_weight = float(dice_weight), float(ce_weight)

    def forward(self, logits: Tensor) -> Tensor:
        """Region probabilities (B, 3, *spatial): WT = p1+p2+p3, TC = p2+p3, ET = p3."""
        p = torch.softmax(logits, 1)
        return p[:, 1:].flip(1).cumsum(1).flip(1)

    def loss(self, logits: Tensor, y: Tensor) -> Tensor:
        onehot = F.one_hot(y.long(), 4).movedim(-1, 1).to(logits.dtype)
        dice = soft_dice_loss(torch.softmax(logits, 1)[:, 1:], onehot[:, 1:])
        return self.dice_weight * dice + self.ce_weight * F.cross_entropy(logits, y.long())

    def scores(self, logits: Tensor) -> Tensor:
        return torch.softmax(logits, 1)

    def labels(self, scores: Tensor) -> Tensor:
        return scores.argmax(1)

    def regions(self, scores: Tensor) -> Tensor:
        return ordinal_to_regions(self.labels(scores))


class SigmoidHead(nn.Module):
    """Three independent region sigmoids (WT, TC, ET), loss = soft Dice + BCE per region."""

    out_channels = 3

    def __init__(self, dice_weight: float = 1.0, bce_weight: float = 1.0) -> None:
        super().__init__()
        self.dice_weight, self.bce_weight = float(dice_weight), float(bce_weight)

    def forward(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits)

    def loss(self, logits: Tensor, y: Tensor) -> Tensor:
        target = ordinal_to_regions(y).to(logits.dtype)
        dice = soft_dice_loss(torch.sigmoid(logits), target)
        return self.dice_weight * dice + self.bce_weight * F.binary_cross_entropy_with_logits(logits, target)

    def scores(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits)

    def regions(self, scores: Tensor) -> Tensor:
        return scores > 0.5

    def labels(self, scores: Tensor) -> Tensor:
        return regions_to_ordinal(self.regions(scores))


HEADS: dict[str, type[nn.Module]] = {"multilevel": MultiLevelHead, "softmax": SoftmaxHead, "sigmoid": SigmoidHead}


def make_head(name: str, **options) -> nn.Module:
    """Head by name (``multilevel``, ``softmax``, ``sigmoid``) with its keyword options."""
    if name not in HEADS:
        raise ConfigError(f"unknown segmentation head {name!r}; expected one of {sorted(HEADS)}")
    return HEADS[name](**options)
