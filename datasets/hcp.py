"""HCP-style T1w → dMRI registration pairs: the T1w volume is the moving image, the mean of the b≈0
volumes of the diffusion series the fixed image (NestedMorph, Marthi et al., WACV 2025, issue 6).

Default layout (the Human Connectome Project minimal preprocessing, HCP Young Adult and Lifespan
releases; ``{subject}`` is one folder level, the other parts may hold glob wildcards)::

    <root>/{subject}/T1w/T1w_acpc_dc_restore_brain.nii.gz        moving (skull-stripped T1w)
    <root>/{subject}/T1w/Diffusion/data.nii.gz                   4-D DWI (i, j, k, volume)
    <root>/{subject}/T1w/Diffusion/bvals                         FSL b-values, s/mm², one per volume
    <root>/{subject}/T1w/Diffusion/bvecs                         FSL gradient directions (3 × N), checked
    <root>/{subject}/T1w/Diffusion/nodif_brain_mask.nii.gz       fixed brain mask (optional)

Any entry of ``layout`` overrides the default; ``moving_mask``, ``moving_label`` (e.g.
``{subject}/T1w/aparc+aseg.nii.gz``) and ``fixed_label`` may be added; a ``fixed`` entry naming a
3-D b0 volume replaces ``dwi``/``bvals``. Optional entries that match no file are skipped; required
ones (``moving``, and ``fixed`` or ``dwi`` + ``bvals``) raise :class:`MissingFileError` naming the
pattern. A pattern matching several files raises.

Instead of a layout, ``pairs_file`` lists pairs, one per line (UTF-8; ``#`` starts a comment; paths
relative to ``root``, never absolute or through ``..``: the file may come with a download)::

    <subject>                           resolved with the layout
    <moving.nii.gz> <fixed.nii.gz>      a 3-D fixed image
    <moving.nii.gz> <dwi.nii.gz> <bvals>  a 4-D DWI and its b-values

The fixed image is the mean of the volumes whose b-value is at most ``b0_threshold`` (50 s/mm² by
default: HCP's b0 volumes have b ≈ 5), found from ``bvals``, never assumed to be volume 0; only those
volumes are read from the 4-D file. Subjects are sorted by name and split with
:func:`threefold.datasets.splits.split_indices` (``split_fractions``, ``seed``).

Items are the training pairs of :mod:`threefold.datasets.registration_transforms` (the keys of
:class:`threefold.datasets.registration_phantoms.RegistrationPhantoms` minus ``ddf_true``, labels only
when the layout names them, plus the fixed image's original geometry). The default chain has no
affine step: HCP's ``T1w/Diffusion`` data are already resampled into the T1w (ACPC) space. For other
data pass ``prealign=threefold.medical.registration.affine.AffinePrealign()``. ``cache_dir`` stores
preprocessed pairs (a :class:`threefold.datasets.cache.FeatureCache` keyed by the input files and the
settings), as reading a 4-D HCP series takes tens of seconds.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from threefold.datasets.errors import ConfigError, DataFormatError, MissingFileError, require
from threefold.datasets.registration_transforms import PairTransform, default_pair_transform
from threefold.datasets.registry import register_dataset
from threefold.datasets.splits import split_indices
from threefold.datasets.volumes import NIFTI_SUFFIXES, read_nifti, spacing_from_affine

HCP_LAYOUT: dict[str, str | None] = {
    "moving": "{subject}/T1w/T1w_acpc_dc_restore_brain.nii.gz",
    "dwi": "{subject}/T1w/Diffusion/data.nii.gz",
    "bvals": "{subject}/T1w/Diffusion/bvals",
    "bvecs": "{subject}/T1w/Diffusion/bvecs",
    "fixed_mask": "{subject}/T1w/Diffusion/nodif_brain_mask.nii.gz",
    "fixed": None,
    "moving_mask": None,
    "moving_label": None,
    "fixed_label": None,
}
_OPTIONAL = ("bvecs", "fixed_mask", "moving_mask", "moving_label", "fixed_label")
SPLITS = ("train", "val", "test")


def read_bvals(path: str | os.PathLike) -> np.ndarray:
    """FSL ``bvals``: whitespace-separated b-values in s/mm² (one row, or one per line) → (N,) float64."""
    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"{p}: bvals file not found")
    try:
        values = np.array([float(t) for t in p.read_text().split()], dtype=np.float64)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataFormatError(f"{p}: bvals must be whitespace-separated numbers ({exc})") from exc
    if values.size == 0:
        raise DataFormatError(f"{p}: bvals file is empty")
    if not np.isfinite(values).all() or (values < 0).any():
        raise DataFormatError(f"{p}: bvals must be finite and non-negative")
    return values


def read_bvecs(path: str | os.PathLike, n: int) -> np.ndarray:
    """FSL ``bvecs`` (3 rows × N, or N rows × 3) → (N, 3) float64; the count must be ``n``."""
    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"{p}: bvecs file not found")
    try:
        rows = [[float(t) for t in line.split()] for line in p.read_text().splitlines() if line.strip()]
        arr = np.array(rows, dtype=np.float64)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataFormatError(f"{p}: bvecs must be rows of numbers ({exc})") from exc
    if not np.isfinite(arr).all():
        raise DataFormatError(f"{p}: bvecs hold NaN/inf values")
    if arr.shape == (3, n):
        return arr.T
    if arr.shape == (n, 3):
        return arr
    raise DataFormatError(f"{p}: bvecs has shape {arr.shape}; expected (3, {n}) or ({n}, 3) for {n} volumes")


def read_mean_b0(dwi_path: str | os.PathLike, bvals_path: str | os.PathLike, b0_threshold: float = 50.0,
                 bvecs_path: str | os.PathLike | None = None, canonical: bool = True,
                 max_volume_bytes: int = 1 << 30) -> dict[str, Any]:
    """Mean of the b≈0 volumes of a 4-D DWI series.

    Only the volumes with ``bval <= b0_threshold`` (s/mm²) are read, one after the other, so a 4 GB
    HCP series is never held in memory. A header declaring 3-D volumes over ``max_volume_bytes``
    (float64, the accumulator's size; an HCP volume is about 30 MB) or, for ``.nii``, more data than
    the file holds, a non-finite or singular affine, or non-real voxels raise :class:`DataFormatError`
    before any volume is read.

    Returns:
        ``image`` (1, D, H, W) float32, ``affine`` (4, 4) float64 mm (closest RAS+ when
        ``canonical``), ``spacing`` (3,) float64 mm, ``b0_indices`` (K,) int64 volumes averaged.
    """
    p = Path(dwi_path)
    if not p.name.lower().endswith(NIFTI_SUFFIXES):
        raise DataFormatError(f"{p}: not a NIfTI file name; expected one ending in .nii or .nii.gz")
    if not p.is_file():
        raise MissingFileError(f"{p}: DWI file not found")
    nib = require("nibabel", extra="medical")
    bvals = read_bvals(bvals_path)
    try:
        img = nib.load(p, keep_file_open=True)
        shape = tuple(int(s) for s in img.shape)
        dtype = np.dtype(img.get_data_dtype())
        offset = int(img.dataobj.offset)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:  # nibabel raises many types for a damaged header
        raise DataFormatError(f"{p}: not a readable NIfTI header ({type(exc).__name__}: {exc})") from exc
    if len(shape) != 4 or min(shape) < 1:
        raise DataFormatError(f"{p}: DWI has shape {shape}; expected 4-D (i, j, k, volume)")
    if dtype.kind not in "biuf":
        raise DataFormatError(f"{p}: voxel dtype {dtype} is not supported (expected integer or float)")
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataFormatError(f"{p}: affine is non-finite or singular:\n{affine}")
    voxels = int(np.prod(shape[:3], dtype=object))
    if voxels * 8 > max_volume_bytes:
        raise DataFormatError(f"{p}: header declares {shape[:3]} volumes = {voxels * 8} bytes as float64, "
                              f"over max_volume_bytes={max_volume_bytes}")
    need = offset + voxels * int(np.prod(shape[3:], dtype=object)) * dtype.itemsize
    if not p.name.lower().endswith(".gz") and p.stat().st_size < need:  # .nii.gz: a short read raises below
        raise DataFormatError(f"{p}: header declares {shape} {dtype} = {need - offset} data bytes after offset "
                              f"{offset}, but the file has {p.stat().st_size} bytes (truncated)")
    if shape[3] != bvals.size:
        raise DataFormatError(f"{p}: {shape[3]} volumes but {bvals_path} lists {bvals.size} b-values")
    if bvecs_path is not None:
        read_bvecs(bvecs_path, shape[3])
    idx = np.flatnonzero(bvals <= b0_threshold)
    if idx.size == 0:
        raise DataFormatError(f"{bvals_path}: no b-value <= {b0_threshold} s/mm² (smallest {bvals.min():g}); "
                              "no b0 volume to register to (raise b0_threshold?)")
    total = np.zeros(shape[:3], dtype=np.float64)
    try:
        for i in idx:  # increasing order: a .nii.gz is decompressed forward once
            total += np.asarray(img.dataobj[..., int(i)], dtype=np.float64)
    except Exception as exc:
        raise DataFormatError(f"{p}: cannot read volume data ({type(exc).__name__}: {exc})") from exc
    finally:
        img.uncache()
    mean = total / idx.size
    if not np.isfinite(mean).all():
        raise DataFormatError(f"{p}: b0 volumes hold NaN/inf voxels")
    if canonical:
        out = nib.as_closest_canonical(nib.Nifti1Image(mean.astype(np.float32), affine))
        mean, affine = np.asarray(out.dataobj), np.asarray(out.affine, dtype=np.float64)
    aff = torch.from_numpy(affine)
    return {"image": torch.from_numpy(np.ascontiguousarray(mean, dtype=np.float32))[None], "affine": aff,
            "spacing": spacing_from_affine(aff), "b0_indices": torch.from_numpy(idx.astype(np.int64))}


def _resolve(root: Path, pattern: str, subject: str) -> list[Path]:
    return sorted(Path(p) for p in glob.glob(str(root / pattern.replace("{subject}", glob.escape(subject)))))


def _discover_subjects(root: Path, moving_pattern: str) -> list[str]:
    parts = Path(moving_pattern).parts
    if parts.count("{subject}") != 1:
        raise ConfigError(f"layout 'moving' {moving_pattern!r}: needs exactly one path component '{{subject}}'")
    pos = parts.index("{subject}")
    found = glob.glob(str(root / moving_pattern.replace("{subject}", "*")))
    return sorted({Path(f).relative_to(root).parts[pos] for f in found})


def _check_grid(vol: dict[str, Any], ref: dict[str, Any], path: Path, ref_name: str) -> None:
    if tuple(vol["image"].shape[1:]) != tuple(ref["image"].shape[1:]):
        raise DataFormatError(f"{path}: shape {tuple(vol['image'].shape[1:])} differs from the {ref_name} image's "
                              f"{tuple(ref['image'].shape[1:])} (expected the same voxel grid)")
    if not torch.allclose(vol["affine"], ref["affine"], atol=1e-3, rtol=0):
        raise DataFormatError(f"{path}: affine differs from the {ref_name} image's (expected the same voxel grid)")


@register_dataset("hcp", "HCP-style T1w -> mean-b0 registration pairs (<subject>/T1w/..., DWI + bvals; "
                  "configurable layout or pairs file)", modality="volume")
class HCPRegistration(Dataset):
    """T1w → mean-b0 pairs from HCP-style subject folders or a pairs file (see the module docstring).

    Args:
        root: dataset root.
        size: training grid, voxels per axis (multiple of 32; 64 as in the paper).
        split: ``"train"``, ``"val"``, ``"test"`` or ``None`` (all pairs).
        layout: entries overriding :data:`HCP_LAYOUT`.
        pairs_file: a file listing pairs (path absolute or relative to ``root``); replaces discovery.
        prealign: optional affine step of the pair-transform protocol (e.g. ``AffinePrealign()``).
        transform: full preprocessing chain; default
            :func:`~threefold.datasets.registration_transforms.default_pair_transform`.
        b0_threshold: largest b-value (s/mm²) counted as b0.
        split_fractions, seed: the seeded subject split.
        margin_mm: grid margin around the fixed brain mask (``None``: whole field of view).
        cache_dir: folder of a preprocessed-pair cache (``None``: no cache).
    """

    def __init__(self, root: str | os.PathLike, size: int | tuple[int, int, int] = 64, split: str | None = "train",
                 layout: dict[str, str | None] | None = None, pairs_file: str | os.PathLike | None = None,
                 prealign: PairTransform | None = None, transform: PairTransform | None = None,
                 b0_threshold: float = 50.0, split_fractions: Sequence[float] = (0.7, 0.1, 0.2), seed: int = 0,
                 margin_mm: float | None = 5.0, cache_dir: str | os.PathLike | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise MissingFileError(f"{self.root}: HCP root folder not found")
        if split is not None and split not in SPLITS:
            raise ConfigError(f"hcp: split {split!r}; expected one of {SPLITS} or None")
        unknown = set(layout or {}) - set(HCP_LAYOUT)
        if unknown:
            raise ConfigError(f"hcp: unknown layout keys {sorted(unknown)}; known: {sorted(HCP_LAYOUT)}")
        self.layout = {**HCP_LAYOUT, **(layout or {})}
        self.b0_threshold = float(b0_threshold)
        self.transform = transform if transform is not None else default_pair_transform(size, prealign, margin_mm)
        self.cache_dir = cache_dir
        pairs = self._pairs_from_file(pairs_file) if pairs_file is not None else self._pairs_from_layout()
        if not pairs:
            where = pairs_file if pairs_file is not None else f"{self.root} with pattern {self.layout['moving']!r}"
            raise MissingFileError(f"hcp: no registration pairs found in {where}")
        if split is not None:
            part = split_indices(len(pairs), split_fractions, seed)[SPLITS.index(split)]
            pairs = [pairs[i] for i in sorted(part.tolist())]
        self.pairs = pairs

    # -- discovery -----------------------------------------------------------------------------
    def _subject_files(self, subject: str) -> dict[str, Any]:
        files: dict[str, Any] = {"subject": subject}
        required = ["moving"] + (["fixed"] if self.layout["fixed"] else ["dwi", "bvals"])
        for key, pattern in self.layout.items():
            if pattern is None or (key in ("dwi", "bvals", "bvecs") and self.layout["fixed"]):
                continue
            matches = _resolve(self.root, pattern, subject)
            if len(matches) > 1:
                raise DataFormatError(f"hcp: layout {key!r} pattern {pattern!r} matches {len(matches)} files for "
                                      f"subject {subject!r}: {[str(m) for m in matches[:4]]}")
            if not matches:
                if key in required:
                    raise MissingFileError(f"hcp: subject {subject!r} has no {key} file "
                                           f"({self.root / pattern.replace('{subject}', subject)})")
                continue
            files[key] = matches[0]
        return files

    def _pairs_from_layout(self) -> list[dict[str, Any]]:
        return [self._subject_files(s) for s in _discover_subjects(self.root, str(self.layout["moving"]))]

    def _pairs_from_file(self, pairs_file: str | os.PathLike) -> list[dict[str, Any]]:
        p = Path(pairs_file)
        p = p if p.is_absolute() else self.root / p
        if not p.is_file():
            raise MissingFileError(f"{p}: pairs file not found")
        try:
            text = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataFormatError(f"{p}: pairs file is not UTF-8 text ({exc})") from exc
        pairs = []
        for n, line in enumerate(text.splitlines(), 1):
            tokens = line.split("#", 1)[0].split()
            if not tokens:
                continue
            for t in tokens:  # a listed path stays under the root, like an MSD dataset.json entry
                if any(f.is_absolute() or f.anchor or ".." in f.parts for f in (PurePosixPath(t), PureWindowsPath(t))):
                    raise DataFormatError(f"{p}:{n}: {t!r} leaves the root {self.root}; expected a path relative to it "
                                          "without '..'")
            if len(tokens) == 1:
                if len(PurePosixPath(tokens[0]).parts) != 1 or "\\" in tokens[0]:
                    raise DataFormatError(f"{p}:{n}: subject {tokens[0]!r} must be one folder name")
                pairs.append(self._subject_files(tokens[0]))
                continue
            if len(tokens) not in (2, 3):
                raise DataFormatError(f"{p}:{n}: expected '<subject>', '<moving> <fixed>' or '<moving> <dwi> <bvals>', "
                                      f"got {len(tokens)} fields")
            paths = [self.root / t for t in tokens]
            for q in paths:
                if not q.is_file():
                    raise MissingFileError(f"{p}:{n}: {q} not found")
            name = re.sub(r"\.nii(\.gz)?$", "", paths[0].name)
            entry: dict[str, Any] = {"subject": f"{n:04d}-{name}", "moving": paths[0]}
            if len(tokens) == 2:
                entry["fixed"] = paths[1]
            else:
                entry["dwi"], entry["bvals"] = paths[1], paths[2]
            pairs.append(entry)
        return pairs

    # -- reading -------------------------------------------------------------------------------
    def read_pair(self, index: int) -> dict[str, Any]:
        """The raw pair ``index`` (each volume in its own geometry, closest RAS+), before the chain."""
        files = self.pairs[index]
        moving = read_nifti(files["moving"], canonical=True)
        if moving["image"].shape[0] != 1:
            raise DataFormatError(f"{files['moving']}: moving image has {moving['image'].shape[0]} volumes; expected a 3-D T1w")
        if "fixed" in files:
            fixed = read_nifti(files["fixed"], canonical=True)
            if fixed["image"].shape[0] != 1:
                raise DataFormatError(f"{files['fixed']}: fixed image is 4-D; name the DWI as 'dwi' with its 'bvals'")
        else:
            fixed = read_mean_b0(files["dwi"], files["bvals"], self.b0_threshold, files.get("bvecs"))
        pair: dict[str, Any] = {"moving": moving["image"], "moving_affine": moving["affine"],
                                "fixed": fixed["image"], "fixed_affine": fixed["affine"], "subject": files["subject"]}
        for key in ("moving_mask", "fixed_mask", "moving_label", "fixed_label"):
            if key in files:
                vol = read_nifti(files[key], canonical=True, dtype=torch.int64)
                side = moving if key.startswith("moving") else fixed
                _check_grid(vol, side, files[key], key.split("_")[0])
                pair[key] = vol["image"] != 0 if key.endswith("mask") else vol["image"]
        return pair

    def __len__(self) -> int:
        return len(self.pairs)

    def _build(self, index: int) -> dict[str, Any]:
        return self.transform(self.read_pair(index))

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.cache_dir is None:
            return self._build(index)
        from threefold.datasets.cache import FeatureCache

        files = self.pairs[index]
        inputs = [files[k] for k in sorted(files) if k != "subject"]
        cache = FeatureCache(self.cache_dir, "hcp-pairs", {"transform": repr(self.transform),
                                                           "b0_threshold": self.b0_threshold})
        subject = files["subject"]

        def build() -> dict[str, np.ndarray]:
            item = self._build(index)
            return {k: v.numpy() for k, v in item.items() if isinstance(v, torch.Tensor)}

        arrays = cache.get_or_build(inputs, build)
        item: dict[str, Any] = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
        item["subject"] = subject
        return item
