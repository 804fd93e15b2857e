"""Classical deformable registration with SimpleITK — the baseline that needs no GPU and no training.

Two methods, both returning a dense displacement in the MONAI ``Warp`` convention of
:mod:`threefold.medical.registration.warp` (voxels, channel order D, H, W, ``warped(x) = moving(x + u(x))``):

- ``"bspline"`` — free-form deformation (Rueckert et al., "Nonrigid registration using free-form
  deformations: application to breast MR images", IEEE TMI 18(8), 1999) with cubic B-splines,
  maximising **Mattes mutual information**, so it works across modalities (T1w → b0). Control
  points every ``grid_spacing_vox`` voxels (8 by default: the scale of the deformations in
  :mod:`threefold.datasets.registration_phantoms`), a two-level image pyramid (shrink 2 then 1,
  smoothing 1 then 0 voxels), gradient descent with line search (SimpleITK's B-spline example
  recipe; L-BFGS variants diverged or stalled on the T1 → b0 phantoms). Regularisation
  is the control-point spacing itself (no bending-energy term in SimpleITK's registration method).
- ``"demons"`` — diffeomorphic demons (Vercauteren et al., "Diffeomorphic demons: efficient
  non-parametric image registration", NeuroImage 45(1), 2009), SimpleITK
  ``DiffeomorphicDemonsRegistrationFilter``, on a two-level pyramid with Gaussian smoothing of the
  field (``field_sigma_vox``). Demons forces come from intensity differences: **same contrast only**
  (e.g. T1w → T1w); across modalities use ``"bspline"``.

Both volumes must lie on the same voxel grid (after affine pre-alignment and resampling, e.g. the
training grid of :mod:`threefold.datasets.registration_transforms`); the registration runs in voxel
units (unit spacing, identity direction), so the returned field is in voxels of that grid.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from threefold.datasets.errors import ConfigError, DataFormatError, require

METHODS = ("bspline", "demons")


def _volume(x: Tensor | np.ndarray, name: str) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    while arr.ndim > 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise DataFormatError(f"register_classical: {name} has shape {arr.shape}; expected a 3-D volume "
                              "(D, H, W), (1, D, H, W) or (1, 1, D, H, W)")
    if not np.isfinite(arr).all():
        raise DataFormatError(f"register_classical: {name} has NaN/inf voxels")
    if float(arr.max() - arr.min()) == 0.0:
        raise DataFormatError(f"register_classical: {name} is constant (empty volume); nothing to register")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _to_itk(sitk: Any, arr: np.ndarray) -> Any:
    # ITK's index (x, y, z) is our (i, j, k): GetImageFromArray reads NumPy's last axis as x
    return sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(arr, (2, 1, 0))))


def _field_to_ddf(sitk: Any, field: Any) -> Tensor:
    """ITK displacement-field image (vectors (x, y, z) = (i, j, k), voxel units) → (3, D, H, W) float32."""
    arr = sitk.GetArrayFromImage(field)  # (k, j, i, 3)
    return torch.from_numpy(np.ascontiguousarray(np.transpose(arr, (3, 2, 1, 0)), dtype=np.float32))


def _bspline(sitk: Any, fixed: Any, moving: Any, *, grid_spacing_vox: float, iterations: int, bins: int,
             max_samples: int, seed: int, threads: int | None) -> Any:
    size = np.asarray(fixed.GetSize(), dtype=np.float64)
    mesh = [max(1, int(round(s / grid_spacing_vox))) for s in size]
    tx = sitk.BSplineTransformInitializer(fixed, mesh, order=3)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=bins)
    n = float(np.prod(size))
    fractions = [min(1.0, max_samples / max(n / f**3, 1.0)) for f in (2, 1)]
    if min(fractions) == 1.0:
        reg.SetMetricSamplingStrategy(reg.NONE)
    else:
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentagePerLevel(fractions, seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsGradientDescentLineSearch(learningRate=5.0, numberOfIterations=iterations,
                                                convergenceMinimumValue=1e-4, convergenceWindowSize=5)
    reg.SetInitialTransform(tx, inPlace=True)
    reg.SetShrinkFactorsPerLevel([2, 1])
    reg.SetSmoothingSigmasPerLevel([1, 0])
    if threads is not None:
        reg.SetNumberOfThreads(int(threads))
    reg.Execute(fixed, moving)
    return sitk.TransformToDisplacementField(tx, sitk.sitkVectorFloat64, fixed.GetSize(), fixed.GetOrigin(),
                                             fixed.GetSpacing(), fixed.GetDirection())


def _demons(sitk: Any, fixed: Any, moving: Any, *, iterations: int, field_sigma_vox: float) -> Any:
    field = None
    for shrink in (2, 1):
        f = sitk.Shrink(fixed, [shrink] * 3) if shrink > 1 else fixed
        m = sitk.Shrink(moving, [shrink] * 3) if shrink > 1 else moving
        demons = sitk.DiffeomorphicDemonsRegistrationFilter()
        demons.SetNumberOfIterations(iterations)
        demons.SetSmoothDisplacementField(True)
        demons.SetStandardDeviations(field_sigma_vox)  # physical units = voxels of this level
        if field is None:
            field = demons.Execute(f, m)
        else:  # upsample the coarse field onto this level's grid as the initial field
            init = sitk.Resample(field, f, sitk.Transform(), sitk.sitkLinear, 0.0, field.GetPixelID())
            field = demons.Execute(f, m, init)
    return field


def register_classical(moving: Tensor | np.ndarray, fixed: Tensor | np.ndarray, method: str = "bspline", *,
                       iterations: int | None = None, grid_spacing_vox: float = 8.0, bins: int = 32,
                       field_sigma_vox: float = 1.5, max_samples: int = 50_000, seed: int = 0,
                       threads: int | None = None) -> Tensor:
    """Deformable registration of ``moving`` to ``fixed`` (same voxel grid) with SimpleITK.

    Args:
        moving, fixed: ``(D, H, W)``, ``(1, D, H, W)`` or ``(1, 1, D, H, W)`` intensity volumes on one grid.
        method: ``"bspline"`` (Mattes MI, any contrasts) or ``"demons"`` (same contrast only).
        iterations: optimiser iterations per level (default 30 for B-spline, 50 for demons).
        grid_spacing_vox: B-spline control-point spacing at the finest level, voxels.
        bins: histogram bins of the MI metric (B-spline).
        field_sigma_vox: Gaussian smoothing of the demons field, voxels.
        max_samples: most voxels sampled per level for the MI metric (all when fewer).
        seed: seed of the metric's random sampling.
        threads: ITK threads (default: all cores).

    Returns:
        ``(3, D, H, W)`` float32 displacement in voxels, MONAI ``Warp`` convention, on CPU.
    """
    if method not in METHODS:
        raise ConfigError(f"register_classical: method {method!r}; expected one of {METHODS}")
    sitk = require("SimpleITK", extra="medical")
    mov, fix = _volume(moving, "moving"), _volume(fixed, "fixed")
    if mov.shape != fix.shape:
        raise DataFormatError(f"register_classical: moving {mov.shape} and fixed {fix.shape} are not on one grid; "
                              "resample the moving image onto the fixed grid first")
    if min(fix.shape) < 8:
        raise DataFormatError(f"register_classical: volume {fix.shape} is too small (need at least 8 voxels per axis)")
    fixed_img, moving_img = _to_itk(sitk, fix), _to_itk(sitk, mov)
    if method == "bspline":
        field = _bspline(sitk, fixed_img, moving_img, grid_spacing_vox=grid_spacing_vox,
                         iterations=iterations or 30, bins=bins, max_samples=max_samples, seed=seed, threads=threads)
    else:
        field = _demons(sitk, fixed_img, moving_img, iterations=iterations or 50, field_sigma_vox=field_sigma_vox)
    return _field_to_ddf(sitk, field)
