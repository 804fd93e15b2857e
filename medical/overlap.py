"""Region overlap and boundary distance of 3D segmentations: Dice and the 95th-percentile Hausdorff
distance (HD95), with the empty-mask rules of the BraTS evaluation.

Dice (Dice 1945, "Measures of the amount of ecologic association between species"):
``2 |P ∩ T| / (|P| + |T|)``. HD95 follows the BraTS challenge (Menze et al., IEEE TMI 2015; Bakas et
al. 2018, arXiv:1811.02629): distances in millimetres between the boundary voxels of prediction and
ground truth, using the voxel spacing.

Empty-mask rules (BraTS evaluation, also used by the BraTS 2021+ evaluation code):

=====================  ======  ==============================================
case                   Dice    HD95
=====================  ======  ==============================================
both masks empty       1       0 mm
exactly one empty      0       373.13 mm (:data:`BRATS_EMPTY_HD95_MM`)
=====================  ======  ==============================================

Two HD95 conventions exist in the literature and give different numbers; both are offered under
their own names:

- :func:`hausdorff95` — MONAI's ``HausdorffDistanceMetric(percentile=95)``: the maximum of the two
  *directed* 95th percentiles (prediction→truth and truth→prediction).
- :func:`hausdorff95_pooled` — medpy's ``hd95``: the 95th percentile of the *pooled* distances of
  both directions.

Boundary voxels are those of the mask that a one-voxel erosion with the 6-connected cross removes
(scipy's default structure, as MONAI and medpy use; voxels on the array border count as boundary).
Distances are exact Euclidean distances in mm, taken from scipy's distance transform with
``sampling=spacing`` over the bounding box of both masks; percentiles are linear interpolation
(``numpy.percentile`` / ``torch.quantile`` default). The distance transform runs on the CPU (masks
on a GPU are copied over, the result goes back to their device); HD95 is an evaluation metric, not a
loss, so it needs no gradient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from threefold.datasets.errors import DataFormatError

BRATS_EMPTY_HD95_MM: float = math.sqrt(240.0**2 + 240.0**2 + 155.0**2)
"""HD95 (373.13 mm) the BraTS evaluation assigns when exactly one mask is empty: the diagonal of the
240 × 240 × 155 mm³ BraTS volume at 1 mm isotropic spacing."""


def _check_pair(pred: Tensor, target: Tensor, name: str) -> None:
    if pred.shape != target.shape:
        raise DataFormatError(
            f"{name}: pred shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}; "
            "expected equal (..., D, H, W) masks"
        )
    if pred.ndim < 3:
        raise DataFormatError(f"{name}: masks have shape {tuple(pred.shape)}; expected (..., D, H, W)")


def dice(pred: Tensor, target: Tensor) -> Tensor:
    """Dice coefficient ``2 Σ p t / (Σ p + Σ t)`` over the last three (spatial) axes.

    Args:
        pred: ``(..., D, H, W)`` bool mask, or float probabilities in [0, 1] (soft Dice, usable as a
            loss: the function is differentiable in ``pred``).
        target: ``(..., D, H, W)`` bool or float mask of the same shape.

    Returns:
        ``(...)`` Dice in [0, 1], float (``pred``'s float dtype, float32 for bool input), on
        ``pred``'s device. Both masks empty (Σ p + Σ t = 0) gives 1, exactly one empty gives 0 (BraTS).
    """
    _check_pair(pred, target, "dice")
    dtype = pred.dtype if pred.is_floating_point() else torch.float32
    p = pred.to(dtype)
    t = target.to(dtype)
    inter = (p * t).sum(dim=(-3, -2, -1))
    denom = p.sum(dim=(-3, -2, -1)) + t.sum(dim=(-3, -2, -1))
    # clamp keeps the unused branch finite so torch.where does not pass NaN gradients through
    return torch.where(denom > 0, 2.0 * inter / denom.clamp_min(torch.finfo(dtype).tiny), torch.ones_like(denom))


def _spacing_array(spacing: Sequence[float] | Tensor | np.ndarray, batch: tuple[int, ...]) -> np.ndarray:
    """Spacing (mm) as a float64 array of shape ``(prod(batch), 3)``."""
    s = spacing.detach().cpu().numpy() if isinstance(spacing, Tensor) else np.asarray(spacing)
    s = s.astype(np.float64)
    if s.shape == (3,):
        s = np.broadcast_to(s, (*batch, 3))
    if s.shape != (*batch, 3):
        raise DataFormatError(
            f"spacing has shape {s.shape}; expected (3,) or {(*batch, 3)} (mm per voxel along D, H, W)"
        )
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise DataFormatError(f"spacing {s.reshape(-1, 3)[:4].tolist()}...: expected finite positive mm values")
    return s.reshape(-1, 3)


def _boundary_distances(p: np.ndarray, t: np.ndarray, spacing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Directed boundary distances (mm) prediction→truth and truth→prediction of two non-empty masks."""
    from scipy import ndimage

    # Boundaries and the distances between them lie inside the bounding box of both masks (plus
    # one voxel so that erosion at the box edge matches erosion in the full array); cropping is exact.
    idx = np.argwhere(p | t)
    lo = np.maximum(idx.min(axis=0) - 1, 0)
    hi = idx.max(axis=0) + 2
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    p, t = p[box], t[box]
    edge_p = p & ~ndimage.binary_erosion(p)
    edge_t = t & ~ndimage.binary_erosion(t)
    dist_to_t = ndimage.distance_transform_edt(~edge_t, sampling=spacing)
    dist_to_p = ndimage.distance_transform_edt(~edge_p, sampling=spacing)
    return dist_to_t[edge_p], dist_to_p[edge_t]


def _hausdorff(
    pred: Tensor, target: Tensor, spacing: Sequence[float] | Tensor | np.ndarray, pooled: bool, percentile: float
) -> Tensor:
    _check_pair(pred, target, "hausdorff95_pooled" if pooled else "hausdorff95")
    if pred.dtype != torch.bool or target.dtype != torch.bool:
        raise DataFormatError(f"hausdorff95: masks have dtypes {pred.dtype}, {target.dtype}; expected torch.bool")
    batch = tuple(pred.shape[:-3])
    sp = _spacing_array(spacing, batch)
    p_all = pred.detach().cpu().numpy().reshape(-1, *pred.shape[-3:])
    t_all = target.detach().cpu().numpy().reshape(-1, *target.shape[-3:])
    out = np.empty(len(p_all), dtype=np.float64)
    # one distance transform per volume: the loop runs over volumes, never over voxels
    for i, (p, t) in enumerate(zip(p_all, t_all)):
        p_any, t_any = bool(p.any()), bool(t.any())
        if not p_any and not t_any:
            out[i] = 0.0
        elif p_any != t_any:
            out[i] = BRATS_EMPTY_HD95_MM
        else:
            d_pt, d_tp = _boundary_distances(p, t, sp[i])
            if pooled:
                out[i] = np.percentile(np.concatenate([d_pt, d_tp]), percentile)
            else:
                out[i] = max(np.percentile(d_pt, percentile), np.percentile(d_tp, percentile))
    return torch.from_numpy(out.reshape(batch)).to(pred.device)


def hausdorff95(
    pred: Tensor, target: Tensor, spacing: Sequence[float] | Tensor | np.ndarray = (1.0, 1.0, 1.0)
) -> Tensor:
    """HD95 as MONAI's ``HausdorffDistanceMetric(percentile=95, directed=False)``: the maximum of the
    95th percentile of prediction→truth boundary distances and that of truth→prediction.

    Args:
        pred: ``(..., D, H, W)`` bool mask.
        target: ``(..., D, H, W)`` bool mask.
        spacing: voxel size in mm along (D, H, W): ``(3,)`` for all volumes or ``(..., 3)`` per volume.

    Returns:
        ``(...)`` float64 HD95 in mm on ``pred``'s device. Both empty → 0 mm; exactly one empty →
        373.13 mm (:data:`BRATS_EMPTY_HD95_MM`); MONAI would return NaN / inf there.
    """
    return _hausdorff(pred, target, spacing, pooled=False, percentile=95.0)


def hausdorff95_pooled(
    pred: Tensor, target: Tensor, spacing: Sequence[float] | Tensor | np.ndarray = (1.0, 1.0, 1.0)
) -> Tensor:
    """HD95 as medpy's ``medpy.metric.binary.hd95``: the 95th percentile of the pooled boundary
    distances of both directions. It differs from :func:`hausdorff95` whenever the two directions
    have different distance distributions, so report which one a number is.

    Args and empty-mask rules as :func:`hausdorff95` (medpy raises on empty masks instead).
    """
    return _hausdorff(pred, target, spacing, pooled=True, percentile=95.0)
