"""NIfTI volume reader/writer and the ``nifti-folder`` dataset, keeping each volume's geometry.

A volume sample is (see ``datasets/README.md``)::

    image   (C, D, H, W) float32     voxel axes in the file's (i, j, k) order, channels first
    affine  (4, 4) float64           voxel index (i, j, k, 1) → world (x, y, z, 1) in millimetres (RAS+)
    spacing (3,) float64, mm         voxel size along i, j, k (column norms of affine[:3, :3])
    label   (1, D, H, W) int64       optional segmentation, same grid as the image

Transforms in :mod:`threefold.datasets.transforms` update ``affine`` whenever they move the grid, so
a prediction on a cropped or padded volume can be written back with :func:`write_nifti` in the
original geometry. Nibabel (extra ``medical``) is imported only inside the functions that need it.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from threefold.datasets.errors import DataFormatError, MissingFileError, require
from threefold.datasets.registry import register_dataset
from threefold.datasets.splits import item_generator

NIFTI_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz")
_CHUNK = 1 << 22  # decompression step (bytes) for the size check of .nii.gz


def _nifti_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.name.lower().endswith(NIFTI_SUFFIXES):
        raise DataFormatError(f"{p}: not a NIfTI file name; expected one ending in {' or '.join(NIFTI_SUFFIXES)}")
    if not p.is_file():
        raise MissingFileError(f"{p}: NIfTI file not found" + (" (it is a folder)" if p.is_dir() else ""))
    return p


def _nibabel_errors(nib: Any) -> tuple[type[BaseException], ...]:
    return (nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError, ValueError, TypeError,
            OSError, EOFError, zlib.error, IndexError, KeyError, OverflowError)


def _gunzip_bounded(p: Path, limit: int) -> bytes:
    """Decompress at most ``limit`` bytes of a gzip file, chunk by chunk, so a forged header cannot allocate more."""
    out, total = [], 0
    with gzip.open(p, "rb") as f:
        while total < limit:
            chunk = f.read(min(_CHUNK, limit - total))
            if not chunk:
                break
            out.append(chunk)
            total += len(chunk)
    return b"".join(out)


def _load_checked(p: Path, max_bytes: int) -> Any:
    """Load a NIfTI image whose header has been checked against the data actually present."""
    nib = require("nibabel", extra="medical")
    errors = _nibabel_errors(nib)
    try:
        img = nib.load(p, mmap=False)
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise DataFormatError(f"{p}: nibabel read it as {type(img).__name__}, expected a NIfTI-1/2 image")
        shape = tuple(int(s) for s in img.header.get_data_shape())
        dtype = np.dtype(img.header.get_data_dtype())
        offset = int(img.dataobj.offset)
    except DataFormatError:
        raise
    except errors as exc:
        raise DataFormatError(f"{p}: not a readable NIfTI header ({type(exc).__name__}: {exc})") from exc
    if len(shape) not in (3, 4):
        raise DataFormatError(
            f"{p}: NIfTI has {len(shape)} dimensions {shape}; expected 3 (i, j, k) or 4 (i, j, k, channel)"
        )
    if min(shape) < 1:
        raise DataFormatError(f"{p}: NIfTI shape {shape} has an empty axis")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > max_bytes:
        raise DataFormatError(f"{p}: header declares {shape} {dtype} = {nbytes} bytes, over max_bytes={max_bytes}")
    need = offset + nbytes
    try:
        if p.name.lower().endswith(".gz"):
            raw = _gunzip_bounded(p, need)
            have = len(raw)
        else:
            raw, have = None, p.stat().st_size
        if have < need:
            raise DataFormatError(
                f"{p}: header declares {shape} {dtype} = {nbytes} data bytes after offset {offset}, "
                f"but only {have - offset} are present (truncated)"
            )
        if raw is not None:
            img = type(img).from_bytes(raw)
        return img
    except DataFormatError:
        raise
    except errors as exc:
        raise DataFormatError(f"{p}: corrupt NIfTI data ({type(exc).__name__}: {exc})") from exc


def spacing_from_affine(affine: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Voxel size (3,) float64 in mm along i, j, k: the column norms of ``affine[:3, :3]``."""
    a = torch.as_tensor(affine, dtype=torch.float64)
    return torch.linalg.vector_norm(a[:3, :3], dim=0)


def read_nifti(path: str | os.PathLike, canonical: bool = False, dtype: torch.dtype = torch.float32,
               max_bytes: int = 8 << 30) -> dict[str, torch.Tensor]:
    """Read a NIfTI-1/2 volume (``.nii`` or ``.nii.gz``) as ``image`` (C, D, H, W), ``affine``, ``spacing``.

    Format: NIfTI-1 (Cox et al., "A (sort of) new image data format standard: NIfTI-1", 2004) and NIfTI-2;
    ``affine`` is the sform when set, else the qform, as nibabel resolves them.

    The data scaling (``scl_slope``/``scl_inter``) is applied. A 3-D file gives C = 1; a 4-D file's last
    axis becomes the channel axis. ``canonical=True`` reorients to the closest RAS+ axis order
    (``nibabel.as_closest_canonical``), flipping/permuting axes and updating ``affine`` to match.
    An integer ``dtype`` (for label maps) requires integral voxel values. Wrong dimensionality,
    truncated data, non-finite voxels or affine, and headers declaring more than ``max_bytes`` raise
    :class:`DataFormatError` naming the file.
    """
    p = _nifti_path(path)
    nib = require("nibabel", extra="medical")
    img = _load_checked(p, max_bytes)
    try:
        if canonical:
            img = nib.as_closest_canonical(img)
        data = np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
    except _nibabel_errors(nib) as exc:
        raise DataFormatError(f"{p}: corrupt NIfTI data ({type(exc).__name__}: {exc})") from exc
    if data.dtype.kind not in "biuf":
        raise DataFormatError(f"{p}: voxel dtype {data.dtype} is not supported (expected integer or float)")
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataFormatError(f"{p}: affine is non-finite or singular:\n{affine}")
    if data.dtype.kind == "f":
        bad = ~np.isfinite(data)
        if bad.any():
            raise DataFormatError(f"{p}: {int(bad.sum())} voxels are NaN/inf (first at index {tuple(int(i) for i in np.unravel_index(np.argmax(bad), data.shape))})")
    image = data[None] if data.ndim == 3 else np.moveaxis(data, -1, 0)
    if not dtype.is_floating_point:
        if data.dtype.kind == "f" and np.any(data != np.round(data)):
            raise DataFormatError(f"{p}: voxel values are not integers, cannot read as {dtype}")
        image = image.astype(np.int64)
    out = torch.from_numpy(np.ascontiguousarray(image)).to(dtype)
    if dtype.is_floating_point and not torch.isfinite(out).all():
        raise DataFormatError(f"{p}: voxel values overflow {dtype}")
    aff = torch.from_numpy(affine)
    return {"image": out, "affine": aff, "spacing": spacing_from_affine(aff)}


def write_nifti(path: str | os.PathLike, image: torch.Tensor | np.ndarray, affine: torch.Tensor | np.ndarray) -> Path:
    """Write (D, H, W) or (C, D, H, W) voxels with ``affine`` (4, 4) as NIfTI-1 (``.nii`` or ``.nii.gz``).

    Channels go back to the last axis, the inverse of :func:`read_nifti`; qform and sform are both set
    to the affine with code 1 (scanner). int64 data are stored as int32 (NIfTI tools rarely read int64)
    after checking the range; bool as uint8.
    """
    p = Path(path)
    if not p.name.lower().endswith(NIFTI_SUFFIXES):
        raise DataFormatError(f"{p}: output name must end in {' or '.join(NIFTI_SUFFIXES)}")
    nib = require("nibabel", extra="medical")
    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    aff = affine.detach().cpu().numpy() if isinstance(affine, torch.Tensor) else np.asarray(affine)
    if arr.ndim not in (3, 4):
        raise DataFormatError(f"{p}: image has shape {arr.shape}, expected (D, H, W) or (C, D, H, W)")
    if aff.shape != (4, 4) or not np.isfinite(aff).all():
        raise DataFormatError(f"{p}: affine must be a finite (4, 4) matrix, got shape {aff.shape}")
    if arr.ndim == 4:
        arr = arr[0] if arr.shape[0] == 1 else np.moveaxis(arr, 0, -1)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    elif arr.dtype == np.int64:
        info = np.iinfo(np.int32)
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise DataFormatError(f"{p}: int64 values outside the int32 range cannot be written")
        arr = arr.astype(np.int32)
    img = nib.Nifti1Image(arr, aff.astype(np.float64))
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    p.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, p)
    return p


def _stem(p: Path) -> str:
    name = p.name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else name[: -len(".nii")]


@register_dataset("nifti-folder", "NIfTI volumes under <root>/<split>/images, optional segmentations under "
                  "<root>/<split>/labels (same file names)", modality="volume")
class NiftiFolder(Dataset):
    """Generic NIfTI folder: ``<root>/<split>/images/<case>.nii[.gz]`` and, optionally,
    ``<root>/<split>/labels/<case>.nii[.gz]`` on the same voxel grid.

    Items are ``{"image" (C, D, H, W) float32, "affine", "spacing"[, "label" (1, D, H, W) int64], "name"}``.
    A label whose shape or affine differs from its image (beyond ``affine_atol`` mm) raises.
    ``transform(sample, generator)`` gets a ``torch.Generator`` seeded from ``(seed, epoch, index)``.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", canonical: bool = False,
                 require_labels: bool = False,
                 transform: Callable[[dict[str, Any], torch.Generator], dict[str, Any]] | None = None,
                 seed: int = 0, affine_atol: float = 1e-3) -> None:
        self.root, self.split = Path(root), split
        folder = self.root / split / "images"
        if not folder.is_dir():
            raise MissingFileError(f"{folder}: no images folder for split {split!r} (expected <root>/<split>/images)")
        self.files = sorted(f for f in folder.iterdir() if f.name.lower().endswith(NIFTI_SUFFIXES))
        if not self.files:
            raise MissingFileError(f"{folder}: no NIfTI files (.nii, .nii.gz)")
        self.label_dir = self.root / split / "labels"
        if require_labels and not self.label_dir.is_dir():
            raise MissingFileError(f"{self.label_dir}: labels required but the folder is absent")
        self.canonical, self.transform, self.seed, self.epoch = canonical, transform, seed, 0
        self.affine_atol = affine_atol

    def __len__(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.files[index]
        name = _stem(path)
        sample: dict[str, Any] = read_nifti(path, canonical=self.canonical)
        if self.label_dir.is_dir():
            candidates = [self.label_dir / f"{name}{s}" for s in NIFTI_SUFFIXES]
            found = [c for c in candidates if c.is_file()]
            if not found:
                raise MissingFileError(f"{self.label_dir}: no label for case {name!r} (expected {name}.nii or .nii.gz)")
            lab = read_nifti(found[0], canonical=self.canonical, dtype=torch.int64)
            if lab["image"].shape[0] != 1 or lab["image"].shape[1:] != sample["image"].shape[1:]:
                raise DataFormatError(
                    f"{found[0]}: label shape {tuple(lab['image'].shape)} does not match image "
                    f"{tuple(sample['image'].shape)} (expected (1, D, H, W) on the same grid)"
                )
            if not torch.allclose(lab["affine"], sample["affine"], atol=self.affine_atol, rtol=0):
                raise DataFormatError(f"{found[0]}: label affine differs from the image's {path.name} by more than {self.affine_atol} mm")
            sample["label"] = lab["image"]
        sample["name"] = name
        if self.transform is not None:
            sample = self.transform(sample, item_generator(self.seed, self.epoch, index))
        return sample
