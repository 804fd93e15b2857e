"""SemanticKITTI (Behley et al., "SemanticKITTI: A Dataset for Semantic Scene Understanding of LiDAR
Sequences", ICCV 2019): reader, label mapping, prediction writer and the ``semantickitti`` dataset.

Layout on disk (the official one; ``root`` may be the folder that holds ``sequences/`` or KITTI's
``dataset/`` folder above it)::

    root/sequences/XX/velodyne/NNNNNN.bin      float32 records x, y, z (metres), remission [0, 1]
    root/sequences/XX/labels/NNNNNN.label      uint32 per point: semantic id (low 16 bits), instance (high 16)
    out/sequences/XX/predictions/NNNNNN.label  written by :func:`write_predictions`, raw uint32 ids

Labels: the 34 raw semantic ids map through the official ``learning_map`` to learning ids 0..19, of
which 0 ("unlabeled", also outlier, other-structure, other-object) is ignored; threefold numbers the
19 others 0..18 (:data:`SEMANTICKITTI_CLASSES`) and uses the package-wide ignore index -1. Predictions
map back through ``learning_map_inv`` (-1 is written as raw 0, "unlabeled"). The label configuration
ships with the package (``semantickitti.yaml``, MIT, from PRBonn/semantic-kitti-api).

Splits (official): train 00-07, 09, 10; val 08; test 11-21 (no labels).
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from threefold.datasets.errors import ConfigError, DataFormatError, MissingFileError
from threefold.datasets.paths import atomic_write
from threefold.datasets.pointclouds import IGNORE_INDEX, LabelMap, read_bin, read_point_labels
from threefold.datasets.registry import register_dataset

_CONFIG_PATH = Path(__file__).with_name("semantickitti.yaml")

SPLITS: dict[str, list[str]] = {
    "train": ["00", "01", "02", "03", "04", "05", "06", "07", "09", "10"],
    "val": ["08"],
    "test": [f"{s:02d}" for s in range(11, 22)],
}

# HDL-64E vertical field of view (Velodyne data sheet): +2.0 deg to -24.8 deg over 64 beams.
HDL64_FOV_DEG: tuple[float, float] = (-24.8, 2.0)


@functools.lru_cache(maxsize=1)
def _config() -> dict[str, Any]:
    import yaml

    with open(_CONFIG_PATH, encoding="utf-8") as f:
        return yaml.safe_load(f)


def semantickitti_config() -> dict[str, Any]:
    """The official SemanticKITTI label configuration shipped with threefold (a fresh copy).

    Keys: ``labels`` (raw id → name), ``color_map`` (raw id → [b, g, r]), ``content`` (raw id →
    fraction of points), ``learning_map`` (raw id → learning id 0..19), ``learning_map_inv``,
    ``learning_ignore``, ``split`` (sequence numbers).
    """
    import copy

    return copy.deepcopy(_config())


@functools.lru_cache(maxsize=1)
def _label_map() -> LabelMap:
    cfg = _config()
    ignore = [c for c, flag in cfg["learning_ignore"].items() if flag]
    return LabelMap.from_learning_map(cfg["learning_map"], ignore, cfg["learning_map_inv"])


def _class_names() -> tuple[str, ...]:
    cfg = _config()
    kept = [c for c in sorted(cfg["learning_map_inv"]) if not cfg["learning_ignore"][c]]
    return tuple(cfg["labels"][cfg["learning_map_inv"][c]] for c in kept)


SEMANTICKITTI_CLASSES: tuple[str, ...] = _class_names()
"""The 19 learning classes, index 0..18: car, bicycle, motorcycle, truck, other-vehicle, person,
bicyclist, motorcyclist, road, parking, sidewalk, other-ground, building, fence, vegetation, trunk,
terrain, pole, traffic-sign."""


def read_scan(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read one Velodyne scan ``NNNNNN.bin``.

    Returns ``coord`` (N, 3) float32, metres, sensor at the origin, and ``remission`` (N,) float32
    (KITTI: [0, 1]). A size that is not a multiple of 16 bytes, an empty file or NaN/inf values raise
    :class:`DataFormatError` naming the file.
    """
    sample = read_bin(path, num_features=4)
    return {"coord": sample["coord"].numpy(), "remission": sample["feat"][:, 0].numpy()}


def read_labels(path: str | os.PathLike, num_points: int) -> np.ndarray:
    """Read ``NNNNNN.label`` for a scan of ``num_points`` points.

    Returns (N,) int64 classes 0..18 (:data:`SEMANTICKITTI_CLASSES`), -1 for raw ids whose learning
    id is 0 (unlabeled, outlier, other-structure, other-object). The instance id (high 16 bits) is
    dropped. A count other than ``num_points`` or a raw id outside the official 34 raises
    :class:`DataFormatError` naming the file.
    """
    raw = read_point_labels(path, num_points)["label_raw"]
    return _label_map().encode(raw, where=str(path)).numpy()


def labels_to_raw(labels: np.ndarray | torch.Tensor) -> np.ndarray:
    """Classes (N,) in 0..18 or -1 → raw SemanticKITTI ids (N,) uint32 via ``learning_map_inv``
    (-1 → 0, "unlabeled")."""
    lab = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
    if lab.dtype.is_floating_point or lab.dtype == torch.bool or lab.ndim != 1:
        raise DataFormatError(f"predictions: expected (N,) integer classes, got {tuple(lab.shape)} {lab.dtype}")
    return _label_map().decode(lab.long()).numpy().astype(np.uint32)


def write_predictions(out_root: str | os.PathLike, sequence: str, frame: str,
                      labels: np.ndarray | torch.Tensor) -> Path:
    """Write one scan's predictions in the submission format.

    ``labels`` (N,) int, classes 0..18 (or -1); written as uint32 raw ids through ``learning_map_inv``
    to ``out_root/sequences/<sequence>/predictions/<frame>.label`` (atomically), one value per input
    point. ``sequence`` is a 2-digit id ("08"), ``frame`` a 6-digit id ("000123"); shorter numeric ids
    are zero-padded. Returns the path written.
    """
    if not re.fullmatch(r"\d{1,2}", str(sequence)) or not re.fullmatch(r"\d{1,6}", str(frame)):
        raise ConfigError(f"write_predictions: sequence {sequence!r} / frame {frame!r} must be numeric ids (e.g. '08', '000123')")
    raw = labels_to_raw(labels)
    path = Path(out_root) / "sequences" / f"{int(sequence):02d}" / "predictions" / f"{int(frame):06d}.label"
    atomic_write(path, lambda f: f.write(raw.astype("<u4").tobytes()))
    return path


def lidar_rings(coord: np.ndarray | torch.Tensor, n_beams: int = 64,
                fov_deg: tuple[float, float] = HDL64_FOV_DEG) -> np.ndarray | torch.Tensor:
    """Ring (beam) index of each point, estimated from its elevation when the file stores none.

    ``coord`` (N, 3) metres, sensor at the origin. The ``n_beams`` beams are modelled as uniformly
    spaced from ``fov_deg[1]`` (top, ring 0) down to ``fov_deg[0]`` (bottom, ring n_beams - 1), and a
    point is assigned to the nearest beam::

        elev = atan2(z, sqrt(x^2 + y^2)),   ring = clip(round((fov_up - elev) * (n - 1) / (fov_up - fov_down)), 0, n - 1)

    Returns (N,) int64, NumPy in → NumPy out, torch in → torch out on the same device. Exact for a
    sensor with uniformly spaced beams (the synthetic sample); on a real HDL-64E, whose upper and lower
    blocks have different spacings (about 1/3 and 1/2 degree), it is an approximation, as in RAPiD-Seg
    (Li et al., ECCV 2024, Sec. 3.2), which bins elevation into the beam count. Invariant to rotations
    about the z axis (yaw), not to pitch, roll or translation.
    """
    lo, hi = float(fov_deg[0]), float(fov_deg[1])
    if not hi > lo or n_beams < 1:
        raise ConfigError(f"lidar_rings: need fov_deg=(down, up) with up > down and n_beams >= 1, got {fov_deg}, {n_beams}")
    step = np.deg2rad(hi - lo) / max(n_beams - 1, 1)
    up = np.deg2rad(hi)
    if isinstance(coord, torch.Tensor):
        c = coord.double()
        elev = torch.atan2(c[:, 2], torch.hypot(c[:, 0], c[:, 1]))
        return torch.round((up - elev) * (1.0 / step)).clamp_(0, n_beams - 1).long()  # see below
    c = np.asarray(coord, dtype=np.float64)
    elev = np.arctan2(c[:, 2], np.hypot(c[:, 0], c[:, 1]))
    # Times the reciprocal in both paths: CUDA divides by a Python scalar that way, so NumPy, CPU and CUDA
    # tensors agree on rings at bin edges.
    return np.clip(np.rint((up - elev) * (1.0 / step)), 0, n_beams - 1).astype(np.int64)


def _sequences_root(root: Path) -> Path:
    for cand in (root / "sequences", root / "dataset" / "sequences"):
        if cand.is_dir():
            return cand
    raise MissingFileError(f"{root}: no SemanticKITTI 'sequences' folder (expected {root}/sequences/XX/velodyne/NNNNNN.bin)")


def _resolve_split(split: str | Sequence[str]) -> list[str]:
    if isinstance(split, str):
        if split in SPLITS:
            return list(SPLITS[split])
        if split.isdigit():
            return [f"{int(split):02d}"]
        raise ConfigError(f"SemanticKITTI split {split!r}: expected one of {', '.join(SPLITS)} or a list of sequence ids")
    seqs = []
    for s in split:
        if not str(s).isdigit():
            raise ConfigError(f"SemanticKITTI sequence {s!r}: expected a numeric id such as '08'")
        seqs.append(f"{int(s):02d}")
    return seqs


def list_scans(root: str | os.PathLike, sequences: Sequence[str]) -> list[tuple[str, str, Path]]:
    """``(sequence, frame, bin_path)`` for every scan of ``sequences`` that exists under ``root``, sorted.
    Sequences absent on disk are skipped (a download may hold only some of them)."""
    seq_root = _sequences_root(Path(root))
    out = []
    for seq in sequences:
        folder = seq_root / seq / "velodyne"
        if folder.is_dir():
            out += [(seq, f.stem, f) for f in sorted(folder.glob("*.bin"))]
    return out


@register_dataset("semantickitti", "SemanticKITTI LiDAR scans and labels (official sequences/XX layout)",
                  modality="points")
class SemanticKITTI(Dataset):
    """SemanticKITTI scans of one split (or a list of sequence ids) under ``root``.

    Each item is a dict: ``coord`` (N, 3) float32 tensor (metres), ``remission`` (N,) float32,
    ``ring`` (N,) int64 (the files store no ring, so it is estimated from elevation with
    :func:`lidar_rings` for an ``n_beams`` sensor), ``label`` (N,) int64 in 0..18 / -1 (only with
    labels), and ``sequence``, ``frame``, ``path`` (str).

    ``with_labels=None`` reads labels when every scan of the split has a ``.label`` file (so the
    test split is read without them); True requires them (a missing file raises); False skips them.
    Sequences of the split that are absent on disk are skipped; no scan at all raises.
    """

    def __init__(self, root: str | os.PathLike, split: str | Sequence[str] = "train",
                 with_labels: bool | None = None, n_beams: int = 64) -> None:
        self.root = Path(root)
        self.sequences = _resolve_split(split)
        self.n_beams = n_beams
        self.scans = list_scans(self.root, self.sequences)
        if not self.scans:
            raise MissingFileError(
                f"{self.root}: no scans for sequences {', '.join(self.sequences)} "
                f"(expected sequences/XX/velodyne/NNNNNN.bin)")
        label_files = [self.label_path(p) for _, _, p in self.scans]
        have = [f.is_file() for f in label_files]
        if with_labels is None:
            with_labels = all(have)
        elif with_labels and not all(have):
            missing = label_files[have.index(False)]
            raise MissingFileError(f"{missing}: label file missing ({have.count(False)} of {len(have)} scans have none)")
        self.with_labels = with_labels

    @staticmethod
    def label_path(bin_path: Path) -> Path:
        return bin_path.parent.parent / "labels" / f"{bin_path.stem}.label"

    def __len__(self) -> int:
        return len(self.scans)

    def __getitem__(self, i: int) -> dict[str, Any]:
        seq, frame, path = self.scans[i]
        scan = read_scan(path)
        coord = torch.from_numpy(scan["coord"])
        item: dict[str, Any] = {
            "coord": coord,
            "remission": torch.from_numpy(scan["remission"]),
            "ring": lidar_rings(coord, self.n_beams),
            "sequence": seq,
            "frame": frame,
            "path": str(path),
        }
        if self.with_labels:
            item["label"] = torch.from_numpy(read_labels(self.label_path(path), coord.shape[0]))
        return item



__all__ = [
    "HDL64_FOV_DEG",
    "IGNORE_INDEX",
    "SEMANTICKITTI_CLASSES",
    "SPLITS",
    "SemanticKITTI",
    "labels_to_raw",
    "lidar_rings",
    "list_scans",
    "read_labels",
    "read_scan",
    "semantickitti_config",
    "write_predictions",
]
