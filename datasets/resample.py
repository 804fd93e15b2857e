"""Resampling volumes between voxel grids in world (mm) coordinates, and the training grid of a
registration pair.

Geometry follows :mod:`threefold.datasets.volumes`: an affine ``A`` (4, 4) float64 maps the voxel
index ``(i, j, k, 1)`` to the world point ``(x, y, z, 1)`` in millimetres (RAS+). Resampling *pulls*:
every voxel ``q`` of the destination grid takes the source value at the source index
``A_src⁻¹ · T · A_dst · q``, where ``T`` (4, 4) is an optional world transform from destination
world points to source world points (identity when the two images already share a world frame;
the affine pre-alignment of :mod:`threefold.medical.registration.affine` estimates it).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from scipy import ndimage

from threefold.datasets.errors import ConfigError, DataFormatError

#: Spatial sizes of registration grids must be multiples of this (the NestedMorph / VoxelMorph encoders
#: downsample by 32 in total).
GRID_MULTIPLE = 32


def _as_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def resample_volume(image: torch.Tensor | np.ndarray, src_affine: torch.Tensor | np.ndarray,
                    dst_shape: tuple[int, int, int], dst_affine: torch.Tensor | np.ndarray,
                    world_transform: torch.Tensor | np.ndarray | None = None, order: int = 1,
                    cval: float = 0.0) -> np.ndarray:
    """Resample ``image`` onto the grid ``(dst_shape, dst_affine)``.

    Args:
        image: ``(D, H, W)`` or ``(C, D, H, W)`` source volume on the grid of ``src_affine`` (4, 4) mm.
        dst_shape: destination voxel counts ``(D, H, W)``.
        dst_affine: (4, 4) destination voxel → world affine, mm.
        world_transform: optional (4, 4) map from destination world points to source world points, mm.
        order: 1 trilinear (intensities) or 0 nearest neighbour (labels, masks).
        cval: value of points outside the source volume.

    Returns:
        NumPy array ``(D', H', W')`` or ``(C, D', H', W')``, float64 for ``order=1``, the source dtype
        for ``order=0``.
    """
    arr = _as_numpy(image)
    if arr.ndim not in (3, 4):
        raise DataFormatError(f"resample_volume: image has shape {arr.shape}; expected (D, H, W) or (C, D, H, W)")
    if order not in (0, 1):
        raise ConfigError(f"resample_volume: order {order}; expected 0 (nearest) or 1 (trilinear)")
    src = _as_numpy(src_affine).astype(np.float64)
    dst = _as_numpy(dst_affine).astype(np.float64)
    m = dst if world_transform is None else _as_numpy(world_transform).astype(np.float64) @ dst
    index_map = np.linalg.inv(src) @ m  # destination index -> source index
    channels = arr[None] if arr.ndim == 3 else arr
    out = np.stack([
        ndimage.affine_transform(c if order == 0 else c.astype(np.float64), index_map[:3, :3], index_map[:3, 3],
                                 output_shape=tuple(int(s) for s in dst_shape), order=order, mode="constant",
                                 cval=cval)
        for c in channels
    ])
    return out[0] if arr.ndim == 3 else out


def grid_size(size: int | tuple[int, int, int]) -> tuple[int, int, int]:
    """The training grid ``(D, H, W)`` for ``size``: each axis a multiple of :data:`GRID_MULTIPLE`;
    any other size is rounded **up** to the next multiple with a warning saying so."""
    dims = (size,) * 3 if isinstance(size, int) else tuple(int(s) for s in size)
    if len(dims) != 3 or min(dims) < 1:
        raise ConfigError(f"training grid size {size!r}; expected a positive int or three positive ints")
    padded = tuple(GRID_MULTIPLE * math.ceil(d / GRID_MULTIPLE) for d in dims)
    if padded != dims:
        warnings.warn(f"training grid {dims} is not a multiple of {GRID_MULTIPLE} per axis (the registration "
                      f"networks downsample by {GRID_MULTIPLE}); padded to {padded}", stacklevel=2)
    return padded  # type: ignore[return-value]


def training_grid(shape: tuple[int, ...], affine: torch.Tensor | np.ndarray,
                  size: int | tuple[int, int, int] = 64) -> tuple[tuple[int, int, int], np.ndarray]:
    """Isotropic grid of ``size`` voxels per axis covering the field of view of ``(shape, affine)``.

    The grid keeps the axis directions of ``affine`` (so a RAS+ image stays RAS+), is centred on the
    same world point, and its isotropic spacing is the one that fits the longest extent (in mm) of
    the field of view into the grid, so nothing is cut off and the aspect ratio is kept (the shorter
    axes get background margin).

    Returns:
        ``(grid_shape, grid_affine)`` with ``grid_affine`` (4, 4) float64 mm.
    """
    dims = grid_size(size)
    a = _as_numpy(affine).astype(np.float64)
    spacing = np.linalg.norm(a[:3, :3], axis=0)
    extent = np.asarray(shape[:3], dtype=np.float64) * spacing  # mm covered by each axis
    new_spacing = float(np.max(extent / np.asarray(dims)))
    direction = a[:3, :3] / spacing
    centre = a @ np.append((np.asarray(shape[:3], dtype=np.float64) - 1) / 2.0, 1.0)
    out = np.eye(4)
    out[:3, :3] = direction * new_spacing
    out[:3, 3] = centre[:3] - out[:3, :3] @ ((np.asarray(dims, dtype=np.float64) - 1) / 2.0)
    return dims, out
