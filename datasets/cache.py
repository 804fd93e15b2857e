"""Content-keyed, atomically written, checksummed caches of preprocessed features.

Preprocessing (voxelisation, normalisation, neighbour lists, cropped volumes) is cached so a second
epoch or a second run skips it. Three things go wrong with naive caches, and this module prevents each:

- **stale entries**: the key is a SHA-256 over the namespace, the parameters (canonical JSON) and each
  input file's identity — its content hash (``key_by="content"``, the default) or, where hashing every
  read costs too much, its resolved path, size and modification time in nanoseconds (``key_by="stat"``:
  a file rewritten with the same size and mtime, e.g. ``cp -p``, then looks unchanged). Changing a
  parameter or an input file makes a new key, i.e. a miss, never a stale hit;
- **half-written entries**: an entry is written to a temp file in the same folder, flushed, fsynced,
  then ``os.replace``-d into place, so a process killed mid-write leaves at most a ``.tmp`` file that
  is never read as an entry;
- **corrupt entries** (disk errors, a copy cut short, a non-atomic network file system): every entry
  carries the SHA-256 of its payload; a mismatch is detected on read, the entry deleted and rebuilt.

Entries hold ``dict[str, numpy.ndarray]`` and are stored as ``.npz`` read with ``allow_pickle=False``,
so a planted cache file cannot run code either. Layout: ``root/namespace/<key[:2]>/<key>.entry``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from threefold.datasets.errors import ConfigError, DataFormatError, MissingFileError
from threefold.datasets.paths import atomic_write

MAGIC = b"TFCACHE1"  # format version: bump when the entry layout changes
_DIGEST = hashlib.sha256().digest_size
_CHUNK = 1 << 20


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class FeatureCache:
    """A cache of feature dicts for one preprocessing step.

    ``namespace`` names the step (``"brats-crop"``, ``"kitti-voxels"``) and ``params`` every setting
    that changes its output (plain JSON types: numbers, strings, booleans, None, lists, dicts).

    >>> cache = FeatureCache("cache", "kitti-voxels", {"voxel_size": 0.05})
    >>> feats = cache.get_or_build([scan_path], lambda: {"coord": voxelise(scan_path)})

    A cache is safe to share between processes: concurrent writers of one key each rename a complete
    file into place, and the last one wins with identical content.
    """

    def __init__(self, root: str | os.PathLike[str], namespace: str, params: Mapping[str, Any],
                 key_by: Literal["stat", "content"] = "content") -> None:
        if not namespace or any(c in namespace for c in "/\\\x00") or namespace in (".", ".."):
            raise ConfigError(f"FeatureCache namespace {namespace!r}: expected a plain folder name")
        if key_by not in ("stat", "content"):
            raise ConfigError(f"FeatureCache key_by={key_by!r}: expected 'stat' or 'content'")
        try:
            self._params = json.dumps(params, sort_keys=True, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"FeatureCache {namespace!r} params: expected plain JSON types ({exc})") from exc
        self.root = Path(root) / namespace
        self.namespace = namespace
        self.key_by = key_by

    def key(self, inputs: Sequence[str | os.PathLike[str]]) -> str:
        """The hex SHA-256 that names the entry for these input files under this cache's parameters."""
        h = hashlib.sha256()
        h.update(MAGIC + b"\0" + self.namespace.encode() + b"\0" + self._params.encode())
        for item in inputs:
            path = Path(item)
            if not path.is_file():
                raise MissingFileError(f"FeatureCache {self.namespace!r}: input {path} does not exist")
            if self.key_by == "content":
                ident = _file_sha256(path)
            else:
                st = path.stat()
                ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
            h.update(b"\0" + ident.encode())
        return h.hexdigest()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.entry"

    def load(self, key: str) -> dict[str, np.ndarray] | None:
        """The entry stored under ``key``; None when absent. Raises :class:`DataFormatError` when
        the file exists but is corrupt (wrong magic, checksum mismatch, unreadable payload)."""
        path = self.path(key)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        head = len(MAGIC) + _DIGEST
        if len(blob) < head or blob[: len(MAGIC)] != MAGIC:
            raise DataFormatError(f"cache entry {path}: missing {MAGIC!r} header ({len(blob)} bytes)")
        payload = blob[head:]
        if hashlib.sha256(payload).digest() != blob[len(MAGIC) : head]:
            raise DataFormatError(f"cache entry {path}: payload checksum mismatch ({len(payload)} bytes)")
        try:
            with np.load(io.BytesIO(payload), allow_pickle=False) as npz:
                return {name: npz[name] for name in npz.files}
        except Exception as exc:  # numpy raises several types for a malformed archive
            raise DataFormatError(f"cache entry {path}: payload is not a readable .npz ({exc})") from exc

    def store(self, key: str, value: Mapping[str, np.ndarray]) -> Path:
        """Write ``value`` under ``key`` atomically (temp file, fsync, rename); returns the entry path."""
        arrays = {}
        for name, arr in value.items():
            a = np.asarray(arr)
            if a.dtype == object:
                raise DataFormatError(f"cache {self.namespace!r} value {name!r}: object arrays cannot be cached")
            arrays[name] = a
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        payload = buf.getvalue()
        path = self.path(key)
        atomic_write(path, lambda f: f.write(MAGIC + hashlib.sha256(payload).digest() + payload))
        return path

    def get_or_build(self, inputs: Sequence[str | os.PathLike[str]],
                     build: Callable[[], Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """The cached entry for ``inputs``, or ``build()`` stored and returned on a miss.

        A corrupt entry is reported with a warning, deleted and rebuilt. The returned dict is the
        one read back (or, on a miss, the built arrays as ``np.asarray``), identical in value either way.
        """
        key = self.key(inputs)
        try:
            hit = self.load(key)
        except DataFormatError as exc:
            warnings.warn(f"{exc}; rebuilding it", RuntimeWarning, stacklevel=2)
            self.path(key).unlink(missing_ok=True)
            hit = None
        if hit is not None:
            return hit
        value = {name: np.asarray(arr) for name, arr in build().items()}
        self.store(key, value)
        return value
