"""Checks on HDF5 datasets made from their metadata, before any data is read.

An HDF5 header may declare an enormous dataset and store none of it: h5py then returns the fill
value for every unwritten chunk, so reading ``f[key][()]`` would allocate the declared size (a
forged ScanObjectNN file declaring 10^7 clouds asks for 229 GiB). Formats whose writers store every
value (IM-NET, ScanObjectNN, ModelNet40 h5) can refuse such a file up front.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from threefold.datasets.errors import DataFormatError, require


def checked_dataset(path: Path, key: str, node: Any) -> Any:
    """``node`` (``f[key]``) if it is an ``h5py.Dataset`` whose declared data is all stored; a
    :class:`DataFormatError` naming the file and key otherwise (a group, or unwritten chunks/bytes)."""
    h5py = require("h5py", extra="points")
    if not isinstance(node, h5py.Dataset):
        raise DataFormatError(f"{path}: {key} is an HDF5 {type(node).__name__}; expected a dataset")
    if node.chunks is not None:
        expected = math.prod(-(-s // c) for s, c in zip(node.shape, node.chunks))
        stored = node.id.get_num_chunks()
    else:
        expected, stored = node.nbytes, node.id.get_storage_size()
    if node.size and stored < expected:
        raise DataFormatError(
            f"{path}: {key} declares shape {node.shape} but stores only {stored} of {expected} "
            f"{'chunks' if node.chunks is not None else 'bytes'}"
        )
    return node
