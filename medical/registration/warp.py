"""Warping volumes with dense displacement fields, scaling-and-squaring integration of stationary
velocity fields, and composition of displacements — pure torch, no MONAI import.

Convention (MONAI ``monai.networks.blocks.Warp``, the one VoxelMorph and NestedMorph use): a dense
displacement field (DDF) ``u`` has shape ``(B, 3, D, H, W)``, is measured in **voxels**, and channel
``i`` is the displacement along spatial axis ``i`` of the volume (D, H, W order = NIfTI i, j, k order
of a volume read by :func:`threefold.datasets.volumes.read_nifti`). Warping *pulls*:

    warped(x) = image(x + u(x))

so ``u`` maps each voxel of the fixed (output) grid to the point of the moving image it takes its
value from. Interpolation is trilinear (``"bilinear"`` in ``grid_sample``'s naming) for intensities
and nearest-neighbour for label maps, with ``align_corners=True`` (voxel centres at the grid
corners) and, by default, MONAI's ``"border"`` padding (samples outside the volume repeat the
border voxel).

Diffeomorphic fields are obtained by integrating a stationary velocity field ``v`` with scaling and
squaring (Arsigny et al., "A Log-Euclidean Framework for Statistics on Diffeomorphisms", MICCAI
2006; Dalca et al., "Unsupervised learning of probabilistic diffeomorphic registration", MedIA
2019): ``u ← v / 2^N``, then ``N`` times ``u ← u + warp(u, u)``, exactly MONAI's ``DVF2DDF``
(``N = 7``, zero padding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from threefold.datasets.errors import ConfigError, DataFormatError

WARP_MODES = ("bilinear", "nearest")
PADDING_MODES = ("border", "zeros", "reflection")


def identity_grid(shape: tuple[int, int, int], device: torch.device | None = None,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """Voxel index grid ``(3, D, H, W)``: channel ``i`` holds the index along spatial axis ``i``."""
    axes = [torch.arange(n, device=device, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)


def _check_ddf(ddf: Tensor, name: str) -> None:
    if ddf.ndim != 5 or ddf.shape[1] != 3:
        raise DataFormatError(f"{name}: displacement has shape {tuple(ddf.shape)}; expected (B, 3, D, H, W) in voxels")
    if not ddf.is_floating_point():
        raise DataFormatError(f"{name}: displacement dtype {ddf.dtype}; expected floating point")


def _sampling_grid(ddf: Tensor) -> Tensor:
    """``grid_sample`` grid ``(B, D, H, W, 3)`` in [-1, 1] (x = W axis first) for the points ``x + u(x)``."""
    shape = ddf.shape[2:]
    pos = identity_grid(tuple(shape), ddf.device, ddf.dtype).unsqueeze(0) + ddf
    # align_corners=True: index 0 ↦ -1 and index n-1 ↦ +1; a singleton axis maps to -1 as in MONAI
    scale = torch.tensor([2.0 / max(n - 1, 1) for n in shape], device=ddf.device, dtype=ddf.dtype)
    norm = pos * scale.view(1, 3, 1, 1, 1) - 1.0
    return norm.permute(0, 2, 3, 4, 1).flip(-1)  # (B, D, H, W, [d, h, w]) -> grid_sample's (x=w, y=h, z=d)


def warp(image: Tensor, ddf: Tensor, mode: str = "bilinear", padding_mode: str = "border") -> Tensor:
    """Warp ``image`` by the displacement ``ddf``: ``warped(x) = image(x + ddf(x))`` (MONAI ``Warp``).

    Args:
        image: ``(B, C, D, H, W)`` volume. Floating point for ``"bilinear"``; integer label maps are
            allowed with ``"nearest"`` and come back with their dtype.
        ddf: ``(B, 3, D, H, W)`` float displacement in voxels (channel order D, H, W) on the output
            grid, which is also ``image``'s grid.
        mode: ``"bilinear"`` (trilinear interpolation, for intensities) or ``"nearest"`` (for labels).
        padding_mode: value of samples outside the volume — ``"border"`` (MONAI ``Warp``'s default),
            ``"zeros"`` or ``"reflection"``.

    Returns:
        ``(B, C, D, H, W)`` warped volume, ``image``'s dtype, on ``ddf``'s device; differentiable in
        both inputs for ``"bilinear"``.
    """
    _check_ddf(ddf, "warp")
    if image.ndim != 5:
        raise DataFormatError(f"warp: image has shape {tuple(image.shape)}; expected (B, C, D, H, W)")
    if image.shape[0] != ddf.shape[0] or image.shape[2:] != ddf.shape[2:]:
        raise DataFormatError(
            f"warp: image {tuple(image.shape)} and displacement {tuple(ddf.shape)} differ in batch or spatial size"
        )
    if mode not in WARP_MODES:
        raise ConfigError(f"warp: mode {mode!r}; expected one of {WARP_MODES}")
    if padding_mode not in PADDING_MODES:
        raise ConfigError(f"warp: padding_mode {padding_mode!r}; expected one of {PADDING_MODES}")
    integer = not image.is_floating_point()
    if integer and mode != "nearest":
        raise DataFormatError(f"warp: integer image (dtype {image.dtype}) needs mode='nearest'; got {mode!r}")
    # labels travel as float64, exact for every integer below 2**53
    src = image.to(torch.float64) if integer else image.to(ddf.dtype)
    grid = _sampling_grid(ddf.to(src.dtype))
    out = F.grid_sample(src, grid, mode=mode, padding_mode=padding_mode, align_corners=True)
    return out.round().to(image.dtype) if integer else out


def integrate_velocity(svf: Tensor, steps: int = 7) -> Tensor:
    """Displacement of the diffeomorphism ``exp(v)`` by scaling and squaring (MONAI ``DVF2DDF``).

    ``u = v / 2**steps``, then ``steps`` times ``u ← u + warp(u, u)`` with trilinear interpolation and
    zero padding (DVF2DDF's choice). The result is a diffeomorphism whenever ``v / 2**steps`` is small
    and smooth, the reason registration networks predict ``v`` in their diffeomorphic mode.

    Args:
        svf: ``(B, 3, D, H, W)`` float stationary velocity field in voxels (channel order D, H, W).
        steps: number of squarings ``N`` (7 in VoxelMorph and MONAI).

    Returns:
        ``(B, 3, D, H, W)`` displacement in voxels, MONAI ``Warp`` convention, differentiable.
    """
    _check_ddf(svf, "integrate_velocity")
    if steps < 1:
        raise ConfigError(f"integrate_velocity: steps {steps}; expected a positive number of squarings")
    ddf = svf / (2**steps)
    for _ in range(steps):
        ddf = ddf + warp(ddf, ddf, padding_mode="zeros")
    return ddf


def compose(ddf_a: Tensor, ddf_b: Tensor, padding_mode: str = "border") -> Tensor:
    """Displacement of "first ``a`` then ``b``": ``warp(warp(image, a), b) == warp(image, compose(a, b))``.

    Warping by ``a`` gives ``J(y) = I(y + a(y))``; warping ``J`` by ``b`` gives
    ``I(x + b(x) + a(x + b(x)))``, so the composed displacement is ``c = b + warp(a, b)``
    (``a`` resampled at the points ``b`` moves to). Equality with the two successive warps holds up
    to the interpolation error of resampling ``a``, and exactly when ``b`` is an integer shift
    inside the volume.

    Args:
        ddf_a: ``(B, 3, D, H, W)`` displacement applied first, voxels.
        ddf_b: ``(B, 3, D, H, W)`` displacement applied second, voxels, same grid.
        padding_mode: how ``a`` is extended outside the volume (``"border"``: constant continuation).

    Returns:
        ``(B, 3, D, H, W)`` composed displacement in voxels, differentiable in both inputs.
    """
    _check_ddf(ddf_a, "compose")
    _check_ddf(ddf_b, "compose")
    if ddf_a.shape != ddf_b.shape:
        raise DataFormatError(f"compose: displacements differ in shape, {tuple(ddf_a.shape)} vs {tuple(ddf_b.shape)}")
    return ddf_b + warp(ddf_a, ddf_b, padding_mode=padding_mode)
