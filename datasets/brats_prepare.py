"""``threefold prepare brats``: every case cropped to its brain box and z-scored, cached once.

The ``brats-*`` pipelines preprocess each case with :func:`threefold.datasets.brats.preprocess`
(crop to the box of voxels non-zero in any modality, per-modality z-score inside the brain; Isensee
et al. 2017, as in Hu et al. 2018). Reading four gzipped NIfTI volumes and normalising them costs
about a second per real BraTS case (240 x 240 x 155 x 4), every run; this step does it once for a
whole dataset in worker processes (:func:`~threefold.datasets.prepare_runner.run_prepare`), and the
pipelines read the result with ``cache_dir=CACHE``.

Cache: :class:`~threefold.datasets.cache.FeatureCache` namespace :data:`NAMESPACE`, one entry per
case keyed by the SHA-256 of the case's files (all modalities, the segmentation, and for MSD the
``dataset.json`` that orders the channels), written atomically. An entry holds exactly the arrays of
the preprocessed sample — ``image`` (4, I', J', K') float32, ``label`` (I', J', K') uint8 when
labelled, ``resection`` bool (BraTS 2024), ``bbox`` (3, 2) int64, ``affine`` (4, 4) float64 mm,
``spacing`` (3,) float64 mm, ``shape`` (3,) int64 of the uncropped grid, ``case`` and ``layout``
(0-d unicode) — so :func:`preprocessed_case` returns the same dict, value for value, as
``preprocess(read_case(case))``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from threefold.datasets.brats import Case, list_cases, preprocess, read_case
from threefold.datasets.cache import FeatureCache
from threefold.datasets.errors import DataFormatError, MissingFileError

NAMESPACE = "brats-crop-zscore"
#: Bumped when :func:`~threefold.datasets.brats.preprocess` changes what it computes: old entries then miss.
PREPROCESS_VERSION = 1

_STRINGS = ("case", "layout")


def brats_case_cache(cache_root: str | os.PathLike) -> FeatureCache:
    """The cache of preprocessed BraTS cases under ``cache_root``."""
    return FeatureCache(cache_root, NAMESPACE, {"preprocess": PREPROCESS_VERSION})


def case_inputs(case: Case) -> list[Path]:
    """Files whose content determines the preprocessed case (the cache key's inputs)."""
    files = list(case.images) + ([case.seg] if case.seg is not None else [])
    if case.layout == "msd":  # channel order comes from dataset.json
        files.append(case.images[0].parent.parent / "dataset.json")
    return files


def _to_entry(sample: dict) -> dict[str, np.ndarray]:
    entry = {k: np.asarray(v) for k, v in sample.items() if k not in _STRINGS and k != "shape"}
    entry["shape"] = np.asarray(sample["shape"], np.int64)
    entry.update({k: np.asarray(str(sample[k])) for k in _STRINGS})
    return entry


def _from_entry(entry: dict[str, np.ndarray], source: str) -> dict:
    missing = {"image", "bbox", "affine", "spacing", "shape", *_STRINGS} - set(entry)
    if missing:
        raise DataFormatError(f"{source}: cached BraTS case lacks {sorted(missing)}")
    sample: dict[str, Any] = {k: v for k, v in entry.items() if k not in _STRINGS and k != "shape"}
    sample["shape"] = tuple(int(s) for s in entry["shape"])
    sample.update({k: str(entry[k]) for k in _STRINGS})
    return sample


def preprocessed_case(case: Case, cache_root: str | os.PathLike | None = None) -> dict:
    """``preprocess(read_case(case))``, read from (or, on a miss, written to) the cache under
    ``cache_root``; computed directly when ``cache_root`` is None."""
    if cache_root is None:
        return preprocess(read_case(case))
    cache = brats_case_cache(cache_root)
    entry = cache.get_or_build(case_inputs(case), lambda: _to_entry(preprocess(read_case(case))))
    return _from_entry(entry, f"{cache.root} entry of case {case.name}")


def _case_exists(case: Case, cache_root: str) -> bool:
    cache = brats_case_cache(cache_root)
    return cache.path(cache.key(case_inputs(case))).is_file()


def _prepare_one(case: Case, cache_root: str) -> str:
    preprocessed_case(case, cache_root)
    return case.name


def prepare_brats_cases(data_root: str | os.PathLike, out_root: str | os.PathLike, workers: int | None = None,
                        progress: bool = True, *, shard: tuple[int, int] = (0, 1), layout: str | None = None,
                        cases: Sequence[Case] | None = None) -> dict[str, Any]:
    """Crop and normalise every case under ``data_root`` (any layout, detected unless ``layout``;
    labelled and unlabelled cases alike) into the cache under ``out_root``.

    Resumable and shardable as every step of :func:`~threefold.datasets.prepare_runner.run_prepare`
    (items: the cases sorted by their first image path); ``workers`` processes, default
    ``min(4, cpu count)``. Returns the runner's counts plus ``"cache"``.
    """
    from threefold.datasets.prepare_runner import default_workers, run_prepare

    root = Path(data_root)
    if not root.exists():
        raise MissingFileError(f"{root}: BraTS data root does not exist")
    found = list(cases) if cases is not None else list_cases(root, layout)
    counts = run_prepare(found, partial(_prepare_one, cache_root=str(out_root)),
                         partial(_case_exists, cache_root=str(out_root)),
                         workers=default_workers() if workers is None else max(1, int(workers)), shard=shard,
                         desc="BraTS crop + z-score", unit="case", progress=progress,
                         key=lambda c: str(c.images[0]))
    return {"cache": Path(out_root), **counts}


__all__ = ["NAMESPACE", "brats_case_cache", "case_inputs", "prepare_brats_cases", "preprocessed_case"]
