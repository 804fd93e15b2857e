"""Deterministic synthetic brain phantoms with nested glioma-like lesions.

SYNTHETIC DATA, not MRI: ellipsoidal brains with CSF, grey matter, white matter and ventricles,
imaged in four synthetic "modalities" named after the BraTS sequences (T1, T1ce, T2, FLAIR) whose
tissue contrasts follow the usual ordering of those sequences (CSF dark in T1 / FLAIR and bright in
T2, white matter brighter than grey matter in T1, enhancing tumour bright in T1ce, oedema bright in
T2 / FLAIR). Each case has one lesion of random size, position and irregular shape made of nested
regions: oedema ⊃ tumour core ⊃ enhancing rim, the core holding a necrotic centre.

The lesion classes are built so that no single modality separates them from healthy tissue:
necrosis has CSF-like T1 / T1ce / T2 values and GM-like FLAIR; oedema has GM-like T1 / T1ce values;
the enhancing rim matches enhancing vessels in T1ce and GM in the other sequences; periventricular
FLAIR / T2 hyperintensities mimic oedema. On top come a smooth multiplicative bias field, a smooth
texture and white noise, so a voxel-wise threshold is poor while a network using the four
modalities and the spatial context can segment the regions (see ``tests/datasets/test_brats.py``).

:func:`brain_phantom` returns arrays; its healthy part, :func:`brain_anatomy`, is shared with the
registration phantoms of :mod:`threefold.datasets.registration_phantoms`. The writer
:func:`write_brats2018_phantoms` stores them in the BraTS 2018 layout so that the real reader runs
on them. Arrays are in NIfTI index order (i, j, k) with 1 mm isotropic voxels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from threefold.datasets.errors import ConfigError

#: Channel order of ``image``; the same canonical order as :data:`threefold.datasets.brats.MODALITIES`.
MODALITIES: tuple[str, str, str, str] = ("t1", "t1ce", "t2", "flair")

#: Healthy tissue codes of ``tissue``.
TISSUES: dict[str, int] = {"background": 0, "csf": 1, "grey_matter": 2, "white_matter": 3}

# Mean intensity of each tissue class in (t1, t1ce, t2, flair), arbitrary units in [0, 1].
_CONTRAST: dict[str, tuple[float, float, float, float]] = {
    "csf": (0.25, 0.25, 1.00, 0.20),
    "grey_matter": (0.55, 0.58, 0.70, 0.60),
    "white_matter": (0.80, 0.80, 0.45, 0.45),
    "vessel": (0.55, 0.95, 0.70, 0.60),  # enhancing vessels: a T1ce mimic of the enhancing rim
    "periventricular": (0.70, 0.70, 0.80, 0.76),  # FLAIR / T2 hyperintense caps: an oedema mimic
    "edema": (0.55, 0.57, 0.85, 0.80),
    "necrosis": (0.28, 0.32, 0.96, 0.56),
    "enhancing": (0.60, 0.96, 0.66, 0.70),
}

def phantom_affine(shape: tuple[int, int, int]) -> np.ndarray:
    """(4, 4) float64 voxel-to-world affine of a phantom of ``shape``, mm: 1 mm isotropic, oriented
    like the BraTS 2018 files (i and j axes flipped, k up)."""
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine[1, 3] = shape[1] - 1.0
    return affine


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random field (white noise low-passed by a Gaussian of ``sigma`` voxels)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-12)


def _segment_distance(points: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance of ``points`` (..., 3) to the segment ``a``-``b``, voxels."""
    ab = b - a
    t = np.clip(((points - a) @ ab) / (ab @ ab), 0.0, 1.0)
    return np.linalg.norm(points - (a + t[..., None] * ab), axis=-1)


def brain_anatomy(rng: np.random.Generator, shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """Healthy brain-like anatomy drawn from ``rng``: an irregular ellipsoidal brain, a cortex of
    varying thickness under a thin CSF layer, white matter and two lateral ventricles.

    Returns arrays in index order (i, j, k), 1 mm voxels: ``grid`` (*shape, 3) float64 voxel
    coordinates, ``centre`` (3,) and ``radii`` (3,) of the brain ellipsoid (voxels), ``brain`` (*shape)
    bool, ``depth`` (*shape) float64 voxels from the brain surface, ``ventricles`` (*shape) bool and
    ``tissue`` (*shape) uint8 codes of :data:`TISSUES` (ventricles coded CSF).
    """
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1)
    centre = (np.asarray(shape) - 1) / 2.0 + rng.uniform(-1.5, 1.5, 3)
    radii = np.asarray(shape) * rng.uniform(0.38, 0.44, 3)
    # irregular brain outline: ellipsoid radius modulated by a smooth field
    rho = np.linalg.norm((grid - centre) / radii, axis=-1) * (1.0 + 0.04 * _smooth_field(rng, shape, 6.0))
    brain = rho < 1.0
    depth = ndimage.distance_transform_edt(brain)  # voxels from the brain surface

    tissue = np.zeros(shape, np.uint8)
    tissue[brain] = TISSUES["white_matter"]
    cortex_depth = 3.0 + 1.0 * _smooth_field(rng, shape, 3.0)  # convoluted-looking cortex thickness
    tissue[brain & (depth <= cortex_depth)] = TISSUES["grey_matter"]
    tissue[brain & (depth <= 1.2)] = TISSUES["csf"]
    vent_offset = np.array([radii[0] * 0.22, 0.0, 0.0])
    vent_r = radii * np.array([0.12, 0.35, 0.18]) * rng.uniform(0.8, 1.2)
    ventricles = np.zeros(shape, bool)
    for side in (-1.0, 1.0):
        ventricles |= np.linalg.norm((grid - centre - side * vent_offset) / vent_r, axis=-1) < 1.0
    tissue[ventricles] = TISSUES["csf"]
    return {"grid": grid, "centre": centre, "radii": radii, "brain": brain, "depth": depth,
            "ventricles": ventricles, "tissue": tissue}


def brain_phantom(seed: int, shape: tuple[int, int, int] = (48, 48, 48), noise: float = 0.07) -> dict[str, np.ndarray]:
    """One synthetic brain with a nested lesion.

    Returns a dict of arrays, index order (i, j, k), 1 mm voxels:
    ``image`` (4, *shape) float32 in :data:`MODALITIES` order, 0 outside the brain (skull-stripped);
    ``label`` (*shape) uint8 ordinal nested encoding 0 background, 1 oedema, 2 core-not-enhancing
    (necrosis), 3 enhancing; ``tissue`` (*shape) uint8 healthy tissue codes of :data:`TISSUES`
    (what lies under the lesion included); ``affine`` (4, 4) float64; ``spacing`` (3,) float64 mm.
    The same ``seed`` always gives the same phantom.
    """
    if min(shape) < 24:
        raise ConfigError(f"phantom shape must be at least 24 voxels per axis, got {shape}")
    rng = np.random.default_rng(seed)
    anatomy = brain_anatomy(rng, shape)
    grid, centre, radii, brain, depth, ventricles, tissue = (
        anatomy[k] for k in ("grid", "centre", "radii", "brain", "depth", "ventricles", "tissue"))

    mean = np.zeros((4,) + shape)
    for name, code in (("csf", 1), ("grey_matter", 2), ("white_matter", 3)):
        mean[:, tissue == code] = np.asarray(_CONTRAST[name])[:, None]
    periventricular = (ndimage.distance_transform_edt(~ventricles) <= 2.5) & ~ventricles & brain
    periventricular &= _smooth_field(rng, shape, 2.0) > 0.3
    mean[:, periventricular] = np.asarray(_CONTRAST["periventricular"])[:, None]
    n_vessels = rng.integers(3, 6)
    vessels = np.zeros(shape, bool)
    for _ in range(n_vessels):
        a, b = (centre + rng.uniform(-0.8, 0.8, (2, 3)) * radii)
        vessels |= _segment_distance(grid, a, b) < rng.uniform(0.9, 1.6)
    vessels &= brain & (depth > 1.5)
    mean[:, vessels] = np.asarray(_CONTRAST["vessel"])[:, None]

    # nested lesion: oedema shell ⊃ core (enhancing rim around a necrotic centre)
    r_wt = rng.uniform(0.2, 0.3) * min(shape)
    lesion_centre = centre + rng.uniform(-1.0, 1.0, 3) * np.maximum(radii - r_wt - 2.0, 1.0) * 0.7
    r = np.linalg.norm((grid - lesion_centre) * rng.uniform(0.85, 1.15, 3), axis=-1)
    r = r * (1.0 + 0.12 * _smooth_field(rng, shape, 4.0))
    r_tc = r_wt * rng.uniform(0.55, 0.75)
    rim = rng.uniform(2.5, 4.0)
    label = np.zeros(shape, np.uint8)
    label[r < r_wt] = 1
    label[r < r_tc] = 3
    label[r < r_tc - rim] = 2
    label[~brain] = 0
    for name, code in (("edema", 1), ("necrosis", 2), ("enhancing", 3)):
        mean[:, label == code] = np.asarray(_CONTRAST[name])[:, None]

    # partial volume, smooth texture, bias field, white noise, per-case gain
    image = ndimage.gaussian_filter(mean, (0, 0.7, 0.7, 0.7))
    texture = np.stack([_smooth_field(rng, shape, 1.5) for _ in range(4)])
    bias = np.exp(0.12 * np.stack([_smooth_field(rng, shape, 12.0) for _ in range(4)]))
    gain = rng.uniform(0.85, 1.15, (4, 1, 1, 1))
    image = gain * bias * (image + 0.04 * texture) + noise * rng.standard_normal((4,) + shape)
    image = np.where(brain, np.clip(image, 0.01, None), 0.0).astype(np.float32)
    return {
        "image": image,
        "label": label,
        "tissue": tissue,
        "affine": phantom_affine(shape),
        "spacing": np.ones(3),
    }


def write_brats2018_phantoms(
    root: str | Path, n_cases: int, seed: int = 0, shape: tuple[int, int, int] = (48, 48, 48)
) -> list[Path]:
    """Write ``n_cases`` phantoms as ``root/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz``.

    Case ``i`` uses seed ``seed * 100003 + i``, is named ``Brats18_Phantom_{i:03d}``; the segmentation
    uses BraTS 2018 label values (0, 1 necrosis / non-enhancing, 2 oedema, 4 enhancing), images are
    float32. Returns the case folders.
    """
    from threefold.datasets.brats import write_case_brats2018

    root = Path(root)
    folders = []
    for i in range(n_cases):
        case = f"Brats18_Phantom_{i:03d}"
        ph = brain_phantom(seed * 100003 + i, shape)
        folders.append(write_case_brats2018(root / case, case, ph["image"], ph["label"], ph["affine"]))
    return folders
