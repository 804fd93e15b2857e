"""The shared data-loader layer: readers of real formats, sample conventions, transforms, collate
and splits. This package imports no sibling package of threefold (see ``tests/test_layering.py``)."""

import importlib

from threefold.datasets.errors import (
    ConfigError,
    DataFormatError,
    MissingExtraError,
    MissingFileError,
    ThreefoldError,
    UnsafePickleError,
)

# Readers, collate, transforms and splits, importable from here without making
# `import threefold.datasets` pay for torch: each is imported on first access.
_LAZY: dict[str, str] = {
    **dict.fromkeys(("read_points", "read_bin", "read_ply", "read_pcd", "read_npy", "read_txt",
                     "read_point_labels", "LabelMap", "PointCloudFolder"), "threefold.datasets.pointclouds"),
    **dict.fromkeys(("read_nifti", "write_nifti", "NiftiFolder"), "threefold.datasets.volumes"),
    **dict.fromkeys(("read_sdf", "read_xyz", "SDFMolecules", "XYZMolecules"), "threefold.datasets.molecules"),
    **dict.fromkeys(("collate_points", "collate_volumes", "split_by_offset", "offset_to_batch",
                     "batch_to_offset"), "threefold.datasets.collate"),
    **dict.fromkeys(("split_indices", "kfold_indices", "seed_everything", "item_generator"),
                    "threefold.datasets.splits"),
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'threefold.datasets' has no attribute {name!r}")
