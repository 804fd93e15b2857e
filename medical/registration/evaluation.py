"""Registration accuracy measures beyond the shared similarity / overlap / Jacobian tools: histogram
mutual information, end-point error against a known deformation, and the NestedMorph paper's
intensity-threshold HD95 (kept under its own name because it is not a label-map HD95).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from threefold.datasets.errors import ConfigError, DataFormatError


def mutual_information(x: Tensor, y: Tensor, bins: int = 32) -> Tensor:
    """Mutual information (nats) of the joint intensity histogram of two [0, 1] volumes.

    Intensities are clipped to [0, 1] and binned into ``bins`` equal bins (bin ``min(⌊v·bins⌋,
    bins − 1)``); ``MI = Σ p(a,b) log(p(a,b) / (p(a) p(b)))`` over non-empty cells — scikit-learn's
    ``mutual_info_score`` of the two bin-index arrays.

    Args:
        x, y: ``(B, C, D, H, W)`` float volumes of one shape (all channels pooled per sample).
        bins: histogram bins per axis.

    Returns:
        ``(B,)`` float64 MI on ``x``'s device (not differentiable; the loss form is
        :func:`threefold.medical.registration.losses.mutual_information_parzen`).
    """
    if x.ndim != 5 or x.shape != y.shape:
        raise DataFormatError(f"mutual_information: shapes {tuple(x.shape)} and {tuple(y.shape)}; expected two (B, C, D, H, W)")
    if bins < 2:
        raise ConfigError(f"mutual_information: bins={bins}; expected at least 2")

    def index(v: Tensor) -> Tensor:
        return (v.detach().flatten(1).double().clamp(0.0, 1.0) * bins).long().clamp_max(bins - 1)

    joint_index = index(x) * bins + index(y)
    counts = torch.zeros(x.shape[0], bins * bins, dtype=torch.float64, device=x.device)
    counts.scatter_add_(1, joint_index, torch.ones_like(joint_index, dtype=torch.float64))
    pab = (counts / joint_index.shape[1]).reshape(-1, bins, bins)
    pa, pb = pab.sum(dim=2, keepdim=True), pab.sum(dim=1, keepdim=True)
    ratio = torch.where(pab > 0, pab / (pa * pb).clamp_min(1e-300), torch.ones_like(pab))
    return (pab * torch.log(ratio)).sum(dim=(1, 2))


def endpoint_error(ddf: Tensor, ddf_true: Tensor, mask: Tensor | None = None, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> Tensor:
    """Mean end-point error ``‖u(x) − u_true(x)‖₂`` of a recovered displacement field.

    Args:
        ddf, ddf_true: ``(B, 3, D, H, W)`` displacements in voxels (same convention, channel i along axis i).
        mask: optional ``(B, 1, D, H, W)`` or ``(B, D, H, W)`` bool region to average over (e.g. the
            fixed brain, where the images constrain the field); all voxels when ``None``.
        spacing: mm per voxel along (D, H, W); ``(1, 1, 1)`` gives the error in voxels.

    Returns:
        ``(B,)`` float mean error (voxels, or mm with a spacing); NaN for an empty mask.
    """
    if ddf.ndim != 5 or ddf.shape[1] != 3 or ddf.shape != ddf_true.shape:
        raise DataFormatError(f"endpoint_error: fields {tuple(ddf.shape)} and {tuple(ddf_true.shape)}; expected two (B, 3, D, H, W)")
    scale = torch.tensor(spacing, dtype=ddf.dtype, device=ddf.device).view(1, 3, 1, 1, 1)
    err = ((ddf - ddf_true.to(ddf)) * scale).norm(dim=1)
    if mask is None:
        return err.mean(dim=(1, 2, 3))
    m = (mask[:, 0] if mask.ndim == 5 else mask).to(err.dtype)
    if m.shape != err.shape:
        raise DataFormatError(f"endpoint_error: mask {tuple(mask.shape)} does not match the field's grid {tuple(err.shape)}")
    return (err * m).sum(dim=(1, 2, 3)) / m.sum(dim=(1, 2, 3))


def hd95_threshold_slicewise(warped: Tensor, fixed: Tensor, threshold: float = 0.5) -> Tensor:
    """The NestedMorph paper's "HD95": intensity-thresholded, slice-wise, one-directional, voxels.

    As the authors' evaluation code (``Metric_Evaluation/utils.py::calculate_hd95``) computes it:
    for each slice along the first spatial axis, ``P = warped > threshold`` and ``T = fixed >
    threshold``; for every voxel of ``P`` (all of them, not only the boundary) the in-slice Euclidean
    distance to the nearest voxel of ``T``; the 95th percentile of those distances; the mean over
    slices where both masks are non-empty. It is not a Hausdorff distance of label maps (it is
    directed, counts interior voxels, and depends on the intensity scale); it is reported only to
    compare with the paper's HD95 column, next to the label HD95 in mm.

    Args:
        warped, fixed: ``(B, 1, D, H, W)`` float volumes in [0, 1].
        threshold: intensity threshold (0.5 in the paper's code).

    Returns:
        ``(B,)`` float64 distance in voxels on ``warped``'s device; NaN when no slice has both masks.
    """
    from scipy import ndimage

    if warped.ndim != 5 or warped.shape != fixed.shape or warped.shape[1] != 1:
        raise DataFormatError(
            f"hd95_threshold_slicewise: shapes {tuple(warped.shape)}, {tuple(fixed.shape)}; expected two (B, 1, D, H, W)"
        )
    p_all = (warped.detach()[:, 0] > threshold).cpu().numpy()
    t_all = (fixed.detach()[:, 0] > threshold).cpu().numpy()
    out = np.full(len(p_all), math.nan)
    # one 2D distance transform per slice: loops run over slices, never voxels
    for b, (p_vol, t_vol) in enumerate(zip(p_all, t_all)):
        values = [
            np.percentile(ndimage.distance_transform_edt(~t)[p], 95)
            for p, t in zip(p_vol, t_vol)
            if p.any() and t.any()
        ]
        if values:
            out[b] = float(np.mean(values))
    return torch.from_numpy(out).to(warped.device)
