"""Preprocessing chain of a registration pair: world-space resampling onto the training grid, brain
masks, per-volume min–max normalisation.

A **raw pair** (what :class:`threefold.datasets.hcp.HCPRegistration` and ``threefold register``
read, each volume in its own geometry, reoriented to the closest RAS+ axes)::

    moving         (1, D, H, W) float32         e.g. T1w
    moving_affine  (4, 4) float64, mm           voxel → world RAS+
    fixed          (1, D', H', W') float32      e.g. mean b0
    fixed_affine   (4, 4) float64, mm
    moving_mask / fixed_mask    (1, ...) bool   optional brain masks on their image's grid
    moving_label / fixed_label  (1, ...) int64  optional label maps on their image's grid
    prealign       (4, 4) float64, mm           optional: fixed world → moving world (affine step)
    subject        str

The chain — ``PairCompose([prealign, ResampleToGrid(size), ApplyBrainMask(), MinMaxNormalize()])`` —
turns it into a **training pair** on one isotropic grid of ``size`` voxels per axis covering the
fixed image's field of view (or its brain mask's bounding box plus a margin)::

    moving, fixed              (1, S, S, S) float32 in [0, 1]
    moving_label, fixed_label  (1, S, S, S) int64 (when present; nearest-neighbour resampling)
    moving_mask, fixed_mask    (1, S, S, S) bool  (when present)
    affine                     (4, 4) float64     voxel → world of the training grid (mm)
    fixed_affine, fixed_shape  the fixed image's original geometry, to write results back into
    moving_affine, prealign    kept for the same reason
    subject                    str

The affine step itself (SimpleITK Mattes MI) lives above this layer:
:class:`threefold.medical.registration.affine.AffinePrealign` is a transform of this protocol and is
the ``prealign`` element of the chain. Every transform is ``t(pair, generator=None) -> new pair``
(deterministic; the generator argument keeps the dataset transform signature). Canonical RAS
orientation is done on reading (``read_nifti(canonical=True)``, nibabel's
``as_closest_canonical``, which MONAI's ``Orientation("RAS")`` also uses).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from threefold.datasets.errors import ConfigError, DataFormatError
from threefold.datasets.resample import grid_size, resample_volume, training_grid

PairTransform = Callable[..., dict[str, Any]]


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


class PairCompose:
    """Apply pair transforms in order."""

    def __init__(self, transforms: Sequence[PairTransform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, pair: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Any]:
        for t in self.transforms:
            pair = t(pair, generator)
        return pair

    def __repr__(self) -> str:
        return f"PairCompose({self.transforms!r})"


class ResampleToGrid:
    """Resample both volumes (and labels, masks) onto an isotropic training grid of ``size`` voxels.

    The grid covers the fixed image's field of view, or, with ``margin_mm`` set and a fixed mask
    present, the mask's bounding box grown by ``margin_mm`` on every side (more voxels on the brain);
    see :func:`threefold.datasets.resample.training_grid`. The moving image is pulled through
    ``prealign`` (fixed world → moving world, identity when absent) — one interpolation from its
    original grid. Images are trilinear, labels and masks nearest-neighbour; outside a volume is 0.

    Args:
        size: voxels per axis (int or three ints), each a multiple of 32 — 64 as in the NestedMorph
            paper, 96 or 128 allowed; other sizes are padded up with a warning.
        margin_mm: margin around the fixed mask's bounding box, mm (``None``: always the full field of view).
    """

    def __init__(self, size: int | tuple[int, int, int] = 64, margin_mm: float | None = 5.0) -> None:
        self.size = grid_size(size)
        self.margin_mm = margin_mm

    def __repr__(self) -> str:
        return f"ResampleToGrid(size={self.size}, margin_mm={self.margin_mm})"

    def _fov(self, pair: dict[str, Any]) -> tuple[tuple[int, int, int], np.ndarray]:
        shape = tuple(int(s) for s in pair["fixed"].shape[-3:])
        affine = _np(pair["fixed_affine"]).astype(np.float64)
        mask = pair.get("fixed_mask")
        if self.margin_mm is None or mask is None:
            return shape, affine  # type: ignore[return-value]
        m = _np(mask).reshape(shape) != 0
        if not m.any():
            raise DataFormatError(f"{pair.get('subject', 'pair')}: the fixed brain mask is empty")
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        pad = np.ceil(self.margin_mm / spacing).astype(int)
        idx = np.nonzero(m)
        lo = np.array([i.min() for i in idx]) - pad
        hi = np.array([i.max() for i in idx]) + pad + 1
        sub = affine.copy()
        sub[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]  # may extend beyond the image: zeros there
        return tuple(int(v) for v in hi - lo), sub  # type: ignore[return-value]

    def __call__(self, pair: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Any]:
        for key in ("moving", "fixed", "moving_affine", "fixed_affine"):
            if key not in pair:
                raise ConfigError(f"ResampleToGrid: pair has no {key!r}")
        fov_shape, fov_affine = self._fov(pair)
        dims, grid = training_grid(fov_shape, fov_affine, self.size)
        prealign = _np(pair.get("prealign", np.eye(4))).astype(np.float64)
        out = dict(pair)
        for side in ("moving", "fixed"):
            src_aff = _np(pair[f"{side}_affine"]).astype(np.float64)
            world = prealign if side == "moving" else None
            out[side] = torch.from_numpy(
                resample_volume(pair[side], src_aff, dims, grid, world, order=1).astype(np.float32))
            for extra, dtype in ((f"{side}_label", torch.int64), (f"{side}_mask", torch.bool)):
                if pair.get(extra) is not None:
                    arr = _np(pair[extra])
                    if arr.shape[-3:] != tuple(pair[side].shape[-3:]):
                        raise DataFormatError(f"{pair.get('subject', 'pair')}: {extra} shape {arr.shape} differs "
                                              f"from the {side} image's {tuple(pair[side].shape)}")
                    res = resample_volume(arr.astype(np.int64), src_aff, dims, grid, world, order=0)
                    out[extra] = torch.from_numpy(res).to(dtype)
        out["affine"] = torch.from_numpy(grid)
        out["fixed_affine"] = torch.as_tensor(_np(pair["fixed_affine"]), dtype=torch.float64)
        out["moving_affine"] = torch.as_tensor(_np(pair["moving_affine"]), dtype=torch.float64)
        out["fixed_shape"] = torch.tensor(pair["fixed"].shape[-3:], dtype=torch.int64)
        out["prealign"] = torch.from_numpy(prealign)
        return out


class ApplyBrainMask:
    """Zero each image outside its own brain mask (``moving_mask`` / ``fixed_mask``, when present)."""

    def __repr__(self) -> str:
        return "ApplyBrainMask()"

    def __call__(self, pair: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Any]:
        out = dict(pair)
        for side in ("moving", "fixed"):
            mask = pair.get(f"{side}_mask")
            if mask is not None:
                image = torch.as_tensor(pair[side])
                out[side] = image * torch.as_tensor(mask).reshape(image.shape).to(image.dtype)
        return out


class MinMaxNormalize:
    """Per-volume min–max scaling of ``moving`` and ``fixed`` to [0, 1] (MONAI ``ScaleIntensity(minv=0,
    maxv=1)``). An empty (constant) volume raises: registration has nothing to align."""

    def __repr__(self) -> str:
        return "MinMaxNormalize()"

    def __call__(self, pair: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Any]:
        out = dict(pair)
        for side in ("moving", "fixed"):
            x = torch.as_tensor(pair[side])
            lo, hi = x.min(), x.max()
            if not hi > lo:
                raise DataFormatError(f"{pair.get('subject', 'pair')}: the {side} volume is constant ({float(lo)}) "
                                      "on the training grid; nothing to register (empty volume or no overlap)")
            out[side] = ((x - lo) / (hi - lo)).to(torch.float32)
        return out


def default_pair_transform(size: int | tuple[int, int, int] = 64, prealign: PairTransform | None = None,
                           margin_mm: float | None = 5.0) -> PairCompose:
    """``[prealign,] ResampleToGrid(size, margin_mm), ApplyBrainMask(), MinMaxNormalize()``."""
    steps: list[PairTransform] = [prealign] if prealign is not None else []
    return PairCompose(steps + [ResampleToGrid(size, margin_mm), ApplyBrainMask(), MinMaxNormalize()])
