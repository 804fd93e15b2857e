"""Per-scan RAPiD row caches for SemanticKITTI-layout data (``threefold prepare semantickitti``).

Two caches (:class:`~threefold.datasets.cache.FeatureCache`) under one root, each entry
``{"rapid": (N, k_max) float32}`` for one scan:

- ``rapid-r``: R-RAPiD, RoI = the ring estimated from elevation (:func:`lidar_rings`), keyed by the
  ``.bin`` file and the parameters ``k, ranges, delta, k_max, n_beams``;
- ``rapid-c``: C-RAPiD with the ground-truth classes as RoIs (ignored points: zero rows), the
  training-time input of C-RAPiD-Seg (Li et al., ECCV 2024, Sec. 3.2), keyed by the ``.bin`` and
  ``.label`` files and ``k, ranges, delta, k_max``. Test-time C-RAPiD needs pseudo-labels from a
  trained R-RAPiD-Seg and is computed by the pipeline, not here.

These are the caches the ``semantickitti-rapidseg`` pipeline reads (``features.cache_dir=CACHE``), so a
prepared dataset trains without recomputing. Files are identified as ``FeatureCache`` does by default,
by the SHA-256 of their content: an edited file gets a new key, a copied or moved one keeps it (a
lookup reads the scan once, about 2 MB). Parameters are canonicalised (ints, floats, k_max resolved) so the
same setting always gives the same key.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from threefold.datasets.cache import FeatureCache
from threefold.datasets.errors import ConfigError, MissingFileError
from threefold.datasets.semantickitti import SemanticKITTI, lidar_rings, list_scans, read_labels, read_scan
from threefold.geometry.rapid.features import SEMANTICKITTI_K, rapid_features

R_NAMESPACE, C_NAMESPACE = "rapid-r", "rapid-c"


def _params(k: Sequence[int], ranges: Sequence[float], delta: float | None, k_max: int | None) -> dict[str, Any]:
    ks = [int(x) for x in k]
    return {"k": ks, "ranges": [float(x) for x in ranges], "delta": None if delta is None else float(delta),
            "k_max": max(ks) if k_max is None else int(k_max)}


def rapid_caches(cache_root: str | os.PathLike, n_beams: int = 64, k: Sequence[int] = SEMANTICKITTI_K,
                 ranges: Sequence[float] = (20.0, 35.0), delta: float | None = 0.9,
                 k_max: int | None = None) -> tuple[FeatureCache, FeatureCache]:
    """The R-RAPiD and C-RAPiD caches under ``cache_root`` for these feature parameters."""
    p = _params(k, ranges, delta, k_max)
    return FeatureCache(cache_root, R_NAMESPACE, {**p, "n_beams": int(n_beams)}), FeatureCache(cache_root, C_NAMESPACE, p)


def r_rapid_rows(cache_root: str | os.PathLike, bin_path: str | os.PathLike, *, n_beams: int = 64,
                 k: Sequence[int] = SEMANTICKITTI_K, ranges: Sequence[float] = (20.0, 35.0),
                 delta: float | None = 0.9, k_max: int | None = None, workers: int = 1) -> np.ndarray:
    """R-RAPiD rows (N, k_max) float32 of one scan, from the cache or computed and stored."""
    cache, _ = rapid_caches(cache_root, n_beams, k, ranges, delta, k_max)

    def build() -> dict[str, np.ndarray]:
        scan = read_scan(bin_path)
        ring = lidar_rings(scan["coord"], n_beams)
        return {"rapid": rapid_features(scan["coord"], scan["remission"], ring, k, ranges, delta, k_max, workers=workers)}

    return cache.get_or_build([bin_path], build)["rapid"]


def c_rapid_rows(cache_root: str | os.PathLike, bin_path: str | os.PathLike, label_path: str | os.PathLike, *,
                 k: Sequence[int] = SEMANTICKITTI_K, ranges: Sequence[float] = (20.0, 35.0),
                 delta: float | None = 0.9, k_max: int | None = None, workers: int = 1) -> np.ndarray:
    """C-RAPiD rows (N, k_max) float32 of one labelled scan (ground-truth class RoIs), cached."""
    _, cache = rapid_caches(cache_root, 64, k, ranges, delta, k_max)

    def build() -> dict[str, np.ndarray]:
        scan = read_scan(bin_path)
        cls = read_labels(label_path, scan["coord"].shape[0])
        return {"rapid": rapid_features(scan["coord"], scan["remission"], cls, k, ranges, delta, k_max, workers=workers)}

    return cache.get_or_build([bin_path, label_path], build)["rapid"]


def _entry_exists(job: tuple[str, str | None], cache_root: str, params: dict[str, Any]) -> bool:
    """Whether the cache entry of ``job`` (see :func:`_build_one`) exists."""
    r_cache, c_cache = rapid_caches(cache_root, params["n_beams"], params["k"], params["ranges"], params["delta"],
                                    params["k_max"])
    cache, inputs = (r_cache, [job[0]]) if job[1] is None else (c_cache, list(job))
    return cache.path(cache.key(inputs)).is_file()


def _build_one(job: tuple[str, str | None], cache_root: str, params: dict[str, Any]) -> str:
    """Write one cache entry: ``job = (bin, None)`` R-RAPiD rows, ``(bin, label)`` C-RAPiD rows."""
    bin_path, label_path = job
    if label_path is None:
        r_rapid_rows(cache_root, bin_path, **params)
    else:
        c_params = {key: v for key, v in params.items() if key != "n_beams"}
        c_rapid_rows(cache_root, bin_path, label_path, **c_params)
    return bin_path


def prepare_rapid_features(data_root: str | os.PathLike, out_root: str | os.PathLike, workers: int | None = None,
                           sequences: Sequence[str] | None = None, variants: Sequence[str] = ("r", "c"),
                           progress: bool = True, *, shard: tuple[int, int] = (0, 1), n_beams: int = 64,
                           k: Sequence[int] = SEMANTICKITTI_K, ranges: Sequence[float] = (20.0, 35.0),
                           delta: float | None = 0.9, k_max: int | None = None) -> dict[str, Any]:
    """Cache R-RAPiD rows of every scan under ``data_root`` (all sequences found, or ``sequences``) and
    C-RAPiD rows of every labelled one (``variants`` selects).

    Runs on :func:`~threefold.datasets.prepare_runner.run_prepare`: one item per cache entry
    (``(bin, None)`` or ``(bin, label)``), ``shard=(i, n)`` keeps every n-th of the sorted entries,
    entries that exist are skipped (entries are written atomically, so an interrupted run loses at
    most the scans in flight). ``workers`` processes (default ``min(4, cpu count)``), each with a
    single-threaded kd-tree so the processes do not oversubscribe the cores. Returns the runner's
    counts plus ``"cache": out_root`` and ``"scans"`` (scans found, all shards).
    """
    from threefold.datasets.prepare_runner import default_workers, run_prepare

    if not set(variants) <= {"r", "c"} or not variants:
        raise ConfigError(f"prepare_rapid_features: variants={tuple(variants)}; expected a subset of ('r', 'c')")
    root = Path(data_root)
    seq_root = next((p for p in (root / "sequences", root / "dataset" / "sequences") if p.is_dir()), None)
    if seq_root is None:
        raise MissingFileError(f"{root}: no SemanticKITTI 'sequences' folder (expected sequences/XX/velodyne/NNNNNN.bin)")
    if sequences is None:
        sequences = sorted(p.name for p in seq_root.iterdir() if p.is_dir() and p.name.isdigit())
    scans = list_scans(root, [f"{int(s):02d}" for s in sequences])
    if not scans:
        raise MissingFileError(f"{root}: no scans (expected sequences/XX/velodyne/NNNNNN.bin)")
    rapid_caches(out_root, n_beams, k, ranges, delta, k_max)  # bad parameters fail here, not in every worker
    jobs: list[tuple[str, str | None]] = []  # (bin, None) = R-RAPiD, (bin, label) = C-RAPiD
    for _, _, path in scans:
        label = SemanticKITTI.label_path(path)
        if "r" in variants:
            jobs.append((str(path), None))
        if "c" in variants and label.is_file():
            jobs.append((str(path), str(label)))

    params = {"n_beams": n_beams, "k": tuple(k), "ranges": tuple(ranges), "delta": delta, "k_max": k_max}
    counts = run_prepare(jobs, partial(_build_one, cache_root=str(out_root), params=params),
                         partial(_entry_exists, cache_root=str(out_root), params=params),
                         workers=default_workers() if workers is None else max(1, int(workers)), shard=shard,
                         desc="RAPiD rows", unit="entry", progress=progress, key=lambda j: (j[0], j[1] or ""))
    return {"cache": Path(out_root), "scans": len(scans), **counts}


__all__ = ["C_NAMESPACE", "R_NAMESPACE", "c_rapid_rows", "prepare_rapid_features", "r_rapid_rows", "rapid_caches"]
