"""Deterministic brain-like registration pairs with a known diffeomorphic deformation.

SYNTHETIC DATA, not MRI: the embedded sample of the NestedMorph pipelines (T1w → dMRI b0, issue 6).
Each pair is one healthy phantom anatomy (:func:`threefold.datasets.brain_phantoms.brain_anatomy`:
irregular ellipsoidal brain, CSF layer, cortex of varying thickness, white matter, two lateral
ventricles, plus two deep grey nuclei) imaged twice:

- ``moving``: a **T1-like** contrast (white matter brightest, then grey matter, CSF darkest) on the
  anatomy as drawn;
- ``fixed``: a **b0-like** contrast (T2-weighted EPI: CSF and ventricles brightest, white matter
  darkest, blurrier and noisier, Rician background) of the same anatomy deformed by ``ddf_true``.

The contrasts are inverted between the two, so intensity-difference losses fail and a cross-modal
measure (mutual information, or local NCC after a network has learnt the mapping) is needed, as for
real T1w → b0 registration. Each volume has its own smooth multiplicative bias field and is min–max
normalised to [0, 1].

Ground-truth deformation: a stationary velocity field of white noise smoothed by a Gaussian of
``size / 8`` voxels and tapered smoothly to 0 over the outer ``size / 8`` voxels (background),
integrated by scaling and squaring (7 steps), hence diffeomorphic by construction; its overall
scale is set so that the largest displacement has length ``max_displacement_vox`` voxels (4 by
default: 4 mm at the 64³, 1 mm grid). Over six 64³ pairs: mean displacement over brain voxels
1.27–1.62 voxels, Jacobian determinant 0.47–1.97, white-matter Dice between the unregistered label
maps 0.93–0.94. With the MONAI ``Warp`` convention (see
:mod:`threefold.medical.registration.warp`)::

    fixed_label == warp(moving_label, ddf_true, mode="nearest")     # exactly, every voxel

The fixed intensities come from the moving-space b0 image pulled through ``ddf_true`` trilinearly
(then bias and noise are added in fixed space). The generator is written with SciPy, independently
of the torch warp, and nudges the few sample points that fall within 1e-3 voxel of a rounding tie
by 2e-3 voxel so that nearest-neighbour lookups cannot differ between implementations.

Arrays are in NIfTI index order (i, j, k), 1 mm isotropic voxels, BraTS-like orientation
(:func:`threefold.datasets.brain_phantoms.phantom_affine`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset

from threefold.datasets.brain_phantoms import _smooth_field, brain_anatomy, phantom_affine
from threefold.datasets.errors import ConfigError
from threefold.datasets.registry import register_dataset

#: Tissue classes of ``moving_label`` / ``fixed_label``.
LABELS: dict[str, int] = {
    "background": 0, "csf": 1, "grey_matter": 2, "white_matter": 3, "ventricles": 4, "deep_grey": 5,
}

# Mean intensity per class (index = label code) before bias, texture and noise, arbitrary units.
_T1 = np.array([0.0, 0.25, 0.55, 0.82, 0.20, 0.66])  # T1w: WM > deep GM > GM > CSF
_B0 = np.array([0.0, 0.95, 0.58, 0.36, 1.00, 0.48])  # b0 (T2w EPI): CSF > GM > deep GM > WM

#: Squarings of the scaling-and-squaring integration (VoxelMorph / MONAI ``DVF2DDF``).
INTEGRATION_STEPS = 7
_SPLIT_STREAM = {None: 0, "train": 1, "val": 2, "test": 3}


def _pull(volume: np.ndarray, ddf: np.ndarray, order: int, mode: str) -> np.ndarray:
    """``out(x) = volume(x + ddf(x))`` for a (D, H, W) volume and a (3, D, H, W) voxel displacement."""
    coords = np.indices(volume.shape, dtype=np.float64) + ddf
    return ndimage.map_coordinates(volume, coords, order=order, mode=mode)


def _integrate(svf: np.ndarray, steps: int = INTEGRATION_STEPS) -> np.ndarray:
    """Scaling and squaring ``u ← u + u∘(id + u)`` from ``u = v / 2**steps``; outside the volume
    the field is taken as 0 (MONAI ``DVF2DDF``'s zero padding)."""
    u = svf / 2.0**steps
    for _ in range(steps):
        u = u + np.stack([_pull(c, u, order=1, mode="grid-constant") for c in u])
    return u


def _away_from_ties(ddf: np.ndarray, margin: float = 1e-3) -> np.ndarray:
    """Move sample points ``x + u`` lying within ``margin`` of a half-integer by ``2 margin`` so
    nearest-neighbour rounding is unambiguous (float32 / float64, any implementation)."""
    pos = np.indices(ddf.shape[1:], dtype=np.float64) + ddf
    frac = pos - np.floor(pos)
    near = np.abs(frac - 0.5) < margin
    return np.where(near, ddf + np.where(frac < 0.5, -2 * margin, 2 * margin), ddf)


def _rician(clean: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of a complex signal with Gaussian noise in both channels (MRI background statistics)."""
    return np.hypot(clean + sigma * rng.standard_normal(clean.shape), sigma * rng.standard_normal(clean.shape))


def _minmax(x: np.ndarray) -> np.ndarray:
    return ((x - x.min()) / max(float(x.max() - x.min()), 1e-12)).astype(np.float32)


def registration_phantom(seed: int | tuple[int, ...], size: int = 64, max_displacement_vox: float = 4.0) -> dict[str, Any]:
    """One T1-like / b0-like pair with its ground-truth displacement.

    Args:
        seed: NumPy seed (an int or a tuple of ints); the same seed gives the same pair.
        size: voxels per axis (cubic grid, 1 mm voxels; at least 24).
        max_displacement_vox: length of the largest ground-truth displacement vector, voxels (> 0).

    Returns:
        NumPy arrays in index order (i, j, k): ``moving`` (size³) float32 in [0, 1] (T1-like),
        ``fixed`` (size³) float32 in [0, 1] (b0-like, deformed), ``moving_label`` / ``fixed_label``
        (size³) int64 codes of :data:`LABELS`, ``ddf_true`` (3, size, size, size) float32 voxels
        (MONAI ``Warp`` convention), ``svf`` (3, size, size, size) float64 its velocity field,
        ``affine`` (4, 4) float64 (mm).
    """
    if size < 24:
        raise ConfigError(f"registration phantom size must be at least 24 voxels per axis, got {size}")
    if not max_displacement_vox > 0:
        raise ConfigError(f"max_displacement_vox must be positive, got {max_displacement_vox}")
    shape = (size, size, size)
    rng = np.random.default_rng(seed)
    anatomy = brain_anatomy(rng, shape)
    grid, centre, radii = anatomy["grid"], anatomy["centre"], anatomy["radii"]
    label = anatomy["tissue"].astype(np.int64)
    label[anatomy["ventricles"]] = LABELS["ventricles"]
    # deep grey nuclei (basal-ganglia-like) lateral to and below the ventricles, inside white matter
    nucleus_r = radii * np.array([0.16, 0.24, 0.2]) * rng.uniform(0.85, 1.15)
    for side in (-1.0, 1.0):
        c = centre + np.array([side * 0.36 * radii[0], 0.05 * radii[1], -0.12 * radii[2]])
        inside = np.linalg.norm((grid - c) / nucleus_r, axis=-1) < 1.0
        label[inside & (label == LABELS["white_matter"])] = LABELS["deep_grey"]
    brain = label > 0

    # moving-space images: class means, partial volume (Gaussian blur), smooth texture
    t1 = ndimage.gaussian_filter(_T1[label], 0.6) + 0.03 * _smooth_field(rng, shape, 1.5)
    b0 = ndimage.gaussian_filter(_B0[label], 1.0) + 0.04 * _smooth_field(rng, shape, 2.0)
    t1 = np.where(brain, t1, 0.0)
    b0 = np.where(brain, b0, 0.0)

    # ground truth: smooth SVF, scaled so that the integrated field's largest vector has the asked length
    sigma = size / 8.0
    svf = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect") for _ in range(3)])
    # taper to 0 over the outer size/8 voxels (background): the field then agrees with the zero
    # padding of the integration instead of compressing the border
    ramp = np.clip(np.minimum(np.arange(size), np.arange(size)[::-1]) / sigma, 0.0, 1.0)
    ramp = ramp * ramp * (3.0 - 2.0 * ramp)
    svf *= ramp[:, None, None] * ramp[None, :, None] * ramp[None, None, :]
    svf *= max_displacement_vox / np.linalg.norm(svf, axis=0).max()
    ddf = _integrate(svf)
    # one correction: exp(v) is not linear in v, so rescale v by the measured ratio and integrate again
    svf *= max_displacement_vox / np.linalg.norm(ddf, axis=0).max()
    ddf = _away_from_ties(_integrate(svf)).astype(np.float32)

    fixed_label = _pull(label, ddf.astype(np.float64), order=0, mode="nearest").astype(np.int64)
    fixed_clean = np.clip(_pull(b0, ddf.astype(np.float64), order=1, mode="nearest"), 0.0, None)
    bias_t1 = np.exp(0.10 * _smooth_field(rng, shape, size / 4.0))
    bias_b0 = np.exp(0.15 * _smooth_field(rng, shape, size / 4.0))
    moving = np.where(brain, bias_t1 * t1 + 0.015 * rng.standard_normal(shape), 0.0)
    fixed = _rician(bias_b0 * fixed_clean, 0.03, rng)
    return {
        "moving": _minmax(np.clip(moving, 0.0, None)),
        "fixed": _minmax(fixed),
        "moving_label": label,
        "fixed_label": fixed_label,
        "ddf_true": ddf,
        "svf": svf,
        "affine": phantom_affine(shape),
    }


@register_dataset("registration-phantoms", "Generated T1-like -> b0-like brain phantom pairs with a known "
                  "diffeomorphic deformation and tissue labels (no root: n_pairs, size, seed, split)",
                  modality="volume")
class RegistrationPhantoms(Dataset):
    """``n_pairs`` generated registration pairs (see the module docstring for what they contain).

    Pair ``i`` of split ``split`` is drawn from the seed ``(seed, stream(split), i)`` — ``None`` 0,
    ``"train"`` 1, ``"val"`` 2, ``"test"`` 3 — so splits never share a pair and every pair is
    reproducible on its own (any DataLoader worker, any order).

    Items::

        moving        (1, D, H, W) float32 in [0, 1]   T1-like contrast
        fixed         (1, D, H, W) float32 in [0, 1]   b0-like contrast of the deformed anatomy
        moving_label  (1, D, H, W) int64               tissue codes of LABELS
        fixed_label   (1, D, H, W) int64               == warp(moving_label, ddf_true, "nearest")
        ddf_true      (3, D, H, W) float32, voxels     MONAI Warp convention, channel order D, H, W
        affine        (4, 4) float64, mm               voxel → world of both volumes (1 mm voxels)
        subject       str                              "phantom-<split>-<i>"

    Args:
        n_pairs: number of pairs.
        size: voxels per axis of the cubic grid (64 as in the NestedMorph paper).
        seed: base seed.
        max_displacement_vox: largest ground-truth displacement, voxels.
        split: ``None``, ``"train"``, ``"val"`` or ``"test"`` (selects an independent stream of pairs).
        cache: keep generated items in memory (a 64³ pair is about 6 MB; generation takes about a second).
    """

    def __init__(self, n_pairs: int, size: int = 64, seed: int = 0, max_displacement_vox: float = 4.0,
                 split: str | None = None, cache: bool = False) -> None:
        if int(n_pairs) < 1:
            raise ConfigError(f"registration-phantoms: n_pairs must be at least 1, got {n_pairs}")
        if split not in _SPLIT_STREAM:
            raise ConfigError(f"registration-phantoms: split {split!r}; expected one of {list(_SPLIT_STREAM)}")
        if size < 24:
            raise ConfigError(f"registration-phantoms: size must be at least 24 voxels, got {size}")
        if not max_displacement_vox > 0:
            raise ConfigError(f"registration-phantoms: max_displacement_vox must be positive, got {max_displacement_vox}")
        self.n_pairs, self.size, self.seed = int(n_pairs), int(size), int(seed)
        self.max_displacement_vox, self.split = float(max_displacement_vox), split
        self._cache: dict[int, dict[str, Any]] | None = {} if cache else None

    def __len__(self) -> int:
        return self.n_pairs

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.n_pairs:
            raise IndexError(f"registration-phantoms: index {index} outside 0..{self.n_pairs - 1}")
        if self._cache is not None and index in self._cache:
            return dict(self._cache[index])
        ph = registration_phantom((self.seed, _SPLIT_STREAM[self.split], index), self.size, self.max_displacement_vox)
        item = {
            "moving": torch.from_numpy(ph["moving"])[None],
            "fixed": torch.from_numpy(ph["fixed"])[None],
            "moving_label": torch.from_numpy(ph["moving_label"])[None],
            "fixed_label": torch.from_numpy(ph["fixed_label"])[None],
            "ddf_true": torch.from_numpy(ph["ddf_true"]),
            "affine": torch.from_numpy(ph["affine"]),
            "subject": f"phantom-{self.split or 'all'}-{index:04d}",
        }
        if self._cache is not None:
            self._cache[index] = item
        return dict(item)
