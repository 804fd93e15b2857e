"""Turn meshes into the IM-NET / BSP-Net training format: 64^3 voxels and progressive point samples.

Chen and Zhang, "Learning Implicit Fields for Generative Shape Modeling" (IM-NET, CVPR 2019), data
preparation ``point_sampling/2_gather_256vox_16_32_64.py``, used unchanged by BSP-Net (CVPR 2020):

1. the shape is normalised into the unit cube ``[-0.5, 0.5]^3`` and its inside/outside is decided at
   the centres of a 256^3 grid (cell ``i`` has centre ``(i + 0.5)/256 - 0.5``);
2. ``voxels`` is the 64^3 max-pool of that occupancy;
3. progressive point samples, coordinates stored as uint8 indices of the 256^3 grid:
   ``points_16``: 4096, one per 16^3 block (a 256-grid cell of the block whose value equals the block's);
   ``points_32``: 4096, ``points_64``: 16384, first the blocks on the surface (3x3x3 neighbourhood not
   constant) visited in the reference's strided order, then random other blocks to fill.

Inside/outside is a ray-parity test on closed triangle meshes, vectorised over (triangle, ray) pairs,
run along x, y and z and decided by majority (a ray grazing an edge or vertex can flip one axis).
Overlapping closed bodies (e.g. the parts of a procedural shape or separate ShapeNet components) are
tested one connected component at a time and united, so overlaps count as inside.

Differences from the reference, and why: the reference picks the sub-cell of a block by a fixed search
around the block centre; here it is drawn uniformly among the sub-cells with the block's value (a seeded
choice, same distribution support). The reference carves a 256^3 voxelisation from three views; here the
mesh itself is tested, which needs a watertight input (a non-watertight mesh is refused with the count
of its open edges rather than silently filled).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
from scipy.ndimage import maximum_filter, minimum_filter
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from threefold.datasets.errors import DataFormatError, MissingFileError, require

#: Points per resolution in the IM-NET files.
POINT_COUNTS: dict[int, int] = {16: 4096, 32: 4096, 64: 16384}
MESH_SUFFIXES = (".obj", ".off", ".ply", ".stl")


def load_mesh(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a triangle mesh (``.obj``, ``.off``, ``.ply``, ``.stl``) with trimesh, duplicate vertices merged.

    Returns vertices (V, 3) float64 and triangles (F, 3) int64. Raises :class:`MissingFileError` or
    :class:`DataFormatError` (unknown suffix, unreadable file, no triangles, a NaN / inf vertex, a face
    index outside the vertices).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: mesh file not found")
    if path.suffix.lower() not in MESH_SUFFIXES:
        raise DataFormatError(f"{path}: unsupported mesh suffix {path.suffix!r}; expected one of {MESH_SUFFIXES}")
    trimesh = require("trimesh", extra="points")
    # Loaded unprocessed so that the file's own vertices and faces are checked: processing would
    # silently drop a non-finite vertex together with its triangles.
    try:
        raw = trimesh.load(path, force="mesh", process=False)
    except Exception as exc:  # trimesh's loaders raise ValueError, IndexError, KeyError... for a malformed file
        raise DataFormatError(f"{path}: not a readable mesh ({type(exc).__name__}: {exc})") from exc
    verts = np.asarray(getattr(raw, "vertices", np.zeros((0, 3))), np.float64)
    faces = np.asarray(getattr(raw, "faces", np.zeros((0, 3))), np.int64)
    if len(faces) == 0 or len(verts) == 0:
        raise DataFormatError(f"{path}: the mesh is empty (0 triangles); expected a closed triangle mesh")
    bad = ~np.isfinite(verts).all(axis=1)
    if bad.any():
        raise DataFormatError(f"{path}: {int(bad.sum())} vertices (first: index {int(np.argmax(bad))}) have NaN / inf coordinates")
    if faces.min() < 0 or faces.max() >= len(verts):
        raise DataFormatError(f"{path}: face indices span {faces.min()}..{faces.max()}; expected 0..{len(verts) - 1}")
    mesh = trimesh.Trimesh(verts, faces, process=True)  # duplicate vertices merged, as before
    return np.asarray(mesh.vertices, np.float64), np.asarray(mesh.faces, np.int64)


def open_edge_count(triangles: np.ndarray) -> int:
    """Number of undirected edges not shared by exactly two triangles (0 for a closed 2-manifold)."""
    edges = np.sort(np.concatenate([triangles[:, [0, 1]], triangles[:, [1, 2]], triangles[:, [2, 0]]]), axis=1)
    _, counts = np.unique(edges, axis=0, return_counts=True)
    return int((counts != 2).sum())


def normalize_to_unit_cube(vertices: np.ndarray, margin: float = 1 / 64) -> np.ndarray:
    """Centre the bounding box at the origin and scale its longest side to ``1 - 2 margin``."""
    lo, hi = vertices.min(0), vertices.max(0)
    extent = float((hi - lo).max())
    if extent <= 0:
        raise DataFormatError("normalize_to_unit_cube: the mesh has zero extent")
    return (vertices - (lo + hi) / 2) * ((1 - 2 * margin) / extent)


def _edge(u: np.ndarray, v: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """2D edge function of (u -> v) at p, computed in a canonical vertex order so that the two
    triangles sharing an edge get bitwise-opposite values (the tie-break below relies on it)."""
    swap = (u[:, 0] > v[:, 0]) | ((u[:, 0] == v[:, 0]) & (u[:, 1] > v[:, 1]))
    a = np.where(swap[:, None], v, u)
    b = np.where(swap[:, None], u, v)
    w = (b[:, 0] - a[:, 0]) * (py - a[:, 1]) - (b[:, 1] - a[:, 1]) * (px - a[:, 0])
    return np.where(swap, -w, w), swap


def _parity_along_z(g: np.ndarray, tri: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Occupancy of ``shape`` cell centres by +z ray parity; ``g`` are vertices in grid units of that
    (sub-)grid, cell centre ``(i, j, k)`` at ``(i, j, k)``."""
    X, Y, Z = shape
    a, b, c = g[tri[:, 0]], g[tri[:, 1]], g[tri[:, 2]]
    xy = np.stack([a[:, :2], b[:, :2], c[:, :2]], axis=1)
    lo = np.maximum(np.ceil(xy.min(1)), 0).astype(np.int64)
    hi = np.minimum(np.floor(xy.max(1)), [X - 1, Y - 1]).astype(np.int64)
    nx, ny = np.maximum(hi[:, 0] - lo[:, 0] + 1, 0), np.maximum(hi[:, 1] - lo[:, 1] + 1, 0)
    count = nx * ny
    t = np.repeat(np.arange(len(tri)), count)
    k = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    ix, iy = lo[t, 0] + k // ny[t], lo[t, 1] + k % ny[t]
    px, py = ix.astype(np.float64), iy.astype(np.float64)
    A, B, C = a[t, :2], b[t, :2], c[t, :2]
    w0, s0 = _edge(B, C, px, py)
    w1, s1 = _edge(C, A, px, py)
    w2, s2 = _edge(A, B, px, py)
    area = w0 + w1 + w2
    sign = np.sign((b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0]))[t]

    def covers(w: np.ndarray, swapped: np.ndarray) -> np.ndarray:
        # A ray through a shared edge belongs to the triangle on the canonical edge's positive side.
        side = np.where(swapped, -sign, sign)
        return (w * sign > 0) | ((w == 0) & (side > 0))

    hit = (sign != 0) & covers(w0, s0) & covers(w1, s1) & covers(w2, s2)
    t, ix, iy = t[hit], ix[hit], iy[hit]
    lam = np.stack([w0[hit], w1[hit], w2[hit]], 1) / area[hit, None]
    z = lam[:, 0] * a[t, 2] + lam[:, 1] * b[t, 2] + lam[:, 2] * c[t, 2]
    bin_ = np.clip(np.floor(z).astype(np.int64) + 1, 0, Z)  # first cell centre above the hit
    hist = np.bincount((ix * Y + iy) * (Z + 1) + bin_, minlength=X * Y * (Z + 1)).reshape(X, Y, Z + 1)
    return (np.cumsum(hist[:, :, :Z], axis=2, dtype=np.int32) % 2).astype(bool)


def occupancy_from_closed_mesh(vertices: np.ndarray, triangles: np.ndarray, resolution: int = 256) -> np.ndarray:
    """(R, R, R) bool inside test at the grid cell centres of one closed mesh (unit-cube coordinates),
    by ray parity along x, y and z with a majority vote, computed within the mesh's bounding box."""
    R = resolution
    g = (np.asarray(vertices, np.float64)[np.unique(triangles)] + 0.5) * R - 0.5
    occ = np.zeros((R,) * 3, dtype=bool)
    lo = np.clip(np.ceil(g.min(0)), 0, R).astype(np.int64)
    hi = np.clip(np.floor(g.max(0)), -1, R - 1).astype(np.int64)
    if np.any(hi < lo):
        return occ
    shape = tuple(int(s) for s in hi - lo + 1)
    local = (np.asarray(vertices, np.float64) + 0.5) * R - 0.5 - lo
    votes = np.zeros(shape, dtype=np.int8)
    for axis in range(3):
        perm = [k for k in range(3) if k != axis] + [axis]
        sub = _parity_along_z(local[:, perm], triangles, tuple(shape[k] for k in perm))
        votes += np.moveaxis(sub, [0, 1, 2], perm).astype(np.int8)
    occ[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1] = votes >= 2
    return occ


def connected_bodies(triangles: np.ndarray, num_vertices: int) -> list[np.ndarray]:
    """Split a triangle list into its vertex-connected components (lists of triangle indices)."""
    rows = np.repeat(triangles[:, 0], 2)
    cols = triangles[:, 1:].reshape(-1)
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(num_vertices, num_vertices))
    _, label = connected_components(graph, directed=False)
    tri_label = label[triangles[:, 0]]
    return [np.flatnonzero(tri_label == lab) for lab in np.unique(tri_label)]


def occupancy_from_mesh(vertices: np.ndarray, triangles: np.ndarray, resolution: int = 256, name: str = "mesh") -> np.ndarray:
    """Union of the occupancies of the mesh's connected bodies, each of which must be closed.

    Raises :class:`DataFormatError` naming ``name`` when a body has open or non-manifold edges.
    """
    occ = np.zeros((resolution,) * 3, dtype=bool)
    for body in connected_bodies(triangles, len(vertices)):
        tri = triangles[body]
        bad = open_edge_count(tri)
        if bad:
            raise DataFormatError(
                f"{name}: not watertight: {bad} edges are not shared by exactly two triangles "
                f"(in a body of {len(tri)} triangles); inside/outside needs closed surfaces"
            )
        occ |= occupancy_from_closed_mesh(vertices, tri, resolution)
    return occ


def voxels_from_occupancy(occ256: np.ndarray, resolution: int = 64) -> np.ndarray:
    """Max-pool a (256, 256, 256) occupancy to (R, R, R) uint8 (a cell is 1 if any sub-cell is)."""
    m = occ256.shape[0] // resolution
    return occ256.reshape(resolution, m, resolution, m, resolution, m).max(axis=(1, 3, 5)).astype(np.uint8)


def _pick_subcells(occ256: np.ndarray, cells: np.ndarray, resolution: int, rng: np.random.Generator):
    """For each coarse cell (n, 3), one 256-grid cell inside it with the coarse value; uint8 (n, 3), (n, 1)."""
    m = 256 // resolution
    blocks = occ256.reshape(resolution, m, resolution, m, resolution, m).transpose(0, 2, 4, 1, 3, 5)
    sub = blocks[cells[:, 0], cells[:, 1], cells[:, 2]].reshape(len(cells), -1)
    target = sub.max(1)
    keys = rng.random(sub.shape, dtype=np.float32)
    keys[sub != target[:, None]] = -1.0
    local = np.stack(np.unravel_index(keys.argmax(1), (m, m, m)), axis=1)
    return (cells * m + local).astype(np.uint8), target.astype(np.uint8)[:, None]


def _reference_order(resolution: int) -> np.ndarray:
    """Coarse cells in the reference's visiting order: j outer, i middle, k inner over 1,5,9..,2,6,.."""
    order = np.concatenate([np.arange(s, resolution - 1, 4) for s in (1, 2, 3, 4)])
    j, i, k = np.meshgrid(order, order, order, indexing="ij")
    return np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1)


def sample_points(occ256: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """IM-NET progressive point samples from a (256, 256, 256) bool occupancy.

    Returns ``points_16|32|64`` uint8 (n, 3) indices in the 256 grid and ``values_16|32|64`` uint8 (n, 1).
    """
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for res in (64, 32, 16):
        n = POINT_COUNTS[res]
        if res == 16:
            cells = np.stack(np.unravel_index(np.arange(res**3), (res,) * 3), axis=1)
        else:
            vox = voxels_from_occupancy(occ256, res)
            surface = maximum_filter(vox, size=3) != minimum_filter(vox, size=3)
            ordered = _reference_order(res)
            cells = ordered[surface[ordered[:, 0], ordered[:, 1], ordered[:, 2]]][:n]
            if len(cells) < n:
                taken = np.zeros((res,) * 3, dtype=bool)
                taken[cells[:, 0], cells[:, 1], cells[:, 2]] = True
                free = np.flatnonzero(~taken.ravel())
                extra = rng.choice(free, size=n - len(cells), replace=False)
                cells = np.concatenate([cells, np.stack(np.unravel_index(extra, (res,) * 3), axis=1)])
        out[f"points_{res}"], out[f"values_{res}"] = _pick_subcells(occ256, cells, res, rng)
    return out


def prepare_occupancy(occ256: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """One shape's IM-NET record from its 256^3 occupancy: ``voxels`` (64, 64, 64, 1) uint8 plus the points."""
    if occ256.shape != (256, 256, 256):
        raise DataFormatError(f"prepare_occupancy: occupancy shape {occ256.shape}, expected (256, 256, 256)")
    if not occ256.any():
        raise DataFormatError("prepare_occupancy: the occupancy is empty (no cell inside the shape)")
    record = {"voxels": voxels_from_occupancy(occ256)[..., None]}
    record.update(sample_points(occ256, seed))
    return record


def prepare_mesh(vertices: np.ndarray, triangles: np.ndarray, seed: int = 0, name: str = "mesh", normalize: bool = True) -> dict[str, np.ndarray]:
    """IM-NET record of one closed mesh (normalised into the unit cube unless ``normalize=False``)."""
    if len(triangles) == 0:
        raise DataFormatError(f"{name}: the mesh is empty (0 triangles)")
    verts = normalize_to_unit_cube(vertices) if normalize else np.asarray(vertices, np.float64)
    return prepare_occupancy(occupancy_from_mesh(verts, triangles, 256, name), seed)


def prepare_mesh_files(paths: Iterable[str | Path], seed: int = 0, progress: bool = True) -> tuple[list[str], dict[str, np.ndarray]]:
    """Prepare every mesh file (with a progress bar); returns the names and the stacked records
    (``voxels`` (N, 64, 64, 64, 1), ``points_R`` (N, n, 3), ``values_R`` (N, n, 1), all uint8)."""
    from tqdm import tqdm

    paths = [Path(p) for p in paths]
    if not paths:
        raise MissingFileError("prepare_mesh_files: no mesh files given")
    records = []
    for k, path in enumerate(tqdm(paths, desc="voxelising meshes", disable=not progress)):
        verts, tris = load_mesh(path)
        records.append(prepare_mesh(verts, tris, seed=seed + k, name=str(path)))
    return [p.stem for p in paths], {key: np.stack([r[key] for r in records]) for key in records[0]}


def mesh_files(folder: str | Path) -> list[Path]:
    """The mesh files of a folder (recursive), sorted, with the suffixes of :data:`MESH_SUFFIXES`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFileError(f"{folder}: mesh folder not found")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in MESH_SUFFIXES)
    if not files:
        raise MissingFileError(f"{folder}: no mesh files ({', '.join(MESH_SUFFIXES)}) found")
    return files
