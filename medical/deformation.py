"""Regularity of dense deformations: Jacobian determinant of a displacement field, the percentage of
folded voxels and the standard deviation of the log Jacobian (SDlogJ), in the two conventions found
in the registration literature.

A displacement field ``u`` maps voxel ``x`` to ``x + u(x)``; its Jacobian is ``J = det(I + ∇u)``.
``J ≤ 0`` marks folding (the map stops being locally invertible). SDlogJ measures smoothness:

- ``convention="positive"``: ``std(log J)`` over the voxels with ``J > 0``, where the logarithm is
  defined (the form most registration papers state in words).
- ``convention="learn2reg"``: the Learn2Reg challenge evaluation (Hering et al., IEEE TMI 2022,
  ``evaluation.py``): ``std(log(clip(J + 3, 1e-9, 1e9)))`` over the field cropped by 2 voxels at every
  border. The ``+ 3`` is in the challenge code; it compresses the spread, so numbers of the two
  conventions are not comparable, and every result carries its convention's name.

Standard deviations are population ones (``ddof = 0``, as ``numpy.std`` in the challenge code).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from threefold.datasets.errors import ConfigError, DataFormatError

SDLOGJ_CONVENTIONS = ("positive", "learn2reg")


class SDlogJ(NamedTuple):
    """SDlogJ ``value`` (scalar or ``(B,)``) and the ``convention`` that produced it."""

    value: Tensor
    convention: str


def jacobian_determinant(disp: Tensor) -> Tensor:
    """Jacobian determinant ``det(I + ∇u)`` of a displacement field in voxel units.

    Derivatives are central differences in the interior and one-sided first differences at the
    borders, exactly ``numpy.gradient`` (``torch.gradient``, ``edge_order=1``), so the Learn2Reg
    crop of 2 voxels removes every border-affected value.

    Args:
        disp: ``(3, D, H, W)`` or ``(B, 3, D, H, W)`` float displacement in voxels; channel ``i`` is
            the displacement along spatial axis ``i`` (D, H, W order, as VoxelMorph).

    Returns:
        ``(D, H, W)`` or ``(B, D, H, W)`` determinant (dimensionless), same dtype and device,
        differentiable in ``disp``.
    """
    if disp.ndim not in (4, 5) or disp.shape[-4] != 3:
        raise DataFormatError(
            f"jacobian_determinant: displacement has shape {tuple(disp.shape)}; "
            "expected (3, D, H, W) or (B, 3, D, H, W)"
        )
    if not disp.is_floating_point():
        raise DataFormatError(f"jacobian_determinant: displacement dtype {disp.dtype}; expected floating point")
    if min(disp.shape[-3:]) < 2:
        raise DataFormatError(
            f"jacobian_determinant: spatial shape {tuple(disp.shape[-3:])}; need at least 2 voxels per axis"
        )
    # g[j][..., i, :, :, :] = ∂u_i / ∂x_j
    g = torch.gradient(disp, dim=(-3, -2, -1))
    a = [[g[j].select(-4, i) + (1.0 if i == j else 0.0) for j in range(3)] for i in range(3)]
    return (
        a[0][0] * (a[1][1] * a[2][2] - a[1][2] * a[2][1])
        - a[0][1] * (a[1][0] * a[2][2] - a[1][2] * a[2][0])
        + a[0][2] * (a[1][0] * a[2][1] - a[1][1] * a[2][0])
    )


def folding_percentage(jac: Tensor) -> Tensor:
    """Percentage (0–100) of voxels with ``J ≤ 0``.

    Args:
        jac: ``(D, H, W)`` or ``(B, D, H, W)`` Jacobian determinant.

    Returns:
        Scalar or ``(B,)`` float percentage on ``jac``'s device.
    """
    _check_jac(jac, "folding_percentage")
    dtype = jac.dtype if jac.is_floating_point() else torch.float32
    return 100.0 * (jac <= 0).to(dtype).mean(dim=(-3, -2, -1))


def sdlogj(jac: Tensor, convention: str = "positive") -> SDlogJ:
    """Standard deviation of the log Jacobian determinant, in a named convention.

    Args:
        jac: ``(D, H, W)`` or ``(B, D, H, W)`` Jacobian determinant (from :func:`jacobian_determinant`
            of the full, uncropped field).
        convention: ``"positive"`` — std of ``log J`` over voxels with ``J > 0`` (NaN when there are
            none); ``"learn2reg"`` — std of ``log(clip(J + 3, 1e-9, 1e9))`` over ``jac[..., 2:-2, 2:-2, 2:-2]``.

    Returns:
        :class:`SDlogJ` with ``value`` (scalar or ``(B,)``, ``jac``'s dtype and device) and ``convention``.
    """
    _check_jac(jac, "sdlogj")
    if convention == "positive":
        pos = jac > 0
        logj = torch.log(torch.where(pos, jac, torch.ones_like(jac)))
        n = pos.sum(dim=(-3, -2, -1)).to(jac.dtype)
        mean = logj.sum(dim=(-3, -2, -1)) / n
        centred = torch.where(pos, logj - mean[..., None, None, None], torch.zeros_like(jac))
        value = torch.sqrt((centred * centred).sum(dim=(-3, -2, -1)) / n)
    elif convention == "learn2reg":
        if min(jac.shape[-3:]) <= 4:
            raise DataFormatError(
                f"sdlogj: Jacobian of spatial shape {tuple(jac.shape[-3:])} leaves nothing after the "
                "Learn2Reg 2-voxel border crop; expected more than 4 voxels per axis"
            )
        core = jac[..., 2:-2, 2:-2, 2:-2]
        value = torch.log((core + 3.0).clamp(1e-9, 1e9)).std(dim=(-3, -2, -1), correction=0)
    else:
        raise ConfigError(f"sdlogj: convention {convention!r}; expected one of {SDLOGJ_CONVENTIONS}")
    return SDlogJ(value=value, convention=convention)


def _check_jac(jac: Tensor, name: str) -> None:
    if jac.ndim not in (3, 4):
        raise DataFormatError(f"{name}: Jacobian has shape {tuple(jac.shape)}; expected (D, H, W) or (B, D, H, W)")
