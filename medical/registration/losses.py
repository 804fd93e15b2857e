"""Registration losses: squared local normalised cross-correlation (the VoxelMorph form), the L2
gradient (diffusion) penalty on the displacement field, and a Parzen-window mutual-information loss
for cross-modal pairs.

Objective of NestedMorph and VoxelMorph (Balakrishnan et al., "VoxelMorph: A Learning Framework for
Deformable Medical Image Registration", IEEE TMI 2019, Eq. 4–5)::

    L(m, f, u) = -LNCC²(m ∘ φ, f) + λ · Σ_x ‖∇u(x)‖²,   λ = 1

The smoothness term acts on the **flow** ``u``. The NestedMorph reference training loop passes the
warped image to its gradient loss instead, which regularises intensities, not the deformation; that
is not reproduced (:func:`registration_loss` takes the field).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from threefold.datasets.errors import ConfigError, DataFormatError


def _check_pair(x: Tensor, y: Tensor, name: str) -> None:
    if x.ndim != 5 or x.shape != y.shape:
        raise DataFormatError(
            f"{name}: volumes of shapes {tuple(x.shape)} and {tuple(y.shape)}; expected two (B, C, D, H, W) of one shape"
        )


def _box_sum(x: Tensor, win: int) -> Tensor:
    """Sum over a ``win³`` cube around each voxel, zero padding outside the volume (separable)."""
    b, c = x.shape[:2]
    y = x.reshape(b * c, 1, *x.shape[2:])
    pad = win // 2
    for axis in range(3):
        kernel_shape = [1, 1, 1]
        kernel_shape[axis] = win
        padding = [0, 0, 0]
        padding[axis] = pad
        y = F.conv3d(y, y.new_ones(1, 1, *kernel_shape), padding=tuple(padding))
    return y.reshape(x.shape)


def local_ncc(pred: Tensor, target: Tensor, window: int = 9, eps: float = 1e-5) -> Tensor:
    """Mean squared local normalised cross-correlation (VoxelMorph's ``NCC`` loss without the sign).

    For each voxel, over the ``window³`` cube around it (zero padding at the borders, the window
    volume ``n = window³`` kept fixed there, as VoxelMorph and MONAI do)::

        cross = Σ pt − Σp Σt / n,   var_p = Σ p² − (Σp)² / n,   var_t likewise
        cc    = cross² / (var_p · var_t + eps)

    Args:
        pred, target: ``(B, C, D, H, W)`` float volumes (e.g. warped moving and fixed, in [0, 1]).
        window: odd cube width in voxels (9 in VoxelMorph and NestedMorph).
        eps: added to the denominator (VoxelMorph: 1e-5).

    Returns:
        Scalar mean of ``cc`` over batch, channels and voxels, in [0, 1]; differentiable. MONAI's
        ``LocalNormalizedCrossCorrelationLoss(kernel_size=9, kernel_type="rectangular")`` returns the
        negative of the same squared quantity (it clamps each variance at ``smooth_dr`` instead of
        adding ``eps``).
    """
    _check_pair(pred, target, "local_ncc")
    if window < 1 or window % 2 == 0:
        raise ConfigError(f"local_ncc: window={window}; expected an odd positive integer")
    n = float(window**3)
    p_sum, t_sum = _box_sum(pred, window), _box_sum(target, window)
    pp, tt, pt = _box_sum(pred * pred, window), _box_sum(target * target, window), _box_sum(pred * target, window)
    cross = pt - p_sum * t_sum / n
    var_p = pp - p_sum * p_sum / n
    var_t = tt - t_sum * t_sum / n
    return (cross * cross / (var_p * var_t + eps)).mean()


def local_ncc_loss(pred: Tensor, target: Tensor, window: int = 9) -> Tensor:
    """``-local_ncc(pred, target, window)`` (lower is better), the similarity term of the objective."""
    return -local_ncc(pred, target, window)


def diffusion_loss(ddf: Tensor, difference: str = "forward") -> Tensor:
    """L2 gradient (diffusion) penalty of a displacement field.

    Args:
        ddf: ``(B, 3, D, H, W)`` displacement in voxels.
        difference: ``"forward"`` — VoxelMorph / TransMorph ``Grad('l2')``: for each axis the mean of
            squared forward differences over batch, channels and the ``N − 1`` differences, averaged
            over the 3 axes; ``"central"`` — MONAI ``DiffusionLoss``: central differences
            ``(u[i+1] − u[i−1]) / 2`` on the interior, squared and **summed** over the 3 axes, then
            averaged (equal to ``3 ×`` the forward form on a linear field).

    Returns:
        Scalar, differentiable in ``ddf`` (units voxel² / voxel²).
    """
    if ddf.ndim != 5 or ddf.shape[1] != 3:
        raise DataFormatError(f"diffusion_loss: field of shape {tuple(ddf.shape)}; expected (B, 3, D, H, W)")
    if difference == "forward":
        terms = [torch.diff(ddf, dim=d).square().mean() for d in (2, 3, 4)]
        return sum(terms) / 3.0
    if difference == "central":
        if min(ddf.shape[2:]) <= 2:
            raise DataFormatError(f"diffusion_loss: spatial shape {tuple(ddf.shape[2:])}; central differences need > 2 voxels")
        core = (slice(None), slice(None), slice(1, -1), slice(1, -1), slice(1, -1))
        total = 0.0
        for d in (2, 3, 4):
            hi, lo = list(core), list(core)
            hi[d], lo[d] = slice(2, None), slice(None, -2)
            total = total + ((ddf[tuple(hi)] - ddf[tuple(lo)]) / 2.0).square()
        return total.mean()
    raise ConfigError(f"diffusion_loss: difference={difference!r}; expected 'forward' or 'central'")


def mutual_information_parzen(pred: Tensor, target: Tensor, bins: int = 23, sigma_ratio: float = 0.5) -> Tensor:
    """Mutual information (nats) of two [0, 1] volumes from Gaussian Parzen-window histograms
    (Mattes et al., IEEE TMI 2003; the estimator of MONAI ``GlobalMutualInformationLoss``).

    Intensities are clipped to [0, 1]; ``bins`` centres are evenly spaced on [0, 1] and each voxel's
    weights ``exp(−(i − c)² / (2 σ²))``, ``σ = sigma_ratio · spacing``, are normalised over bins.
    ``p(a, b)`` is the mean over voxels of the weight products; ``MI = Σ p(a,b) log(p(a,b) / p(a)p(b))``
    (with 1e-7 guards inside the logarithm, as MONAI).

    Args:
        pred, target: ``(B, C, D, H, W)`` float volumes in [0, 1].

    Returns:
        ``(B,)`` mutual information, differentiable.
    """
    _check_pair(pred, target, "mutual_information_parzen")
    if bins < 2:
        raise ConfigError(f"mutual_information_parzen: bins={bins}; expected at least 2")
    centres = torch.linspace(0.0, 1.0, bins, device=pred.device, dtype=pred.dtype)
    sigma = sigma_ratio * (centres[1] - centres[0])

    def weights(x: Tensor) -> Tensor:
        v = x.clamp(0.0, 1.0).reshape(x.shape[0], -1, 1)
        w = torch.exp(-((v - centres) ** 2) / (2 * sigma**2))
        return w / w.sum(dim=-1, keepdim=True)  # (B, N, bins)

    wa, wb = weights(pred), weights(target)
    pab = wa.transpose(1, 2) @ wb / wa.shape[1]
    pa, pb = wa.mean(dim=1), wb.mean(dim=1)
    papb = pa[:, :, None] * pb[:, None, :]
    tiny = 1e-7
    return (pab * torch.log((pab + tiny) / (papb + tiny) + tiny)).sum(dim=(1, 2))


def registration_loss(
    warped: Tensor,
    fixed: Tensor,
    ddf: Tensor,
    similarity: str = "lncc",
    smoothness_weight: float = 1.0,
    window: int = 9,
) -> dict[str, Tensor]:
    """The unsupervised registration objective ``similarity + λ · diffusion(ddf)``.

    Args:
        warped: ``(B, 1, D, H, W)`` moving image warped by ``ddf``.
        fixed: ``(B, 1, D, H, W)`` fixed image.
        ddf: ``(B, 3, D, H, W)`` displacement (voxels) — the penalty acts on this field, never on an image.
        similarity: ``"lncc"`` (negative squared local NCC, window ``window``) or ``"mi"`` (negative
            Parzen mutual information, for cross-modal pairs).
        smoothness_weight: λ (1 in VoxelMorph and NestedMorph).

    Returns:
        ``{"loss", "similarity", "smoothness"}`` scalars; ``loss`` is differentiable.
    """
    if similarity == "lncc":
        sim = local_ncc_loss(warped, fixed, window)
    elif similarity == "mi":
        sim = -mutual_information_parzen(warped, fixed).mean()
    else:
        raise ConfigError(f"registration_loss: similarity={similarity!r}; expected 'lncc' or 'mi'")
    smooth = diffusion_loss(ddf)
    return {"loss": sim + smoothness_weight * smooth, "similarity": sim, "smoothness": smooth}
