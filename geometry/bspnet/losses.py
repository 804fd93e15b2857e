"""BSP-Net training losses per phase (Chen et al., CVPR 2020, Sec. 3.4 and the TPAMI extension).

Notation: ``F*`` is the ground-truth occupancy of a query point (1 inside, 0 outside), ``h2`` (B, N, c)
and ``h3`` (B, N, 1) are the outputs of :func:`threefold.geometry.bspnet.model.bsp_layers`.

- phase 0 (continuous): ``mean((h3 - F*)^2) + sum|W - 1| + sum(max(T - 1, 0) - min(T, 0))``;
- phase 1 (hard, binarised T): ``L*_recon = mean((1 - F*)(1 - min(h3, 1)) + F* max(h3, 0))``;
- phase 2: phase 1 + ``L_overlap = -mean(h2 * F* * M)``, ``M`` marks convexes that contain a point
  (``h2 < 0.01``) which lies inside more than one convex;
- phase 3 (soft, T pushed to {0, 1}): ``L*_recon + sum_{T<0.01}|T| + sum_{T>=0.01}|T - 1|``;
- phase 4: phase 3 + ``L_overlap``.

The sums over ``T`` and ``W`` are plain sums (not means), as in the paper and the reference code.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from threefold.geometry.bspnet.model import T_THRESHOLD


class BSPLoss(NamedTuple):
    """``recon``: the reconstruction term alone (for logging); ``total``: what is minimised."""

    recon: torch.Tensor
    total: torch.Tensor


def overlap_loss(h2: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``L_overlap`` (TPAMI Eq. for phases 2 and 4): push apart convexes that overlap inside the shape.

    ``h2`` (B, N, c) in the 0-inside convention, ``values`` (B, N, 1) occupancy in {0, 1}.
    """
    inside = (h2 < T_THRESHOLD).to(h2.dtype)
    shared = inside * (inside.sum(dim=-1, keepdim=True) > 1).to(h2.dtype)
    return -(h2 * values * shared).mean()


def bspnet_loss(
    h2: torch.Tensor, h3: torch.Tensor, values: torch.Tensor, T: torch.Tensor, W: torch.Tensor, phase: int
) -> BSPLoss:
    """The BSP-Net loss of ``phase`` (0-4).

    Args:
        h2: (B, N, c) convex layer output.
        h3: (B, N, 1) shape output (phase 0: 1 inside; phases 1-4: 0 inside).
        values: (B, N, 1) float ground-truth occupancy, 1 inside.
        T: (p, c) plane-to-convex connections; W: (c, 1) phase-0 weights.
    """
    values = values.to(h3.dtype)
    if phase == 0:
        recon = ((values - h3) ** 2).mean()
        w_term = (W - 1).abs().sum()
        t_term = (torch.clamp(T - 1, min=0) - torch.clamp(T, max=0)).sum()
        return BSPLoss(recon, recon + w_term + t_term)
    if phase not in (1, 2, 3, 4):
        raise ValueError(f"BSP-Net phase must be 0..4, got {phase}")
    recon = ((1 - values) * (1 - torch.clamp(h3, max=1)) + values * torch.clamp(h3, min=0)).mean()
    total = recon
    if phase in (3, 4):
        small = T < T_THRESHOLD
        total = total + torch.where(small, T.abs(), (T - 1).abs()).sum()
    if phase in (2, 4):
        total = total + overlap_loss(h2, values)
    return BSPLoss(recon, total)
