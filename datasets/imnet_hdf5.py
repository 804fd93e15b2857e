"""The IM-NET / BSP-Net HDF5 shape format: reader, writer and a dataset over it.

Layout (Chen and Zhang, IM-NET, CVPR 2019, ``point_sampling/2_gather_256vox_16_32_64.py``; read by
BSP-Net's ``modelAE.py``), one file per split (e.g. ``all_vox256_img_train.hdf5``), N shapes:

====================  ======================  =====  =============================================
key                   shape                   dtype  meaning
====================  ======================  =====  =============================================
``voxels``            (N, 64, 64, 64, 1)      uint8  occupancy, 1 inside, indexed ``[x, y, z]``
``points_16``         (N, 4096, 3)            uint8  256-grid indices; ``(p + 0.5)/256 - 0.5``
``values_16``         (N, 4096, 1)            uint8  occupancy of each point
``points_32``         (N, 4096, 3)            uint8
``values_32``         (N, 4096, 1)            uint8
``points_64``         (N, 16384, 3)           uint8
``values_64``         (N, 16384, 1)           uint8
====================  ======================  =====  =============================================

Other keys (e.g. the ``pixels`` of the single-view files) are ignored. ``voxels`` may also be stored
without the trailing channel axis. Readers return NumPy arrays; coordinates in the unit cube
``[-0.5, 0.5]^3`` (no units).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from threefold.datasets.hdf5 import checked_dataset
from threefold.datasets.errors import DataFormatError, MissingFileError, require
from threefold.datasets.registry import register_dataset

RESOLUTIONS: tuple[int, ...] = (16, 32, 64)
POINT_COUNTS: dict[int, int] = {16: 4096, 32: 4096, 64: 16384}
VOXEL_SIZE = 64


def points_to_coords(points: np.ndarray) -> np.ndarray:
    """uint8 256-grid indices (..., 3) -> float32 unit-cube coordinates ``(p + 0.5)/256 - 0.5``."""
    return (points.astype(np.float32) + 0.5) / 256 - 0.5


def _check_binary(name: str, key: str, arr: np.ndarray) -> None:
    if arr.size and int(arr.max()) > 1:
        raise DataFormatError(f"{name}: {key} holds values up to {int(arr.max())}; expected occupancy in {{0, 1}}")


def _validate(name: str, data: dict[str, np.ndarray], resolutions: tuple[int, ...]) -> int:
    vox = data["voxels"]
    if vox.ndim == 4:
        vox = data["voxels"] = vox[..., None]
    if vox.ndim != 5 or vox.shape[1:] != (VOXEL_SIZE, VOXEL_SIZE, VOXEL_SIZE, 1):
        raise DataFormatError(f"{name}: voxels has shape {vox.shape}; expected (N, 64, 64, 64, 1) or (N, 64, 64, 64)")
    n = vox.shape[0]
    _check_binary(name, "voxels", vox)
    for res in resolutions:
        p, v = data[f"points_{res}"], data[f"values_{res}"]
        if p.dtype != np.uint8:
            raise DataFormatError(f"{name}: points_{res} has dtype {p.dtype}; expected uint8 indices of the 256 grid")
        if p.ndim != 3 or p.shape[0] != n or p.shape[2] != 3:
            raise DataFormatError(f"{name}: points_{res} has shape {p.shape}; expected ({n}, n_points, 3)")
        if v.shape != (n, p.shape[1], 1):
            raise DataFormatError(f"{name}: values_{res} has shape {v.shape}; expected ({n}, {p.shape[1]}, 1)")
        _check_binary(name, f"values_{res}", v)
    return n


def read_imnet_hdf5(path: str | Path, resolutions: tuple[int, ...] = RESOLUTIONS) -> dict[str, np.ndarray]:
    """Read an IM-NET HDF5 file fully into memory (raw uint8 arrays, validated).

    Returns ``voxels`` (N, 64, 64, 64, 1) and ``points_R`` (N, n_R, 3), ``values_R`` (N, n_R, 1) for
    each requested resolution ``R``. Raises :class:`MissingFileError` / :class:`DataFormatError`
    naming the file and key.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: IM-NET HDF5 file not found")
    h5py = require("h5py", extra="points")
    keys = ["voxels"] + [f"{kind}_{r}" for r in resolutions for kind in ("points", "values")]
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise DataFormatError(f"{path}: not a readable HDF5 file ({exc})") from exc
    with f:
        try:
            missing = [k for k in keys if k not in f]
            if missing:
                raise DataFormatError(f"{path}: missing key(s) {missing}; present: {sorted(f.keys())}")
            _check_declared(path, {k: f[k] for k in keys}, resolutions)
            data = {k: np.asarray(f[k][()]) for k in keys}
        except DataFormatError:
            raise
        except (OSError, KeyError, ValueError, RuntimeError, TypeError) as exc:  # h5py on a corrupt file
            raise DataFormatError(f"{path}: damaged HDF5 structure or data ({type(exc).__name__}: {exc})") from exc
    _validate(str(path), data, resolutions)
    return data


def _check_declared(path: Path, nodes: dict[str, Any], resolutions: tuple[int, ...]) -> None:
    """Check every dataset's kind, shape, dtype and stored size from the HDF5 metadata, before any
    data is read: a header may declare 10^6 shapes (262 GB of voxels) with no chunk written."""
    for key, node in nodes.items():
        checked_dataset(path, key, node)
        if node.dtype.kind not in "biu":
            raise DataFormatError(f"{path}: {key} has dtype {node.dtype}; expected integers (uint8)")
    vox = nodes["voxels"].shape
    if len(vox) not in (4, 5) or vox[1:4] != (VOXEL_SIZE,) * 3 or vox[4:] not in ((), (1,)):
        raise DataFormatError(f"{path}: voxels has shape {vox}; expected (N, 64, 64, 64, 1) or (N, 64, 64, 64)")
    n = vox[0]
    for res in resolutions:
        p, v = nodes[f"points_{res}"].shape, nodes[f"values_{res}"].shape
        if len(p) != 3 or p[0] != n or p[2] != 3:
            raise DataFormatError(f"{path}: points_{res} has shape {p}; expected ({n}, n_points, 3) to match voxels")
        if v != (n, p[1], 1):
            raise DataFormatError(f"{path}: values_{res} has shape {v}; expected ({n}, {p[1]}, 1)")


def write_imnet_hdf5(path: str | Path, data: dict[str, np.ndarray], names: list[str] | None = None) -> None:
    """Write ``voxels`` and all ``points_R``/``values_R`` (R = 16, 32, 64) as uint8, gzip-compressed.

    ``names`` (one per shape), when given, goes to a sibling ``<stem>.txt`` as in IM-NET.
    """
    h5py = require("h5py", extra="points")
    arrays = {k: np.asarray(v) for k, v in data.items()}
    n = _validate(str(path), arrays, RESOLUTIONS)
    for r in RESOLUTIONS:
        if arrays[f"points_{r}"].shape[1] != POINT_COUNTS[r]:
            raise DataFormatError(
                f"{path}: points_{r} has {arrays[f'points_{r}'].shape[1]} points per shape; the format has {POINT_COUNTS[r]}"
            )
    if names is not None and len(names) != n:
        raise DataFormatError(f"{path}: {len(names)} names for {n} shapes")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("voxels", data=arrays["voxels"].astype(np.uint8), compression="gzip")
        for r in RESOLUTIONS:
            for kind in ("points", "values"):
                f.create_dataset(f"{kind}_{r}", data=arrays[f"{kind}_{r}"].astype(np.uint8), compression="gzip")
    if names is not None:
        path.with_suffix(".txt").write_text("".join(f"{name}\n" for name in names))


@register_dataset("imnet-hdf5", "IM-NET / BSP-Net voxel + point-sample HDF5 shapes (e.g. ShapeNet 13 classes)", modality="mesh")
class IMNetShapes:
    """Shapes of one IM-NET HDF5 file, as dict samples.

    ``root`` is either the ``.hdf5`` file itself or a folder holding ``<name>_<split>.hdf5`` (exactly
    one match, e.g. ``all_vox256_img_train.hdf5``). Each sample: ``voxels`` (1, 64, 64, 64) float32,
    ``points`` (n_R, 3) float32 unit-cube coordinates, ``values`` (n_R, 1) float32, ``index`` int and
    ``name`` (from the sibling ``.txt`` when present, else the index).
    """

    def __init__(self, root: str | Path, split: str = "train", resolution: int = 64) -> None:
        if resolution not in RESOLUTIONS:
            raise DataFormatError(f"IMNetShapes: resolution {resolution}; expected one of {RESOLUTIONS}")
        self.path = self.resolve(root, split)
        self.data = read_imnet_hdf5(self.path, (resolution,))
        self.resolution = resolution
        txt = self.path.with_suffix(".txt")
        n = len(self.data["voxels"])
        self.names = txt.read_text().split() if txt.is_file() else [str(i) for i in range(n)]
        if len(self.names) != n:
            raise DataFormatError(f"{txt}: {len(self.names)} names for {n} shapes in {self.path}")

    @staticmethod
    def resolve(root: str | Path, split: str) -> Path:
        root = Path(root)
        if root.is_file():
            return root
        if not root.is_dir():
            raise MissingFileError(f"{root}: neither an IM-NET .hdf5 file nor a folder")
        found = sorted(root.glob(f"*_{split}.hdf5"))
        if len(found) != 1:
            raise MissingFileError(f"{root}: expected exactly one '*_{split}.hdf5', found {[p.name for p in found]}")
        return found[0]

    def __len__(self) -> int:
        return len(self.data["voxels"])

    def __getitem__(self, i: int) -> dict:
        r = self.resolution
        return {
            "voxels": self.data["voxels"][i, ..., 0][None].astype(np.float32),
            "points": points_to_coords(self.data[f"points_{r}"][i]),
            "values": self.data[f"values_{r}"][i].astype(np.float32),
            "index": i,
            "name": self.names[i],
        }
