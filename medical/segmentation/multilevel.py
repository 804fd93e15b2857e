"""Multi-level activation for nested regions and its losses.

Hu, Li, Zhao, Dong, Menze, Piraud, "Hierarchical multi-class segmentation of glioma images using
networks with multi-level activation function", BrainLes 2018 (arXiv 1810.09488), extending the
two-level activation of Piraud, Sekuboyina and Menze (arXiv 1804.01910) to the three nested glioma
regions whole tumour (WT) ⊃ tumour core (TC) ⊃ enhancing tumour (ET).

The network emits ONE channel ``z`` per voxel. With ordered thresholds ``b1 < b2 < b3`` and steepness
``s > 0``::

    p_k(z) = sigmoid(s * (z - b_k))            k = 1 (WT), 2 (TC), 3 (ET)
    f(z)   = (p_1 + p_2 + p_3) / 3             the multi-level activation, in [0, 1]

Because ``b1 < b2 < b3`` and the sigmoid is increasing, ``p_WT >= p_TC >= p_ET`` for every ``z``,
so thresholding at 0.5 (equivalently ``z > b_k``) can never put a voxel in ET without TC or in TC
without WT: nesting holds by construction, not by post-processing.

Targets use the ordinal nested encoding ``y`` in {0 background, 1 edema, 2 core-not-enhancing,
3 enhancing}, so that ``WT = y >= 1``, ``TC = y >= 2``, ``ET = y >= 3`` and ``f`` is trained towards ``y / 3``.

The paper gives no code; its text does not fix how thresholds are parametrised when learnt. Here a
learnt ``b`` is ``b1 = c``, ``b_{k+1} = b_k + softplus(d_k)``, which keeps the order for every value of
the free parameters, so gradient steps can never swap two levels.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from threefold.datasets.errors import ConfigError

#: Region names in the order of the level index k = 1, 2, 3.
REGIONS: tuple[str, str, str] = ("WT", "TC", "ET")

LOSS_TERMS: tuple[str, ...] = ("dice", "bce", "mse")


def ordinal_to_regions(y: Tensor) -> Tensor:
    """Nested region masks of an ordinal label map.

    ``y`` (B, *spatial) integer in {0, 1, 2, 3} -> (B, 3, *spatial) bool, channel k-1 = ``y >= k``
    (WT, TC, ET).
    """
    levels = torch.arange(1, 4, device=y.device).view(1, 3, *([1] * (y.dim() - 1)))
    return y.unsqueeze(1) >= levels


def regions_to_ordinal(regions: Tensor) -> Tensor:
    """Ordinal label map from region masks (B, 3, *spatial) bool -> (B, *spatial) int64.

    Non-nested input (a sigmoid head may put ET outside TC) is resolved with the priority used by the
    BraTS region-based convention: ET wins over TC wins over WT, i.e. ``y = 3`` where ET, else ``2``
    where TC, else ``1`` where WT. For nested masks this equals ``regions.sum(1)``.
    """
    wt, tc, et = regions.unbind(1)
    y = wt.long()
    y = torch.where(tc, torch.full_like(y, 2), y)
    return torch.where(et, torch.full_like(y, 3), y)


def nesting_violations(regions: Tensor) -> Tensor:
    """Voxels breaking ET ⊆ TC ⊆ WT, per batch item.

    ``regions`` (B, 3, *spatial) bool -> (B,) int64, the number of voxels that are in ET but not TC,
    or in TC but not WT (a voxel breaking both counts once).
    """
    wt, tc, et = regions.unbind(1)
    bad = (et & ~tc) | (tc & ~wt)
    return bad.flatten(1).sum(1)


class OrderedThresholds(nn.Module):
    """Three strictly increasing thresholds ``b1 < b2 < b3``, fixed or learnt.

    Learnt: ``b1 = c``, ``b_{k+1} = b_k + softplus(d_k)`` (order kept for any ``c, d``); fixed values
    are stored as a buffer so they follow the module's device and are saved in checkpoints.
    """

    def __init__(self, init: Sequence[float] = (0.5, 1.5, 2.5), learnable: bool = False) -> None:
        super().__init__()
        b = torch.as_tensor(list(init), dtype=torch.float32)
        if b.shape != (3,) or not bool(torch.all(b[1:] > b[:-1])):
            raise ConfigError(f"multi-level thresholds must be 3 strictly increasing values, got {list(init)}")
        self.learnable = learnable
        if learnable:
            gaps = b[1:] - b[:-1]
            self.first = nn.Parameter(b[:1].clone())
            # inverse softplus, so that the initial thresholds are exactly `init`
            self.raw_gaps = nn.Parameter(gaps + torch.log(-torch.expm1(-gaps)))
        else:
            self.register_buffer("fixed", b)

    def forward(self) -> Tensor:
        """(3,) float32 thresholds, increasing."""
        if not self.learnable:
            return self.fixed
        return torch.cat([self.first, self.first + torch.cumsum(F.softplus(self.raw_gaps), 0)])


def level_logits(z: Tensor, thresholds: Tensor, steepness: float) -> Tensor:
    """Pre-sigmoid scores ``s * (z - b_k)``: ``z`` (B, 1, *spatial) -> (B, 3, *spatial)."""
    if z.shape[1] != 1:
        raise ConfigError(f"the multi-level activation takes one channel z, got {z.shape[1]} channels")
    view = thresholds.to(device=z.device, dtype=z.dtype).view(1, 3, *([1] * (z.dim() - 2)))
    return steepness * (z - view)


def region_probabilities(z: Tensor, thresholds: Tensor, steepness: float) -> Tensor:
    """``p_WT >= p_TC >= p_ET``: ``z`` (B, 1, *spatial) float -> (B, 3, *spatial) in [0, 1]."""
    return torch.sigmoid(level_logits(z, thresholds, steepness))


def multilevel_activation(z: Tensor, thresholds: Tensor, steepness: float) -> Tensor:
    """``f(z) = (1/3) sum_k sigmoid(s (z - b_k))``: (B, 1, *spatial) -> (B, 1, *spatial) in [0, 1]."""
    return region_probabilities(z, thresholds, steepness).mean(1, keepdim=True)


def soft_dice_loss(prob: Tensor, target: Tensor, eps: float = 1e-5) -> Tensor:
    """``1 - mean_k (2 sum p t + eps) / (sum p + sum t + eps)``.

    ``prob``, ``target`` (B, K, *spatial); sums run over the batch and all voxels of each channel
    ("batch Dice"), so that a patch without enhancing tumour does not give an undefined 0/0 term.
    """
    dims = [0] + list(range(2, prob.dim()))
    target = target.to(prob.dtype)
    inter = (prob * target).sum(dims)
    denom = prob.sum(dims) + target.sum(dims)
    return 1.0 - ((2.0 * inter + eps) / (denom + eps)).mean()


class MultiLevelLoss(nn.Module):
    """Weighted sum of the selectable terms of the multi-level head.

    - ``dice``: soft Dice of each level's probability ``p_k`` against ``y >= k`` (:func:`soft_dice_loss`);
    - ``bce``: binary cross-entropy of ``p_k`` against ``y >= k``, averaged over levels and voxels;
    - ``mse``: mean squared error of ``f(z)`` against ``y / 3``.
    """

    def __init__(self, weights: dict[str, float] | None = None) -> None:
        super().__init__()
        weights = {"dice": 1.0, "bce": 1.0} if weights is None else dict(weights)
        unknown = set(weights) - set(LOSS_TERMS)
        if unknown or not weights:
            raise ConfigError(f"multi-level loss terms must be a non-empty subset of {LOSS_TERMS}, got {sorted(weights)}")
        self.weights = weights

    def forward(self, z: Tensor, y: Tensor, thresholds: Tensor, steepness: float) -> Tensor:
        """``z`` (B, 1, *spatial) float, ``y`` (B, *spatial) int ordinal -> scalar loss."""
        logits = level_logits(z, thresholds, steepness)
        target = ordinal_to_regions(y).to(z.dtype)
        total = z.new_zeros(())
        if "dice" in self.weights:
            total = total + self.weights["dice"] * soft_dice_loss(torch.sigmoid(logits), target)
        if "bce" in self.weights:
            total = total + self.weights["bce"] * F.binary_cross_entropy_with_logits(logits, target)
        if "mse" in self.weights:
            f = torch.sigmoid(logits).mean(1)
            total = total + self.weights["mse"] * F.mse_loss(f, y.to(z.dtype) / 3.0)
        return total
