"""Exactness of BSP-Net mesh extraction: half-space intersection, closed parts, grid selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial import ConvexHull

from threefold.geometry.bspnet.extraction import (
    convex_polytope,
    extract_bsp_mesh,
    marching_cubes_mesh,
    parts_from_halfspaces,
)


def signed_volume(vertices: np.ndarray, triangles: np.ndarray) -> float:
    """Divergence theorem: sum of signed tetrahedra (origin, triangle); positive for outward CCW."""
    a, b, c = (vertices[triangles[:, k]] for k in range(3))
    return float(np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6)


def assert_closed_oriented(triangles: np.ndarray) -> None:
    """Each undirected edge in exactly two faces, each directed edge exactly once (consistent winding)."""
    directed = np.concatenate([triangles[:, [0, 1]], triangles[:, [1, 2]], triangles[:, [2, 0]]])
    uniq, counts = np.unique(directed, axis=0, return_counts=True)
    assert counts.max() == 1, "a directed edge appears twice: inconsistent orientation"
    undirected = np.sort(directed, axis=1)
    _, ucount = np.unique(undirected, axis=0, return_counts=True)
    assert np.all(ucount == 2), f"edges not shared by exactly two faces: {np.bincount(ucount)}"


def box_halfspaces(lo, hi) -> np.ndarray:
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    eye = np.eye(3)
    return np.concatenate([np.c_[eye, -hi], np.c_[-eye, lo]])


def test_unit_cube_exact():
    part = convex_polytope(box_halfspaces([-0.5] * 3, [0.5] * 3), bound=None)
    assert part is not None
    assert len(part.vertices) == 8
    assert sorted(len(p) for p in part.polygons) == [4] * 6
    assert len(part.triangles) == 12
    corners = {tuple(v) for v in np.round(part.vertices, 12)}
    assert corners == {(x, y, z) for x in (-0.5, 0.5) for y in (-0.5, 0.5) for z in (-0.5, 0.5)}
    assert signed_volume(part.vertices, part.triangles) == pytest.approx(1.0, abs=1e-12)
    assert_closed_oriented(part.triangles)


def test_polygons_planar_and_outward():
    part = convex_polytope(box_halfspaces([-0.3, -0.1, 0.0], [0.2, 0.4, 0.25]), bound=None)
    centroid = part.vertices.mean(0)
    for poly in part.polygons:
        pts = part.vertices[poly]
        # Newell normal of the ordered polygon: its sign encodes the winding.
        nx = np.sum((pts[:, 1] - np.roll(pts[:, 1], -1)) * (pts[:, 2] + np.roll(pts[:, 2], -1)))
        ny = np.sum((pts[:, 2] - np.roll(pts[:, 2], -1)) * (pts[:, 0] + np.roll(pts[:, 0], -1)))
        nz = np.sum((pts[:, 0] - np.roll(pts[:, 0], -1)) * (pts[:, 1] + np.roll(pts[:, 1], -1)))
        n = np.array([nx, ny, nz])
        assert np.dot(n, pts.mean(0) - centroid) > 0
        assert np.abs((pts - pts[0]) @ (n / np.linalg.norm(n))).max() < 1e-12


@pytest.mark.parametrize("seed", range(6))
def test_random_polytopes_match_scipy_hull(seed):
    rng = np.random.default_rng(seed)
    points = rng.normal(size=(rng.integers(8, 40), 3)) * 0.2
    ref = ConvexHull(points)
    # Qhull's facet equations n.x + d <= 0 are exactly the half-space description of the hull.
    part = convex_polytope(ref.equations, bound=None)
    assert part is not None
    assert signed_volume(part.vertices, part.triangles) == pytest.approx(ref.volume, rel=1e-9)
    expected = np.unique(np.round(points[ref.vertices], 9), axis=0)
    got = np.unique(np.round(part.vertices, 9), axis=0)
    np.testing.assert_allclose(got, expected, atol=1e-9)
    assert_closed_oriented(part.triangles)


def test_box_clipping_and_empty_regions():
    # A half-space alone is unbounded; the 0.5-box clip turns it into half the cube.
    part = convex_polytope(np.array([[1.0, 0, 0, 0]]), bound=0.5)
    assert part.volume == pytest.approx(0.5)
    # Contradictory planes x <= -0.1 and x >= 0.1: empty.
    assert convex_polytope(np.array([[1.0, 0, 0, 0.1], [-1.0, 0, 0, 0.1]]), bound=0.5) is None
    # A zero-thickness slab x <= 0 and x >= 0: flat, treated as empty.
    assert convex_polytope(np.array([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]]), bound=0.5) is None


def planes_and_T(convexes: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack per-convex half-spaces into the network's (4, p) planes and (p, c) connections."""
    planes = np.concatenate(convexes).T
    T = np.zeros((planes.shape[1], len(convexes)))
    start = 0
    for i, hs in enumerate(convexes):
        T[start : start + len(hs), i] = 1.0
        start += len(hs)
    return torch.tensor(planes, dtype=torch.float32), torch.tensor(T, dtype=torch.float32)


def test_extract_selects_convexes_and_is_closed():
    seat = box_halfspaces([-0.3, -0.05, -0.3], [0.3, 0.05, 0.3])
    leg = box_halfspaces([-0.3, -0.4, -0.3], [-0.2, -0.05, -0.2])
    inner = box_halfspaces([-0.1, -0.02, -0.1], [0.1, 0.02, 0.1])  # fully inside the seat
    empty = np.array([[1.0, 0, 0, 0.1], [-1.0, 0, 0, 0.1], [0, 1.0, 0, 0], [0, 0, 1.0, 0]])
    sliver = box_halfspaces([0.001, 0.001, 0.001], [0.002, 0.002, 0.002])  # contains no 64^3 cell centre
    planes, T = planes_and_T([seat, leg, inner, empty, sliver])
    mesh = extract_bsp_mesh(planes, T, resolution=64)
    assert [p.index for p in mesh.parts] == [0, 1, 2]
    assert mesh.degenerate == [3]
    volumes = [signed_volume(p.vertices, p.triangles) for p in mesh.parts]
    np.testing.assert_allclose(volumes, [0.6 * 0.1 * 0.6, 0.1 * 0.35 * 0.1, 0.2 * 0.04 * 0.2], rtol=1e-5)
    for p in mesh.parts:
        assert_closed_oriented(p.triangles)
    assert mesh.counts() == {"num_convexes": 3, "num_vertices": 24, "num_faces": 18, "num_triangles": 36}
    assert_closed_oriented(mesh.triangles)

    pruned = extract_bsp_mesh(planes, T, resolution=64, remove_redundant=True)
    # Index order decides: the seat (0) comes first and is not fully covered, the inner box (2) is.
    assert [p.index for p in pruned.parts] == [0, 1] and pruned.redundant == [2]


def test_extract_ignores_small_connections():
    seat = box_halfspaces([-0.3, -0.05, -0.3], [0.3, 0.05, 0.3])
    planes, T = planes_and_T([seat])
    extra = torch.tensor([[0.0], [1.0], [0.0], [-0.0]])  # plane y <= 0 cuts the seat in half...
    planes = torch.cat([planes, extra], dim=1)
    T = torch.cat([T, torch.tensor([[0.005]])])  # ...but its connection is below the 0.01 threshold
    mesh = extract_bsp_mesh(planes, T)
    assert mesh.parts[0].volume == pytest.approx(0.6 * 0.1 * 0.6, rel=1e-6)
    T[-1, 0] = 0.02
    assert extract_bsp_mesh(planes, T).parts[0].volume == pytest.approx(0.6 * 0.05 * 0.6, rel=1e-6)


def test_parts_from_halfspaces_union_volume():
    mesh = parts_from_halfspaces([box_halfspaces([0, 0, 0], [0.2, 0.2, 0.2]), box_halfspaces([0.3] * 3, [0.4] * 3)])
    assert mesh.num_convexes == 2
    assert signed_volume(mesh.vertices, mesh.triangles) == pytest.approx(0.008 + 0.001, rel=1e-9)


def test_marching_cubes_of_box_occupancy():
    R = 32
    occ = np.zeros((R, R, R))
    occ[8:24, 8:24, 8:24] = 1  # cells 8..23: a box of side 16/32 = 0.5 between cell centres
    verts, faces = marching_cubes_mesh(occ)
    vol = signed_volume(verts, faces[:, ::-1]) if signed_volume(verts, faces) < 0 else signed_volume(verts, faces)
    # The 0.5 level set lies half a cell outside the outer cell centres: side 0.5 minus bevelled edges.
    assert 0.5**3 * 0.9 < vol < 0.5**3 * 1.01
    assert verts.min() >= -0.5 and verts.max() <= 0.5
