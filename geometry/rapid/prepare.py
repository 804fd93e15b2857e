"""Per-scan RAPiD feature cache for SemanticKITTI-layout data (``threefold prepare semantickitti``).

Each scan's entry holds ``r_rapid`` (N, k_max) float32 — R-RAPiD, RoI = the ring estimated from
elevation — and, where the scan has a ``.label`` file, ``c_rapid`` (N, k_max) float32 — C-RAPiD
with the ground-truth classes as RoIs (ignored points get zero rows), the training-time input of
C-RAPiD-Seg (Li et al., ECCV 2024, Sec. 3.2). Entries live in a
:class:`~threefold.datasets.cache.FeatureCache` keyed by the SHA-256 of the scan (and label) file
contents and every feature parameter, so a changed file or setting is a miss, never a stale hit.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from threefold.datasets.cache import FeatureCache
from threefold.datasets.errors import MissingFileError
from threefold.datasets.semantickitti import SemanticKITTI, lidar_rings, list_scans, read_labels, read_scan
from threefold.geometry.rapid.features import SEMANTICKITTI_K, rapid_features

NAMESPACE = "rapid-features"


def _params(n_beams: int, k: Sequence[int], ranges: Sequence[float], delta: float | None,
            k_max: int | None) -> dict[str, Any]:
    return {"n_beams": int(n_beams), "k": [int(x) for x in k], "ranges": [float(x) for x in ranges],
            "delta": None if delta is None else float(delta), "k_max": None if k_max is None else int(k_max),
            "fov_deg": [-24.8, 2.0], "version": 1}


def rapid_cache(out_root: str | os.PathLike, n_beams: int = 64, k: Sequence[int] = SEMANTICKITTI_K,
                ranges: Sequence[float] = (20.0, 35.0), delta: float | None = 0.9,
                k_max: int | None = None) -> FeatureCache:
    """The content-keyed cache of RAPiD entries under ``out_root`` for these feature parameters."""
    return FeatureCache(out_root, NAMESPACE, _params(n_beams, k, ranges, delta, k_max), key_by="content")


def scan_rapid_features(bin_path: str | os.PathLike, label_path: str | os.PathLike | None = None, *,
                        n_beams: int = 64, k: Sequence[int] = SEMANTICKITTI_K, ranges: Sequence[float] = (20.0, 35.0),
                        delta: float | None = 0.9, k_max: int | None = None, workers: int = 1) -> dict[str, np.ndarray]:
    """RAPiD rows of one scan: ``r_rapid`` (N, k_max) float32 and, with ``label_path``, ``c_rapid``."""
    scan = read_scan(bin_path)
    coord, rem = scan["coord"], scan["remission"]
    out = {"r_rapid": rapid_features(coord, rem, lidar_rings(coord, n_beams), k, ranges, delta, k_max, workers=workers)}
    if label_path is not None:
        cls = read_labels(label_path, coord.shape[0])
        out["c_rapid"] = rapid_features(coord, rem, cls, k, ranges, delta, k_max, workers=workers)
    return out


def cached_scan_features(cache_root: str | os.PathLike, bin_path: str | os.PathLike,
                         label_path: str | os.PathLike | None = None, *, n_beams: int = 64,
                         k: Sequence[int] = SEMANTICKITTI_K, ranges: Sequence[float] = (20.0, 35.0),
                         delta: float | None = 0.9, k_max: int | None = None, workers: int = 1) -> dict[str, np.ndarray]:
    """The cached entry of one scan (built and stored on a miss); see :func:`scan_rapid_features`."""
    cache = rapid_cache(cache_root, n_beams, k, ranges, delta, k_max)
    inputs = [bin_path] if label_path is None else [bin_path, label_path]
    return cache.get_or_build(inputs, lambda: scan_rapid_features(
        bin_path, label_path, n_beams=n_beams, k=k, ranges=ranges, delta=delta, k_max=k_max, workers=workers))


def _build_one(cache_root: str, bin_path: str, label_path: str | None, params: dict[str, Any]) -> str:
    cached_scan_features(cache_root, bin_path, label_path, **params)
    return bin_path


def prepare_rapid_features(data_root: str | os.PathLike, out_root: str | os.PathLike, workers: int | None = None,
                           sequences: Sequence[str] | None = None, progress: bool = True, *, n_beams: int = 64,
                           k: Sequence[int] = SEMANTICKITTI_K, ranges: Sequence[float] = (20.0, 35.0),
                           delta: float | None = 0.9, k_max: int | None = None) -> dict[str, Any]:
    """Cache the RAPiD entry of every scan under ``data_root`` (all sequences found, or ``sequences``).

    Resumable: scans whose entry exists are skipped (an interrupted run loses at most the scans in
    flight; entries are written atomically). ``workers`` processes (default ``min(4, cpu count)``),
    each with a single-threaded kd-tree so the processes do not oversubscribe the cores.
    Returns ``{"cache": folder, "scans": total, "computed": n, "skipped": n}``.
    """
    from tqdm import tqdm

    seq_root = Path(data_root) / "sequences"
    if not seq_root.is_dir() and (Path(data_root) / "dataset" / "sequences").is_dir():
        seq_root = Path(data_root) / "dataset" / "sequences"
    if sequences is None:
        if not seq_root.is_dir():
            raise MissingFileError(f"{data_root}: no SemanticKITTI 'sequences' folder")
        sequences = sorted(p.name for p in seq_root.iterdir() if p.is_dir() and p.name.isdigit())
    scans = list_scans(data_root, [f"{int(s):02d}" for s in sequences])
    if not scans:
        raise MissingFileError(f"{data_root}: no scans (expected sequences/XX/velodyne/NNNNNN.bin)")
    params = {"n_beams": n_beams, "k": tuple(k), "ranges": tuple(ranges), "delta": delta, "k_max": k_max}
    cache = rapid_cache(out_root, **params)
    todo = []
    for _, _, path in scans:
        label = SemanticKITTI.label_path(path)
        inputs = [path, label] if label.is_file() else [path]
        if not cache.path(cache.key(inputs)).is_file():
            todo.append((str(path), str(label) if label.is_file() else None))
    workers = min(4, os.cpu_count() or 1) if workers is None else max(1, int(workers))
    bar = tqdm(total=len(todo), desc="RAPiD features", unit="scan", disable=not progress)
    if workers == 1 or len(todo) <= 1:
        for path, label in todo:
            _build_one(str(out_root), path, label, params)
            bar.update()
    else:
        # spawn, not fork: the parent may hold torch / OpenMP threads that a fork would copy mid-state
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(_build_one, str(out_root), path, label, params) for path, label in todo]
            for fut in as_completed(futures):
                fut.result()
                bar.update()
    bar.close()
    return {"cache": cache.root, "scans": len(scans), "computed": len(todo), "skipped": len(scans) - len(todo)}


__all__ = ["NAMESPACE", "cached_scan_features", "prepare_rapid_features", "rapid_cache", "scan_rapid_features"]
