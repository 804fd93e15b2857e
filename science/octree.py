"""Uni-3DAR octree tokenization with its exact inverse, batched and vectorised over atoms.

Lu et al., "Uni-3DAR: Unified 3D Generation and Understanding via Autoregression on Compressed
Spatial Tokens" (2025), Sec. 3.1. A structure is placed in a cubic box of ``2**depth`` finest cells
of edge ``cell`` Å (0.24 Å for molecules and crystals, 0.48 Å for proteins; QM9 depth 6 -> 15.36 Å,
GEOM-DRUGS 7, MP-20 8, proteins 10). The octree over the occupied finest cells is written

- breadth-first, level by level from the root (level ``depth``) down to level 1, Morton (z-order)
  order within a level; every non-empty node emits one *tree token*, the 8-bit occupancy mask of
  its children (child ``i`` is offset ``(i & 1, i >> 1 & 1, i >> 2 & 1)``: x fastest, then y, then
  z; bit ``i`` set when child ``i`` holds an atom). One token carries two levels (the node and
  which of its children exist), so its 255 values never include 0;
- then, for every occupied finest cell in Morton order, the *fine tokens* of its atom: the atom
  type, then the x, y, z offsets inside the cell quantised at ``resolution`` (0.01 Å -> 24 bins per
  axis for 0.24 Å cells).

Positions are quantised once, in integer units of ``resolution`` relative to an integer box
origin, so the inverse (:func:`detokenize`) returns every position within half a bin
(0.005 Å per axis) of the input, for any rigid motion applied beforehand.

Differences from the reference code (dptech-corp/Uni-3DAR, ``grid_utils.py`` /
``base_grid_dataset.py``), and why:

- the reference keeps one random atom when two atoms share a finest cell; here the collision is an
  error naming both atoms (silently dropping atoms breaks the inverse);
- the reference centres on the mean atom and then clamps; here the box is centred on the
  bounding-box centre (rounded down onto the input frame's cell lattice, so in-cell offsets are
  positions modulo the cell, as the reference's), so every structure whose extent fits the box with
  one cell to spare is placed without cropping (larger ones are clamped inside, off the lattice);
- the reference's Gaussian "jitter" (sigma = half a cell) is one random translation per structure,
  not per-atom noise; :func:`random_rigid_motion` does the same and returns the motion so that it
  can be undone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from threefold.datasets.errors import DataFormatError
from threefold.science.vocab import Vocabulary

MAX_DEPTH = 10  # 10 bits per axis -> 30-bit Morton codes; the structure index takes the bits above
_MORTON_BITS = 3 * MAX_DEPTH
_CHILD_OFFSETS = np.array([[i & 1, (i >> 1) & 1, (i >> 2) & 1] for i in range(8)], dtype=np.int64)


class CollisionError(DataFormatError):
    """Two atoms of one structure fall in the same finest octree cell."""


@dataclass(frozen=True)
class OctreeSpec:
    """Geometry of the octree: finest ``cell`` edge (Å), coordinate ``resolution`` (Å), ``depth``."""

    cell: float = 0.24
    resolution: float = 0.01
    depth: int = 6

    def __post_init__(self) -> None:
        if not 1 <= self.depth <= MAX_DEPTH:
            raise DataFormatError(f"octree depth {self.depth} outside 1..{MAX_DEPTH}")
        ratio = self.cell / self.resolution
        if abs(ratio - round(ratio)) > 1e-6 or round(ratio) < 2:
            raise DataFormatError(
                f"octree cell {self.cell} Å is not a whole number (>= 2) of resolution {self.resolution} Å"
            )

    @property
    def bins(self) -> int:
        """Coordinate bins per axis inside one finest cell (24 for 0.24 Å / 0.01 Å)."""
        return int(round(self.cell / self.resolution))

    @property
    def box(self) -> float:
        """Box edge in Å (15.36 for the QM9 preset)."""
        return self.cell * 2**self.depth


PRESETS: dict[str, OctreeSpec] = {
    "qm9": OctreeSpec(0.24, 0.01, 6),
    "drug": OctreeSpec(0.24, 0.01, 7),
    "mp20": OctreeSpec(0.24, 0.01, 8),
    "protein": OctreeSpec(0.48, 0.01, 10),
}


@dataclass
class OctreeTokens:
    """Token arrays of a batch of ``B`` structures, each laid out as a CSR segment.

    tree       (T,) int64   occupancy masks 1..255, per structure breadth-first, Morton within a level
    tree_level (T,) int64   level of the emitting node (``depth`` = root .. 1)
    tree_cell  (T, 3) int64 node origin in finest-cell units (derivable from ``tree``; kept for models)
    tree_ptr   (B+1,) int64 structure ``b`` owns ``tree[tree_ptr[b]:tree_ptr[b+1]]``
    atom_type  (A,) int64   atom type (atomic number or vocabulary id, passed through unchanged)
    atom_xyz   (A, 3) int64 in-cell offsets in ``resolution`` units, 0..bins-1
    atom_cell  (A, 3) int64 finest cell of the atom (derivable)
    atom_ptr   (B+1,) int64 CSR offsets of atoms
    atom_index (A,) int64   index of the atom in its input structure (tokens are in Morton order)
    origin     (B, 3) float64 Å, physical position of the box corner
    cropped    (B,) int64   atoms removed by cutoff cropping (0 unless ``cutoff=True``)
    """

    spec: OctreeSpec
    tree: np.ndarray
    tree_level: np.ndarray
    tree_cell: np.ndarray
    tree_ptr: np.ndarray
    atom_type: np.ndarray
    atom_xyz: np.ndarray
    atom_cell: np.ndarray
    atom_ptr: np.ndarray
    atom_index: np.ndarray
    origin: np.ndarray
    cropped: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self.tree_ptr) - 1

    def __getitem__(self, b: int) -> OctreeTokens:
        """Structure ``b`` alone, as a batch of one."""
        t0, t1 = self.tree_ptr[b], self.tree_ptr[b + 1]
        a0, a1 = self.atom_ptr[b], self.atom_ptr[b + 1]
        return OctreeTokens(
            self.spec,
            self.tree[t0:t1],
            self.tree_level[t0:t1],
            self.tree_cell[t0:t1],
            np.array([0, t1 - t0], np.int64),
            self.atom_type[a0:a1],
            self.atom_xyz[a0:a1],
            self.atom_cell[a0:a1],
            np.array([0, a1 - a0], np.int64),
            self.atom_index[a0:a1],
            self.origin[b : b + 1],
            self.cropped[b : b + 1],
        )

    def compression(self) -> dict[str, np.ndarray | float]:
        """Sequence lengths with the two-level occupancy encoding vs one token per occupied child.

        ``tree_tokens`` (B,): one token per non-empty node (this encoding). ``child_tokens`` (B,):
        one token per occupied child node, i.e. every non-root node plus every occupied finest cell
        (an encoding that names each node as its own token). ``slot_tokens`` (B,): one binary token
        per child slot (8 per non-empty node). Ratios are per structure; ``mean_*`` average them.
        """
        tree_n = np.diff(self.tree_ptr)
        atoms_n = np.diff(self.atom_ptr)
        child_n = tree_n - 1 + atoms_n
        return {
            "tree_tokens": tree_n,
            "child_tokens": child_n,
            "slot_tokens": 8 * tree_n,
            "ratio_vs_child": child_n / tree_n,
            "mean_tree_tokens": float(tree_n.mean()),
            "mean_child_tokens": float(child_n.mean()),
            "mean_ratio_vs_child": float((child_n / tree_n).mean()),
        }


def _spread_bits(c: np.ndarray) -> np.ndarray:
    """Insert two zero bits between the 10 low bits of each value (bit i -> bit 3 i)."""
    c = np.asarray(c, dtype=np.int64) & 0x3FF
    c = (c | (c << 16)) & 0x030000FF
    c = (c | (c << 8)) & 0x0300F00F
    c = (c | (c << 4)) & 0x030C30C3
    return (c | (c << 2)) & 0x09249249


_SPREAD = _spread_bits(np.arange(1 << MAX_DEPTH))  # lookup table: a gather beats five passes


def morton_encode(cell: np.ndarray) -> np.ndarray:
    """Morton (z-order) code of integer cells (N, 3) in 0..1023 -> (N,) int64, x in the lowest bit."""
    c = np.asarray(cell) & 0x3FF
    return _SPREAD[c[:, 0]] | (_SPREAD[c[:, 1]] << 1) | (_SPREAD[c[:, 2]] << 2)


def _check_batch(types: np.ndarray, positions: np.ndarray, counts: np.ndarray, names: list[str] | None) -> None:
    def name(b: int) -> str:
        return names[b] if names is not None else f"structure {b}"

    if positions.ndim != 2 or positions.shape[1] != 3:
        raise DataFormatError(f"positions: expected shape (N, 3) in Å, got {positions.shape}")
    if types.shape != (positions.shape[0],):
        raise DataFormatError(f"types: expected shape ({positions.shape[0]},) to match positions, got {types.shape}")
    if (counts < 0).any() or counts.sum() != positions.shape[0]:
        raise DataFormatError(f"counts: must be >= 0 and sum to {positions.shape[0]} atoms, got sum {counts.sum()}")
    if (counts == 0).any():
        raise DataFormatError(f"{name(int(np.flatnonzero(counts == 0)[0]))}: empty structure (0 atoms)")
    if not np.isfinite(positions).all():
        bad = int(np.flatnonzero(~np.isfinite(positions).all(1))[0])
        b = int(np.searchsorted(np.cumsum(counts), bad, side="right"))
        raise DataFormatError(f"{name(b)}: positions contain NaN/inf")
    if (types < 0).any():
        raise DataFormatError("types: atom types must be non-negative ids")


def _crop(
    q: np.ndarray, mol: np.ndarray, starts: np.ndarray, counts: np.ndarray, over: np.ndarray, size: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Keep-mask of atoms: each oversized structure keeps the box of ``size`` units centred on a random atom."""
    pick = starts + np.floor(rng.random(len(counts)) * counts).astype(np.int64)
    lo = q[pick] - size // 2
    rel = q - lo[mol]
    inside = ((rel >= 0) & (rel < size)).all(1)
    return inside | ~over[mol]


def tokenize_batch(
    types: np.ndarray,
    positions: np.ndarray,
    counts: np.ndarray,
    spec: OctreeSpec = PRESETS["qm9"],
    *,
    cutoff: bool = False,
    center: np.ndarray | None = None,
    shift: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
    names: list[str] | None = None,
) -> OctreeTokens:
    """Tokenize ``B`` structures at once (no Python loop over atoms or structures).

    types     (N,) int      atom types of all structures, concatenated (passed through unchanged)
    positions (N, 3) float  Å, concatenated
    counts    (B,) int      atoms per structure (each >= 1)
    cutoff    crop a structure larger than the box to the box around a random atom (``rng``
              required); the number of removed atoms is reported in ``cropped``. Without it, an
              oversized structure raises :class:`DataFormatError`.
    center    (B, 3) float Å, point to put at the box centre (default: bounding-box centre); crystals
              centre both their lattice corners and their atoms on the lattice centre.
    shift     (B, 3) int    extra placement shift in whole cells (training augmentation, up to one
              cell in the reference); clipped so that the structure stays inside the box.
    Two atoms of one structure in the same finest cell raise :class:`CollisionError`.
    """
    types = np.asarray(types, dtype=np.int64)
    positions = np.asarray(positions, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.int64)
    _check_batch(types, positions, counts, names)
    name = (lambda b: names[b]) if names is not None else (lambda b: f"structure {b}")
    B = len(counts)
    size = spec.bins * 2**spec.depth  # box edge in resolution units
    mol = np.repeat(np.arange(B, dtype=np.int64), counts)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    q = np.rint(positions / spec.resolution).astype(np.int64)
    atom_index = np.arange(len(q), dtype=np.int64) - starts[mol]
    cropped = np.zeros(B, np.int64)

    if center is None:
        qmin, qmax = np.minimum.reduceat(q, starts), np.maximum.reduceat(q, starts)
        over = ((qmax - qmin) >= size).any(1)
    else:
        lo = np.rint(np.asarray(center, dtype=np.float64).reshape(B, 3) / spec.resolution).astype(np.int64) - size // 2
        rel = q - lo[mol]
        outside = ((rel < 0) | (rel >= size)).any(1)
        over = np.bincount(mol[outside], minlength=B) > 0
    if over.any():
        b = int(np.flatnonzero(over)[0])
        if not cutoff:
            seg = q[starts[b] : starts[b] + counts[b]]
            ext = (seg.max(0) - seg.min(0)) * spec.resolution
            raise DataFormatError(
                f"{name(b)}: extent {np.round(ext, 2).tolist()} Å does not fit the {spec.box:.2f} Å octree box "
                f"(depth {spec.depth}); use a deeper octree or cutoff=True to crop around an atom"
            )
        if rng is None:
            raise DataFormatError("cutoff=True needs rng (a numpy Generator) to choose the atom to crop around")
        keep = _crop(q, mol, starts, counts, over, size, rng)
        cropped = counts - np.bincount(mol[keep], minlength=B)
        types, q, mol, atom_index = types[keep], q[keep], mol[keep], atom_index[keep]
        counts = counts - cropped
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        center = None

    if center is None:
        qmin, qmax = np.minimum.reduceat(q, starts), np.maximum.reduceat(q, starts)
        # the bounding-box centre, rounded down onto the cell lattice of the input frame (as the
        # reference's floor(p / cell)): a finest cell is then the input's own cell, and an atom's in-cell
        # offset its position modulo the cell, so a translation of the input (the training jitter) moves
        # the offsets. Centring alone would make the offsets a function of the structure's extent — any
        # translation cancelled, and on each axis the two extreme atoms' offsets tied to each other.
        lo = ((qmin + qmax) // 2 - size // 2) // spec.bins * spec.bins
    if shift is not None:
        lo = lo - np.asarray(shift, dtype=np.int64).reshape(B, 3) * spec.bins
    if center is None:
        lo = np.clip(lo, qmax - size + 1, qmin)  # keeps every atom inside whatever the shift

    local = q - np.repeat(lo, counts, axis=0)
    # (bounding-box placement is inside by construction; a given centre may not be)
    outside = ((local < 0) | (local >= size)).any(1) if center is not None else np.zeros(0, bool)
    if outside.any():
        b = int(mol[np.flatnonzero(outside)[0]])
        raise DataFormatError(
            f"{name(b)}: atoms fall outside the {spec.box:.2f} Å octree box placed around the given center"
        )
    cell, xyz = np.divmod(local, spec.bins)
    key = (mol << _MORTON_BITS) | morton_encode(cell)
    order = np.argsort(key, kind="stable")
    key = key[order]
    dup = np.flatnonzero(key[1:] == key[:-1])
    if len(dup):
        i, j = order[dup[0]], order[dup[0] + 1]
        raise CollisionError(
            f"{name(int(mol[i]))}: atoms {int(atom_index[i])} and {int(atom_index[j])} fall in the same "
            f"{spec.cell} Å octree cell {cell[i].tolist()}; use a finer cell (OctreeSpec(cell=...)) to separate them"
        )
    atom_cell = cell[order]

    # Level by level, bottom-up: the unique parents of the level-(l-1) nodes are the level-l nodes,
    # and a parent's occupancy mask is the OR (here: sum, children being distinct) of 1 << child.
    # A node is represented by the first atom below it (``rep``); its structure index is the part
    # of its key above the Morton bits, its origin the cell of ``rep`` with the low bits cleared.
    levels_occ, levels_mol, levels_rep = [], [], []
    cur, rep = key, np.arange(len(key))
    for level in range(1, spec.depth + 1):
        parent = cur >> 3
        first = np.flatnonzero(np.concatenate([[True], parent[1:] != parent[:-1]]))
        occ = np.add.reduceat(np.left_shift(1, cur & 7), first)
        cur, rep = parent[first], rep[first]
        levels_occ.append(occ)
        levels_mol.append(cur >> (_MORTON_BITS - 3 * level))
        levels_rep.append(rep)

    # Lay the levels out per structure, root first: node j of level l for structure m goes to
    # tree_ptr[m] + (nodes of m on levels above l) + (rank of j among m's nodes on level l).
    per_level = np.stack([np.bincount(m, minlength=B) for m in levels_mol[::-1]])  # (depth, B), root first
    tree_n = per_level.sum(0)
    tree_ptr = np.concatenate([[0], np.cumsum(tree_n)]).astype(np.int64)
    above = np.cumsum(per_level, 0) - per_level
    T = int(tree_ptr[-1])
    tree = np.empty(T, np.int64)
    tree_rep = np.empty(T, np.int64)
    for k, level in enumerate(range(spec.depth, 0, -1)):
        m = levels_mol[level - 1]
        level_start = np.cumsum(per_level[k]) - per_level[k]
        dest = np.arange(len(m)) + (tree_ptr[:-1] + above[k] - level_start)[m]
        tree[dest] = levels_occ[level - 1]
        tree_rep[dest] = levels_rep[level - 1]
    # per structure the levels are contiguous blocks, root first
    tree_level = np.repeat(np.tile(np.arange(spec.depth, 0, -1), B), per_level.T.ravel())
    tree_cell = (atom_cell[tree_rep] >> tree_level[:, None]) << tree_level[:, None]

    return OctreeTokens(
        spec=spec,
        tree=tree,
        tree_level=tree_level,
        tree_cell=tree_cell,
        tree_ptr=tree_ptr,
        atom_type=types[order],
        atom_xyz=xyz[order],
        atom_cell=atom_cell,
        atom_ptr=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        atom_index=atom_index[order],
        origin=lo * spec.resolution,
        cropped=cropped,
    )


def decode_tree(
    tree: np.ndarray, tree_ptr: np.ndarray, depth: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rebuild the occupied finest cells from tree tokens alone, batched over structures.

    tree (T,) int64 occupancy masks, tree_ptr (B+1,) CSR offsets. Returns ``cells`` (A, 3) int64 in
    Morton order per structure, ``cell_ptr`` (B+1,), and per token its ``levels`` (T,) int64 and
    node origin ``node_cells`` (T, 3) int64 as implied by the sequence. A sequence whose masks do
    not account for its length raises.
    """
    tree = np.asarray(tree, dtype=np.int64)
    tree_ptr = np.asarray(tree_ptr, dtype=np.int64)
    B = len(tree_ptr) - 1
    if ((tree < 1) | (tree > 255)).any():
        raise DataFormatError("tree tokens: occupancy masks must be in 1..255")
    tree_n = np.diff(tree_ptr)
    if (tree_n < depth).any():
        b = int(np.flatnonzero(tree_n < depth)[0])
        raise DataFormatError(f"structure {b}: {tree_n[b]} tree tokens cannot describe a depth-{depth} octree")
    levels = np.empty(len(tree), np.int64)
    node_cells = np.empty((len(tree), 3), np.int64)
    consumed = np.zeros(B, np.int64)
    n = np.ones(B, np.int64)  # nodes per structure on the current level: one root each
    cells = np.zeros((B, 3), np.int64)
    owner = np.arange(B, dtype=np.int64)
    for level in range(depth, 0, -1):
        if (consumed + n > tree_n).any():
            b = int(np.flatnonzero(consumed + n > tree_n)[0])
            raise DataFormatError(f"structure {b}: tree tokens end before level {level} is complete")
        first = np.concatenate([[0], np.cumsum(n)[:-1]])
        idx = tree_ptr[owner] + consumed[owner] + np.arange(len(owner)) - first[owner]
        occ = tree[idx]
        levels[idx] = level
        node_cells[idx] = cells
        bits = ((occ[:, None] >> np.arange(8)) & 1).astype(bool)  # (nodes, 8)
        children = cells[:, None, :] + _CHILD_OFFSETS[None] * (1 << (level - 1))
        cells = children[bits]
        consumed += n
        owner = np.repeat(owner, bits.sum(1))
        n = np.bincount(owner, minlength=B)
    if (consumed != tree_n).any():
        b = int(np.flatnonzero(consumed != tree_n)[0])
        raise DataFormatError(f"structure {b}: {tree_n[b] - consumed[b]} tree tokens left over after level 1")
    return cells, np.concatenate([[0], np.cumsum(n)]).astype(np.int64), levels, node_cells


def detokenize(tokens: OctreeTokens) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact inverse of :func:`tokenize_batch` from the token values (tree, types, offsets, origin).

    Returns ``types`` (A,) int64, ``positions`` (A, 3) float64 Å in Morton order (``atom_index``
    maps them back to input order) and ``ptr`` (B+1,). Every position is within half a bin
    (``resolution / 2`` per axis) of the tokenized input.
    """
    spec = tokens.spec
    cells, cell_ptr, _, _ = decode_tree(tokens.tree, tokens.tree_ptr, spec.depth)
    if not np.array_equal(cell_ptr, tokens.atom_ptr):
        b = int(np.flatnonzero(np.diff(cell_ptr) != np.diff(tokens.atom_ptr))[0])
        raise DataFormatError(
            f"structure {b}: the tree has {np.diff(cell_ptr)[b]} occupied cells but "
            f"{np.diff(tokens.atom_ptr)[b]} atoms follow"
        )
    xyz = np.asarray(tokens.atom_xyz, dtype=np.int64)
    if ((xyz < 0) | (xyz >= spec.bins)).any():
        raise DataFormatError(f"atom offsets: expected 0..{spec.bins - 1} per axis")
    owner = np.repeat(np.arange(len(tokens), dtype=np.int64), np.diff(cell_ptr))
    positions = tokens.origin[owner] + (cells * spec.bins + xyz) * spec.resolution
    return np.asarray(tokens.atom_type, np.int64), positions, cell_ptr


def tokenize(types: np.ndarray, positions: np.ndarray, spec: OctreeSpec = PRESETS["qm9"], **kwargs) -> OctreeTokens:
    """Tokenize one structure: types (N,), positions (N, 3) Å; keyword arguments as :func:`tokenize_batch`."""
    return tokenize_batch(types, positions, np.array([len(positions)]), spec, **kwargs)


def random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` rotation matrices (n, 3, 3) float64, uniform on SO(3) (normalised Gaussian quaternions)."""
    quat = rng.standard_normal((n, 4))
    w, x, y, z = (quat / np.linalg.norm(quat, axis=1, keepdims=True)).T
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        1,
    )


def random_rigid_motion(
    positions: np.ndarray, counts: np.ndarray, rng: np.random.Generator, *, rotate: bool = True, sigma: float = 0.12
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training augmentation of Uni-3DAR: a uniform random rotation about each structure's centroid
    and one Gaussian translation per structure (``sigma`` Å, half a 0.24 Å cell as in the reference).

    positions (N, 3) Å, counts (B,). Returns moved positions (N, 3), rotations (B, 3, 3) and
    translations (B, 3) such that ``moved = (p - c) @ R.T + c + t`` with ``c`` the centroid.
    """
    positions = np.asarray(positions, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.int64)
    B = len(counts)
    mol = np.repeat(np.arange(B), counts)
    centroid = np.add.reduceat(positions, np.concatenate([[0], np.cumsum(counts)[:-1]])) / counts[:, None]
    rot = random_rotations(B, rng) if rotate else np.broadcast_to(np.eye(3), (B, 3, 3)).copy()
    trans = rng.standard_normal((B, 3)) * sigma
    rel = positions - centroid[mol]
    moved = np.einsum("nij,nj->ni", rot[mol], rel) + centroid[mol] + trans[mol]
    return moved, rot, trans


@dataclass
class CrystalTokens:
    """A crystal as two octrees in one box frame: the eight lattice-corner pseudo-atoms, then the atoms.

    Both trees are centred on the lattice centre (as in the reference), so the atom tree is read in
    the frame the lattice tree fixes. ``lattice`` and ``atoms`` are :class:`OctreeTokens` batches.
    """

    lattice: OctreeTokens
    atoms: OctreeTokens


class OctreeTokenizer:
    """Uni-3DAR tokenizer of molecules, crystals and protein Cα traces with its exact inverse.

    >>> tok = OctreeTokenizer("qm9")
    >>> tokens = tok.tokenize(numbers, positions)      # numbers (N,) int64, positions (N, 3) Å
    >>> numbers2, positions2 = tok.detokenize(tokens)  # Morton order; tokens.atom_index maps back

    Atom types in the tokens are vocabulary ids (:class:`~threefold.science.vocab.Vocabulary`);
    ``cutoff`` crops structures larger than the box around a random atom instead of raising.
    """

    def __init__(self, spec: OctreeSpec | str = "qm9", vocab: Vocabulary | None = None, cutoff: bool = False) -> None:
        if isinstance(spec, str):
            if spec not in PRESETS:
                raise DataFormatError(f"unknown octree preset {spec!r}; expected one of {sorted(PRESETS)}")
            spec = PRESETS[spec]
        self.spec = spec
        self.vocab = vocab if vocab is not None else Vocabulary()
        self.cutoff = cutoff

    def tokenize_batch(
        self, numbers: np.ndarray, positions: np.ndarray, counts: np.ndarray, *, source: str = "structure", **kwargs
    ) -> OctreeTokens:
        """Molecules with atomic numbers (N,), positions (N, 3) Å, counts (B,) -> tokens (types = vocab ids)."""
        kwargs.setdefault("cutoff", self.cutoff)
        return tokenize_batch(self.vocab.element_ids(numbers, source), positions, counts, self.spec, **kwargs)

    def tokenize(self, numbers: np.ndarray, positions: np.ndarray, **kwargs) -> OctreeTokens:
        """One molecule: atomic numbers (N,), positions (N, 3) Å."""
        return self.tokenize_batch(numbers, positions, np.array([len(np.asarray(numbers))]), **kwargs)

    def detokenize(self, tokens: OctreeTokens) -> tuple[np.ndarray, np.ndarray]:
        """Atomic numbers (A,) int64 and positions (A, 3) float64 Å of all structures (CSR ``tokens.atom_ptr``)."""
        types, positions, _ = detokenize(tokens)
        return self.vocab.atomic_numbers(types), positions

    def tokenize_crystal(self, numbers: np.ndarray, positions: np.ndarray, lattice: np.ndarray) -> CrystalTokens:
        """One crystal: atomic numbers (N,), Cartesian positions (N, 3) Å, lattice rows a, b, c (3, 3) Å.

        Atoms are wrapped into the unit cell (fractional coordinates mod 1) before tokenization, as
        in the reference; the inverse returns the wrapped positions.
        """
        lattice = np.asarray(lattice, dtype=np.float64)
        if lattice.shape != (3, 3) or abs(np.linalg.det(lattice)) < 1e-6:
            raise DataFormatError(f"lattice: expected a non-singular (3, 3) matrix of row vectors, got {lattice}")
        frac = np.asarray(positions, dtype=np.float64) @ np.linalg.inv(lattice)
        cart = (frac % 1.0) @ lattice
        corners = _CHILD_OFFSETS.astype(np.float64) @ lattice
        center = corners.mean(0, keepdims=True)
        lat = tokenize_batch(self.vocab.lattice_ids(), corners, np.array([8]), self.spec, center=center)
        atoms = tokenize_batch(
            self.vocab.element_ids(numbers, "crystal"), cart, np.array([len(cart)]), self.spec, center=center
        )
        return CrystalTokens(lat, atoms)

    def tokenize_crystals(
        self, numbers: np.ndarray, positions: np.ndarray, lattices: np.ndarray, counts: np.ndarray,
        shift: np.ndarray | None = None,
    ) -> CrystalTokens:  # fmt: skip
        """``B`` crystals at once: numbers (N,), Cartesian positions (N, 3) Å, lattices (B, 3, 3) Å
        (rows a, b, c), counts (B,); ``shift`` (B, 3) whole cells, applied to both trees alike."""
        lattices = np.asarray(lattices, dtype=np.float64).reshape(-1, 3, 3)
        counts = np.asarray(counts, dtype=np.int64)
        det = np.linalg.det(lattices)
        if (np.abs(det) < 1e-6).any():
            raise DataFormatError(f"lattices: crystal {int(np.flatnonzero(np.abs(det) < 1e-6)[0])} has a singular cell")
        mol = np.repeat(np.arange(len(counts)), counts)
        frac = np.einsum("ni,nij->nj", np.asarray(positions, np.float64), np.linalg.inv(lattices)[mol]) % 1.0
        cart = np.einsum("ni,nij->nj", frac, lattices[mol])
        corners = np.einsum("ci,bij->bcj", _CHILD_OFFSETS.astype(np.float64), lattices)  # (B, 8, 3)
        center = corners.mean(1)
        if shift is not None:  # a whole-cell shift of the shared frame, identical for both trees
            center = center - np.asarray(shift, np.float64).reshape(-1, 3) * self.spec.cell
        lat = tokenize_batch(np.tile(self.vocab.lattice_ids(), len(counts)), corners.reshape(-1, 3),
                             np.full(len(counts), 8), self.spec, center=center)  # fmt: skip
        atoms = tokenize_batch(self.vocab.element_ids(numbers, "crystal"), cart, counts, self.spec, center=center)
        return CrystalTokens(lat, atoms)

    def detokenize_crystal(self, tokens: CrystalTokens) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Atomic numbers (N,), wrapped Cartesian positions (N, 3) Å, lattice (3, 3) Å (within one bin per component)."""
        corner_ids, corners, _ = detokenize(tokens.lattice)
        which = corner_ids - self.vocab.lattice_offset
        if sorted(which.tolist()) != list(range(8)):
            raise DataFormatError("crystal tokens: the lattice tree must hold each of the eight corners once")
        by_corner = np.empty((8, 3))
        by_corner[which] = corners
        lattice = by_corner[[1, 2, 4]] - by_corner[0]
        numbers, positions = self.detokenize(tokens.atoms)
        return numbers, positions, lattice

    def tokenize_protein(self, residues: list[str], positions: np.ndarray) -> OctreeTokens:
        """A Cα trace: residue names (N,) three-letter, Cα positions (N, 3) Å; types are ``<RES>_CA`` ids."""
        return tokenize_batch(
            self.vocab.residue_ids(residues), positions, np.array([len(positions)]), self.spec, cutoff=self.cutoff
        )

    def to_json(self, tokens: OctreeTokens) -> dict:
        """A JSON-ready dict of a token batch: spec, and per structure tree masks, atom tokens, offsets, origin."""
        structures = []
        for b in range(len(tokens)):
            one = tokens[b]
            structures.append(
                {
                    "tree": one.tree.tolist(),
                    "atoms": [self.vocab.tokens[i] for i in one.atom_type.tolist()],
                    "xyz": one.atom_xyz.tolist(),
                    "origin": one.origin[0].tolist(),
                    "atom_index": one.atom_index.tolist(),
                    "cropped": int(one.cropped[0]) if len(one.cropped) else 0,
                }
            )
        spec = {"cell": self.spec.cell, "resolution": self.spec.resolution, "depth": self.spec.depth}
        return {"format": "threefold-uni3dar-tokens/1", "spec": spec, "structures": structures}

    def from_json(self, data: dict, source: str = "tokens.json") -> OctreeTokens:
        """Inverse of :meth:`to_json`; the tree-derived fields are rebuilt from the masks."""
        if data.get("format") != "threefold-uni3dar-tokens/1":
            raise DataFormatError(f"{source}: field 'format' must be 'threefold-uni3dar-tokens/1'")
        try:
            spec = OctreeSpec(float(data["spec"]["cell"]), float(data["spec"]["resolution"]), int(data["spec"]["depth"]))
            structs = data["structures"]
            tree = [np.asarray(s["tree"], np.int64) for s in structs]
            atoms = [self.vocab.symbol_ids(s["atoms"]) for s in structs]
            xyz = [np.asarray(s["xyz"], np.int64).reshape(-1, 3) for s in structs]
            origin = np.asarray([s["origin"] for s in structs], np.float64).reshape(-1, 3)
            index = [np.asarray(s["atom_index"], np.int64) for s in structs]
        except (KeyError, TypeError, ValueError) as exc:
            raise DataFormatError(f"{source}: malformed token file ({exc!r})") from exc
        tree_ptr = np.concatenate([[0], np.cumsum([len(t) for t in tree])]).astype(np.int64)
        cells, cell_ptr, levels, node_cells = decode_tree(np.concatenate(tree), tree_ptr, spec.depth)
        atom_ptr = np.concatenate([[0], np.cumsum([len(a) for a in atoms])]).astype(np.int64)
        if not np.array_equal(cell_ptr, atom_ptr):
            raise DataFormatError(f"{source}: the number of atoms does not match the occupied cells of the tree")
        return OctreeTokens(
            spec, np.concatenate(tree), levels, node_cells, tree_ptr, np.concatenate(atoms), np.concatenate(xyz),
            cells, atom_ptr, np.concatenate(index), origin, np.zeros(len(structs), np.int64),
        )
