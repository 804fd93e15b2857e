"""Registration results in the fixed image's original geometry: the warped moving image, the
displacement field in millimetres (world frame) and in voxels, and its Jacobian determinant.

A registration computed on a training grid (affine pre-alignment ``P`` then a deformable field ``u``
on the grid ``A_g``, see :mod:`threefold.datasets.registration_transforms`) defines, for every voxel
``q`` of the **original** fixed image (affine ``A_f``), the corresponding moving world point::

    y = A_f q                       fixed world point (mm, RAS+)
    g = A_g⁻¹ y                     its continuous index on the training grid
    x = P · A_g (g + u(g))          the moving world point it takes its value from (mm, RAS+)

(``u(g)`` trilinearly interpolated, border-extended outside the grid as MONAI's ``Warp`` does). From
this map:

- **warped** ``(D, H, W)``: the original moving image sampled at ``x`` (one trilinear interpolation
  from its own grid; 0 outside it), on the fixed grid;
- **displacement in mm** ``(D, H, W, 3)``: ``x − y``, world frame, RAS+ components (x → Right,
  y → Anterior, z → Superior), the whole map (affine and deformable part together). ITK / ANTs store
  displacement fields as 5-D NIfTI in LPS components: negate the first two components and reshape to
  ``(D, H, W, 1, 3)`` to hand the field to them;
- **displacement in voxels** ``(D, H, W, 3)``: ``A_f⁻¹ x − q``, channel ``i`` along the fixed
  image's voxel axis ``i`` — the MONAI ``Warp`` convention on the fixed grid, i.e.
  ``warp(moving resampled onto the fixed grid, u_vox)`` reproduces *warped* (up to interpolation);
- **Jacobian determinant** ``(D, H, W)``: ``det(I + ∇u_vox)``
  (:func:`threefold.medical.deformation.jacobian_determinant`), equal to the determinant of the
  world-space map's Jacobian (volume change; ≤ 0 is folding).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from threefold.datasets.errors import DataFormatError
from threefold.datasets.volumes import write_nifti
from threefold.medical.deformation import jacobian_determinant


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def fixed_space_outputs(moving: Tensor | np.ndarray, moving_affine: Tensor | np.ndarray,
                        fixed_shape: tuple[int, int, int], fixed_affine: Tensor | np.ndarray,
                        grid_affine: Tensor | np.ndarray, ddf: Tensor | np.ndarray,
                        prealign: Tensor | np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Map a training-grid registration back onto the original fixed grid.

    Args:
        moving: ``(D_m, H_m, W_m)`` or ``(1, D_m, H_m, W_m)`` original moving image (its own grid).
        moving_affine: (4, 4) voxel → world of ``moving``, mm.
        fixed_shape: original fixed grid ``(D, H, W)``.
        fixed_affine: (4, 4) voxel → world of the original fixed image, mm.
        grid_affine: (4, 4) voxel → world of the training grid, mm.
        ddf: ``(3, S_d, S_h, S_w)`` (or with a leading batch of 1) displacement on the training grid,
            voxels of that grid, MONAI ``Warp`` convention.
        prealign: optional (4, 4) fixed world → moving world (the affine step), mm.

    Returns:
        ``warped`` (D, H, W) float32, ``displacement_mm`` (D, H, W, 3) float32 (world RAS+, mm),
        ``displacement_vox`` (D, H, W, 3) float32 (fixed voxels), ``jacobian`` (D, H, W) float32.
    """
    mov = _np(moving)
    mov = mov[0] if mov.ndim == 4 and mov.shape[0] == 1 else mov
    u = _np(ddf).astype(np.float64)
    u = u[0] if u.ndim == 5 else u
    if mov.ndim != 3:
        raise DataFormatError(f"fixed_space_outputs: moving has shape {mov.shape}; expected a 3-D volume")
    if u.ndim != 4 or u.shape[0] != 3:
        raise DataFormatError(f"fixed_space_outputs: displacement has shape {u.shape}; expected (3, D, H, W)")
    a_f = _np(fixed_affine).astype(np.float64)
    a_g = _np(grid_affine).astype(np.float64)
    a_m = _np(moving_affine).astype(np.float64)
    p = np.eye(4) if prealign is None else _np(prealign).astype(np.float64)
    shape = tuple(int(s) for s in fixed_shape)
    q = np.indices(shape, dtype=np.float64).reshape(3, -1)
    y = a_f[:3, :3] @ q + a_f[:3, 3:4]
    g = np.linalg.inv(a_g)[:3, :3] @ y + np.linalg.inv(a_g)[:3, 3:4]
    u_at_g = np.stack([ndimage.map_coordinates(c, g, order=1, mode="nearest") for c in u])
    moved = g + u_at_g
    x_grid = a_g[:3, :3] @ moved + a_g[:3, 3:4]
    x = p[:3, :3] @ x_grid + p[:3, 3:4]
    inv_m = np.linalg.inv(a_m)
    idx_m = inv_m[:3, :3] @ x + inv_m[:3, 3:4]
    warped = ndimage.map_coordinates(mov.astype(np.float64), idx_m, order=1, mode="constant", cval=0.0)
    inv_f = np.linalg.inv(a_f)
    u_vox = (inv_f[:3, :3] @ x + inv_f[:3, 3:4]) - q
    disp_vox = u_vox.reshape(3, *shape)
    jac = jacobian_determinant(torch.from_numpy(disp_vox)) if min(shape) >= 2 else torch.ones(shape, dtype=torch.float64)
    return {
        "warped": warped.reshape(shape).astype(np.float32),
        "displacement_mm": np.moveaxis((x - y).reshape(3, *shape), 0, -1).astype(np.float32),
        "displacement_vox": np.moveaxis(disp_vox, 0, -1).astype(np.float32),
        "jacobian": jac.numpy().astype(np.float32),
    }


def write_outputs(out_dir: str | Path, outputs: dict[str, np.ndarray], fixed_affine: Tensor | np.ndarray) -> dict[str, Path]:
    """Write :func:`fixed_space_outputs` as NIfTI-1 with the fixed image's affine.

    Files: ``warped.nii.gz``, ``displacement.nii.gz`` (mm, world RAS+; NIfTI intent ``DISPVECT``),
    ``displacement_vox.nii.gz`` (fixed voxels; intent ``VECTOR``), ``jacobian.nii.gz``.
    """
    from threefold.datasets.errors import require

    nib = require("nibabel", extra="medical")
    out = Path(out_dir)
    paths = {
        "warped": write_nifti(out / "warped.nii.gz", outputs["warped"], fixed_affine),
        "displacement": write_nifti(out / "displacement.nii.gz", np.moveaxis(outputs["displacement_mm"], -1, 0), fixed_affine),
        "displacement_vox": write_nifti(out / "displacement_vox.nii.gz", np.moveaxis(outputs["displacement_vox"], -1, 0), fixed_affine),
        "jacobian": write_nifti(out / "jacobian.nii.gz", outputs["jacobian"], fixed_affine),
    }
    for key, intent, name in (("displacement", "displacement vector", "mm world RAS"),
                              ("displacement_vox", "vector", "voxels i j k")):
        img = nib.load(paths[key])
        img = nib.Nifti1Image(np.asarray(img.dataobj), img.affine, img.header)
        img.header.set_intent(intent, name=name)
        nib.save(img, paths[key])
    return paths
