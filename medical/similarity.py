"""Intensity similarity of 3D volumes: structural similarity (SSIM) and global normalised
cross-correlation (NCC), as differentiable torch functions (usable as registration losses).

SSIM follows Wang, Bovik, Sheikh and Simoncelli, "Image quality assessment: from error visibility to
structural similarity", IEEE TIP 13(4), 2004, with the defaults of scikit-image's
``skimage.metrics.structural_similarity`` so numbers are comparable with it:
a 7-voxel-wide uniform window, K1 = 0.01, K2 = 0.03, sample (N - 1) covariance, and the mean taken
over the voxels whose window lies entirely inside the volume (scikit-image filters the whole volume
with reflect padding, then crops (win - 1) / 2 voxels at each border before averaging; a
"valid" box filter gives exactly those voxels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from threefold.datasets.errors import DataFormatError


def _as_5d(x: Tensor, y: Tensor, name: str) -> tuple[Tensor, Tensor, bool]:
    if x.shape != y.shape:
        raise DataFormatError(f"{name}: x shape {tuple(x.shape)} differs from y shape {tuple(y.shape)}")
    if x.ndim == 3:
        return x[None, None], y[None, None], True
    if x.ndim == 5:
        return x, y, False
    raise DataFormatError(f"{name}: volumes have shape {tuple(x.shape)}; expected (D, H, W) or (B, C, D, H, W)")


def ssim3d(
    x: Tensor,
    y: Tensor,
    data_range: float,
    *,
    win_size: int = 7,
    k1: float = 0.01,
    k2: float = 0.03,
) -> Tensor:
    """Mean structural similarity of two 3D volumes.

    Args:
        x, y: ``(D, H, W)`` or ``(B, C, D, H, W)`` float volumes of the same shape; every spatial size
            must be at least ``win_size``.
        data_range: the dynamic range of the intensities (max possible - min possible), e.g. 1.0 for
            volumes normalised to [0, 1]. Required: inferring it from the data makes SSIM depend on
            the batch.
        win_size: odd width of the cubic uniform window (voxels).
        k1, k2: stabilising constants; C1 = (k1 · data_range)², C2 = (k2 · data_range)².

    Returns:
        Scalar for ``(D, H, W)`` input, else ``(B,)`` (mean over channels and window positions), in
        the input's dtype and device; differentiable in ``x`` and ``y``.
    """
    x5, y5, single = _as_5d(x, y, "ssim3d")
    if not x5.is_floating_point() or not y5.is_floating_point():
        raise DataFormatError(f"ssim3d: volumes have dtypes {x5.dtype}, {y5.dtype}; expected floating point")
    if not data_range > 0:
        raise DataFormatError(f"ssim3d: data_range {data_range!r}; expected a positive intensity range")
    if win_size < 2 or win_size % 2 == 0:
        raise DataFormatError(f"ssim3d: win_size {win_size}; expected an odd integer >= 3")
    if min(x5.shape[-3:]) < win_size:
        raise DataFormatError(
            f"ssim3d: spatial shape {tuple(x5.shape[-3:])} is smaller than win_size {win_size} along some axis"
        )
    b, c = x5.shape[:2]
    stacked = torch.cat([x5, y5, x5 * x5, y5 * y5, x5 * y5], dim=1).reshape(b * 5 * c, 1, *x5.shape[-3:])
    # the box filter is separable: three 1D means cost 3·win instead of win³ per voxel
    for axis in range(3):
        kernel = [1, 1, 1]
        kernel[axis] = win_size
        stacked = F.avg_pool3d(stacked, kernel, stride=1)
    ux, uy, uxx, uyy, uxy = stacked.reshape(b, 5, c, -1).unbind(dim=1)
    cov_norm = win_size**3 / (win_size**3 - 1)
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    out = s.mean(dim=(1, 2))
    return out[0] if single else out


def ncc(x: Tensor, y: Tensor) -> Tensor:
    """Global normalised cross-correlation (Pearson correlation of all voxel intensities).

    ``Σ (x - x̄)(y - ȳ) / sqrt(Σ (x - x̄)² Σ (y - ȳ)²)`` over channels and voxels of each sample.

    Args:
        x, y: ``(D, H, W)`` or ``(B, C, D, H, W)`` float volumes of the same shape.

    Returns:
        Scalar or ``(B,)`` in [-1, 1], the input's dtype and device, differentiable. A constant
        volume carries no linear relation to measure and gives 0 (the ratio is 0 / 0 there).
    """
    x5, y5, single = _as_5d(x, y, "ncc")
    xc = x5.flatten(1) - x5.flatten(1).mean(dim=1, keepdim=True)
    yc = y5.flatten(1) - y5.flatten(1).mean(dim=1, keepdim=True)
    var_prod = (xc * xc).sum(dim=1) * (yc * yc).sum(dim=1)
    # clamp keeps sqrt and the unused branch finite so torch.where passes no NaN gradient
    denom = torch.sqrt(var_prod.clamp_min(torch.finfo(var_prod.dtype).tiny))
    out = torch.where(var_prod > 0, (xc * yc).sum(dim=1) / denom, 0.0)
    return out[0] if single else out
