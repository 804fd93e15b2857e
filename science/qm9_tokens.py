"""``threefold prepare qm9``: every QM9 molecule parsed and tokenized once, cached in shards.

QM9 (Ramakrishnan et al., Sci. Data 2014) ships as about 134k files ``dsgdb9nsd_NNNNNN.xyz``;
parsing them costs more than the vectorised Uni-3DAR tokenizer (Lu et al. 2025, Sec. 3.1;
:class:`~threefold.science.octree.OctreeTokenizer`). This step reads the folder once, validates
every molecule against the octree (an atom collision or a molecule larger than the box is an error
naming its file, found before training rather than in the middle of an epoch) and stores, per
*shard* of :data:`SHARD_SIZE` consecutive files (sorted by name) — one cache file per shard, not one
per molecule:

- the molecules: ``numbers`` (A,) int64, ``positions`` (A, 3) float32 Å, ``mol_ptr`` (B+1,) int64
  CSR offsets, ``names`` (B,) unicode file stems;
- their canonical tokens (no augmentation, no placement shift, bounding-box centred) with the
  preset's spec: the :class:`~threefold.science.octree.OctreeTokens` arrays, prefixed ``tok_``.

The ``qm9-uni3dar`` pipeline reads them with ``token_cache=CACHE`` (and ``--data`` the same folder):
the molecules come from the shards instead of 134k parses, and batches whose augmentation is off
use the stored tokens as they are (an augmented batch is re-tokenized after its random rotation, as
without the cache: the tokens of a rotated molecule are other tokens).

Entries are :class:`~threefold.datasets.cache.FeatureCache` entries (namespace :data:`NAMESPACE`,
atomic writes, payload checksum) keyed by the SHA-256 of the shard's files and the octree spec and
vocabulary, so an edited file or another preset misses rather than hits a stale entry.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from threefold.datasets.cache import FeatureCache
from threefold.datasets.errors import DataFormatError, MissingFileError
from threefold.science.octree import OctreeTokenizer, OctreeTokens

NAMESPACE = "qm9-octree-tokens"
#: Molecules per cache entry: 134 entries of about 0.8 MB for the whole of QM9.
SHARD_SIZE = 1000
_TOKEN_FIELDS = tuple(f.name for f in fields(OctreeTokens) if f.name != "spec")


@dataclass(frozen=True)
class QM9Shard:
    """``files`` (sorted ``dsgdb9nsd_*.xyz`` paths) ``index * size .. index * size + len(files)`` of the folder."""

    index: int
    files: tuple[str, ...]

    def __str__(self) -> str:
        return f"QM9 shard {self.index} ({Path(self.files[0]).name} .. {Path(self.files[-1]).name}, {len(self.files)} files)"


def qm9_shards(data_root: str | os.PathLike, shard_size: int = SHARD_SIZE) -> list[QM9Shard]:
    """The folder's ``dsgdb9nsd_*.xyz`` files, sorted by name, in consecutive groups of ``shard_size``."""
    root = Path(data_root)
    if not root.is_dir():
        raise MissingFileError(f"{root}: QM9 data folder does not exist (expected dsgdb9nsd_*.xyz files)")
    files = sorted(str(p) for p in root.glob("dsgdb9nsd_*.xyz"))
    if not files:
        raise MissingFileError(f"{root}: no dsgdb9nsd_*.xyz files (the original QM9 layout)")
    if shard_size < 1:
        raise DataFormatError(f"QM9 shard size {shard_size}: expected at least 1")
    return [QM9Shard(i // shard_size, tuple(files[i : i + shard_size])) for i in range(0, len(files), shard_size)]


def qm9_token_cache(cache_root: str | os.PathLike, octree: str = "qm9") -> FeatureCache:
    """The shard cache under ``cache_root`` for the tokenizer preset ``octree`` (and the current vocabulary)."""
    tok = OctreeTokenizer(octree)
    vocab = hashlib.sha256("\n".join(tok.vocab.tokens).encode()).hexdigest()[:16]
    spec = {"cell": tok.spec.cell, "resolution": tok.spec.resolution, "depth": tok.spec.depth}
    # "placement": the box origin on the cell lattice (2026-11-26); caches of the earlier bounding-box placement miss
    return FeatureCache(cache_root, NAMESPACE, {"octree": octree, "spec": spec, "vocab": vocab, "placement": "cell-lattice"})


def tokenize_shard(shard: QM9Shard, octree: str = "qm9") -> dict[str, np.ndarray]:
    """Parse and tokenize one shard (see the module docstring for the arrays)."""
    from threefold.datasets.qm9 import read_qm9_xyz

    mols = [read_qm9_xyz(Path(f)) for f in shard.files]
    counts = np.array([len(m["numbers"]) for m in mols], np.int64)
    numbers = np.concatenate([m["numbers"] for m in mols]).astype(np.int64)
    positions = np.concatenate([m["positions"] for m in mols]).astype(np.float32)
    names = [Path(f).stem for f in shard.files]
    tokens = OctreeTokenizer(octree).tokenize_batch(numbers, positions.astype(np.float64), counts,
                                                    names=[str(f) for f in shard.files])
    entry = {"numbers": numbers, "positions": positions, "mol_ptr": np.concatenate([[0], np.cumsum(counts)]),
             "names": np.asarray(names)}
    entry.update({f"tok_{k}": np.asarray(getattr(tokens, k)) for k in _TOKEN_FIELDS})
    return entry


def shard_entry(shard: QM9Shard, cache_root: str | os.PathLike, octree: str = "qm9") -> dict[str, np.ndarray]:
    """The shard's cached arrays, computed and stored on a miss."""
    return qm9_token_cache(cache_root, octree).get_or_build(list(shard.files), lambda: tokenize_shard(shard, octree))


def _shard_exists(shard: QM9Shard, cache_root: str, octree: str) -> bool:
    cache = qm9_token_cache(cache_root, octree)
    return cache.path(cache.key(list(shard.files))).is_file()


def _prepare_one(shard: QM9Shard, cache_root: str, octree: str) -> int:
    shard_entry(shard, cache_root, octree)
    return shard.index


def prepare_qm9_tokens(data_root: str | os.PathLike, out_root: str | os.PathLike, workers: int | None = None,
                       progress: bool = True, *, shard: tuple[int, int] = (0, 1), shard_size: int = SHARD_SIZE,
                       octree: str = "qm9") -> dict[str, Any]:
    """Parse and tokenize every molecule of a QM9 folder into shard entries under ``out_root``.

    Items of :func:`~threefold.datasets.prepare_runner.run_prepare` are the molecule shards (so
    ``--shard i/n`` hands machine ``i`` every n-th shard); resumable, ``workers`` processes (default
    ``min(4, cpu count)``). Returns the runner's counts (items = shards) plus ``"cache"`` and ``"molecules"``.
    """
    from threefold.datasets.prepare_runner import default_workers, run_prepare

    shards = qm9_shards(data_root, shard_size)
    counts = run_prepare(shards, partial(_prepare_one, cache_root=str(out_root), octree=octree),
                         partial(_shard_exists, cache_root=str(out_root), octree=octree),
                         workers=default_workers() if workers is None else max(1, int(workers)), shard=shard,
                         desc="QM9 octree tokens", unit="shard", progress=progress, key=lambda s: s.index)
    return {"cache": Path(out_root), "molecules": sum(len(s.files) for s in shards), **counts}


def concat_tokens(parts: list[OctreeTokens]) -> OctreeTokens:
    """One token batch of several (CSR offsets shifted)."""
    def ptr(name: str) -> np.ndarray:
        out, base = [np.zeros(1, np.int64)], 0
        for p in parts:
            out.append(getattr(p, name)[1:] + base)
            base += int(getattr(p, name)[-1])
        return np.concatenate(out)

    cat = {k: np.concatenate([getattr(p, k) for p in parts]) for k in _TOKEN_FIELDS if k not in ("tree_ptr", "atom_ptr")}
    return OctreeTokens(parts[0].spec, tree_ptr=ptr("tree_ptr"), atom_ptr=ptr("atom_ptr"), **cat)


def take_structures(tokens: OctreeTokens, indices: np.ndarray | list[int]) -> OctreeTokens:
    """Structures ``indices`` of a token batch, in that order, as one batch (vectorised CSR gather)."""
    idx = np.asarray(indices, np.int64)

    def gather(ptr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lens = ptr[idx + 1] - ptr[idx]
        new_ptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        rows = np.repeat(ptr[idx] - new_ptr[:-1], lens) + np.arange(int(new_ptr[-1]))
        return rows, new_ptr

    t_rows, tree_ptr = gather(tokens.tree_ptr)
    a_rows, atom_ptr = gather(tokens.atom_ptr)
    return OctreeTokens(tokens.spec, tokens.tree[t_rows], tokens.tree_level[t_rows], tokens.tree_cell[t_rows], tree_ptr,
                        tokens.atom_type[a_rows], tokens.atom_xyz[a_rows], tokens.atom_cell[a_rows], atom_ptr,
                        tokens.atom_index[a_rows], tokens.origin[idx], tokens.cropped[idx])


def load_prepared_qm9(data_root: str | os.PathLike, cache_root: str | os.PathLike, octree: str = "qm9",
                      limit: int | None = None, shard_size: int = SHARD_SIZE) -> tuple[list[dict[str, Any]], OctreeTokens]:
    """Molecules (``numbers``, ``positions`` Å float32, ``name``) of a QM9 folder in file-name order —
    the order of :func:`threefold.datasets.qm9.read_qm9_folder` — and their canonical tokens, read
    from the shard cache (a shard missing from it is computed and stored). ``limit``: first molecules only."""
    from threefold.science.octree import PRESETS

    shards = qm9_shards(data_root, shard_size)
    mols: list[dict[str, Any]] = []
    parts = []
    for s in shards:
        if limit and len(mols) >= limit:
            break
        e = shard_entry(s, cache_root, octree)
        ptr = e["mol_ptr"]
        if len(ptr) != len(s.files) + 1 or str(e["names"][0]) != Path(s.files[0]).stem:
            raise DataFormatError(f"{cache_root}: cache entry of {s} does not hold that shard's molecules")
        mols += [{"numbers": e["numbers"][ptr[b]:ptr[b + 1]], "positions": e["positions"][ptr[b]:ptr[b + 1]],
                  "name": str(e["names"][b])} for b in range(len(s.files))]
        parts.append(OctreeTokens(PRESETS[octree], **{k: e[f"tok_{k}"] for k in _TOKEN_FIELDS}))
    tokens = concat_tokens(parts)
    if limit and limit < len(mols):
        mols, tokens = mols[:limit], take_structures(tokens, np.arange(limit))
    return mols, tokens


__all__ = ["NAMESPACE", "SHARD_SIZE", "QM9Shard", "concat_tokens", "load_prepared_qm9", "prepare_qm9_tokens",
           "qm9_shards", "qm9_token_cache", "shard_entry", "take_structures", "tokenize_shard"]
