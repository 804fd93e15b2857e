"""BSP-Net's evaluation protocol: surface points with normals, CD, NC, edge CD and mesh counts.

Chen et al., CVPR 2020, Sec. 4 and the reference ``evaluation/`` folder (czq142857/BSP-NET-original):

- predicted shape: 16384 area-weighted points with face normals on the output polygons; a point is
  discarded when ``point + 1e-4 * normal`` lies inside the shape (it sits on a face interior to the
  union of convexes); 4096 of the rest are kept at random;
- ground truth: 4096 area-weighted points with normals on the reference surface;
- CD: mean squared nearest-neighbour distance, both directions summed (reported x1000);
- NC: mean ``|n . n'|`` of nearest neighbours, both directions averaged;
- ECD: the CD between *edge points* (points with a neighbour within squared distance 1e-4 whose normal
  makes ``|n . n'| < 0.1``), at most 4096 each.

Coordinates are in the IM-NET unit cube (no units). Every random choice takes a ``numpy`` seed.
Difference from the reference: an empty edge set gives ``ECD = nan`` (the reference substitutes one
point at the origin, which turns a missing edge set into an arbitrary number).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.spatial import ConvexHull

from threefold.geometry.bspnet.extraction import BSPMesh, ConvexPart, convex_polytope
from threefold.geometry.chamfer import chamfer_distance, normal_consistency


def sample_triangles(
    vertices: np.ndarray, triangles: np.ndarray, n: int, seed: int | np.random.Generator = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` area-weighted points on a triangle mesh with the unit normal of their triangle.

    vertices (V, 3) float, triangles (F, 3) int (CCW from outside for outward normals).
    Returns points (n, 3) and normals (n, 3), float64.
    """
    rng = np.random.default_rng(seed)
    a, b, c = (np.asarray(vertices, np.float64)[triangles[:, k]] for k in range(3))
    cross = np.cross(b - a, c - a)
    area = np.linalg.norm(cross, axis=1)
    if len(area) == 0 or area.sum() <= 0:
        raise ValueError("sample_triangles: the mesh has no triangle of positive area")
    face = rng.choice(len(area), size=n, p=area / area.sum())
    r1, r2 = rng.random(n), rng.random(n)
    s = np.sqrt(r1)  # uniform barycentrics (Osada et al. 2002)
    points = (1 - s)[:, None] * a[face] + (s * (1 - r2))[:, None] * b[face] + (s * r2)[:, None] * c[face]
    normals = cross[face] / area[face, None]
    return points, normals


def inside_union(points: np.ndarray, parts: list[ConvexPart], chunk: int = 4096) -> np.ndarray:
    """(N,) bool: the point lies strictly inside at least one convex part (all half-spaces < 0)."""
    if not parts:
        return np.zeros(len(points), dtype=bool)
    kmax = max(len(p.halfspaces) for p in parts)
    pad = np.tile(np.array([0.0, 0.0, 0.0, -1.0]), (len(parts), kmax, 1))  # always-satisfied plane
    for i, p in enumerate(parts):
        pad[i, : len(p.halfspaces)] = p.halfspaces
    out = np.empty(len(points), dtype=bool)
    for s in range(0, len(points), chunk):
        x = points[s : s + chunk]
        worst = (np.einsum("nd,ckd->nck", x, pad[:, :, :3]) + pad[:, :, 3]).max(-1)
        out[s : s + chunk] = (worst < 0).any(-1)
    return out


def surface_points(
    mesh: BSPMesh, n_sample: int = 16384, n_keep: int = 4096, offset: float = 1e-4, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The predicted-shape points of the protocol: sample ``n_sample``, drop interior-face points,
    keep ``n_keep`` at random (all of them when fewer survive). Returns points and normals (n, 3)."""
    rng = np.random.default_rng(seed)
    points, normals = sample_triangles(mesh.vertices, mesh.triangles, n_sample, rng)
    exposed = ~inside_union(points + offset * normals, mesh.parts)
    points, normals = points[exposed], normals[exposed]
    order = rng.permutation(len(points))[:n_keep]
    return points[order], normals[order]


def convex_hull_mesh(points: np.ndarray) -> BSPMesh:
    """The convex hull of a point set as a one-part :class:`BSPMesh` (the baseline of acceptance 3)."""
    hull = ConvexHull(np.asarray(points, np.float64))
    part = convex_polytope(hull.equations, bound=None)
    return BSPMesh(parts=[part])


def edge_points(points: np.ndarray, normals: np.ndarray, n_keep: int = 4096, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Points on sharp edges (reference ``edge_from_point.py``): some neighbour within squared distance
    1e-4 has ``|n . n'| < 0.1``. At most ``n_keep`` are kept at random."""
    x = torch.as_tensor(points, dtype=torch.float64)
    n = torch.as_tensor(normals, dtype=torch.float64)
    n = n / n.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    is_edge = torch.zeros(len(x), dtype=torch.bool)
    for s in range(0, len(x), 1024):
        close = torch.cdist(x[s : s + 1024], x).square() < 1e-4
        sharp = (n[s : s + 1024] @ n.T).abs() < 0.1
        is_edge[s : s + 1024] = (close & sharp).any(-1)
    keep = np.flatnonzero(is_edge.numpy())
    keep = np.random.default_rng(seed).permutation(keep)[:n_keep]
    return points[keep], normals[keep]


def bspnet_metrics(
    pred_points: np.ndarray, pred_normals: np.ndarray, gt_points: np.ndarray, gt_normals: np.ndarray, seed: int = 0
) -> dict[str, float]:
    """CD (x1000), NC and ECD (x1000) of one shape, from the protocol's point sets (n, 3) each."""
    p, pn = torch.as_tensor(pred_points, dtype=torch.float64), torch.as_tensor(pred_normals, dtype=torch.float64)
    g, gn = torch.as_tensor(gt_points, dtype=torch.float64), torch.as_tensor(gt_normals, dtype=torch.float64)
    cd = float(chamfer_distance(p, g, squared=True, reduction="sum"))
    nc = float(normal_consistency(p, pn, g, gn))
    pe, _ = edge_points(pred_points, pred_normals, seed=seed)
    ge, _ = edge_points(gt_points, gt_normals, seed=seed)
    if len(pe) and len(ge):
        pe_t, ge_t = torch.as_tensor(pe, dtype=torch.float64), torch.as_tensor(ge, dtype=torch.float64)
        ecd = float(chamfer_distance(pe_t, ge_t, squared=True, reduction="sum"))
    else:
        ecd = float("nan")
    return {"cd_x1000": cd * 1000, "nc": nc, "ecd_x1000": ecd * 1000, "num_edge_points": float(len(pe))}

