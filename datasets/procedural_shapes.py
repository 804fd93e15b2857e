"""Procedural toy shapes for BSP-Net's embedded sample: chairs, tables, lamps and planes built as
unions of convex primitives (boxes, n-gon cylinders, wedges, frusta).

Every part is a closed convex triangle mesh *and* its half-space description ``n . x + d <= 0``
(unit normals), so the ground-truth shape is exactly a union of convexes: the inside test is exact,
and the same evaluation protocol as for BSP-Net's output applies. Shapes are voxelised by the mesh
preparation step (:mod:`threefold.datasets.mesh_prepare`), like a user's meshes.

Coordinates: the IM-NET unit cube ``[-0.5, 0.5]^3``, y up, shapes kept within ``[-0.45, 0.45]``.
Sizes are drawn from a ``numpy`` Generator seeded per shape, so shape ``(category, seed)`` is fixed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import ConvexHull

CATEGORIES: tuple[str, ...] = ("chair", "table", "lamp", "plane")


@dataclass
class ConvexPrimitive:
    """vertices (V, 3) float64; triangles (F, 3) int64 CCW from outside; halfspaces (K, 4) unit-normal."""

    vertices: np.ndarray
    triangles: np.ndarray
    halfspaces: np.ndarray


@dataclass
class ProceduralShape:
    name: str
    category: str
    parts: list[ConvexPrimitive]

    def mesh(self) -> tuple[np.ndarray, np.ndarray]:
        """All parts as one triangle soup: vertices (V, 3), triangles (F, 3) (parts overlap)."""
        offsets = np.cumsum([0] + [len(p.vertices) for p in self.parts])
        verts = np.concatenate([p.vertices for p in self.parts])
        tris = np.concatenate([p.triangles + offsets[i] for i, p in enumerate(self.parts)])
        return verts, tris

    def contains(self, points: np.ndarray) -> np.ndarray:
        """(N,) bool: inside (or on) at least one part."""
        inside = np.zeros(len(points), dtype=bool)
        for p in self.parts:
            inside |= (points @ p.halfspaces[:, :3].T + p.halfspaces[:, 3]).max(1) <= 1e-12
        return inside


def convex_primitive(points: np.ndarray) -> ConvexPrimitive:
    """The convex hull of ``points`` (M, 3) as a closed mesh with outward CCW triangles."""
    hull = ConvexHull(np.asarray(points, np.float64))
    remap = np.full(len(points), -1, dtype=np.int64)
    remap[hull.vertices] = np.arange(len(hull.vertices))
    verts = hull.points[hull.vertices]
    tri = remap[hull.simplices]
    a, b, c = verts[tri[:, 0]], verts[tri[:, 1]], verts[tri[:, 2]]
    flip = (np.cross(b - a, c - a) * hull.equations[:, :3]).sum(1) < 0
    tri[flip] = tri[flip][:, [0, 2, 1]]
    planes = np.unique(np.round(hull.equations, 12), axis=0)
    return ConvexPrimitive(verts, tri, planes)


def box(lo, hi) -> ConvexPrimitive:
    """Axis-aligned box between corners ``lo`` and ``hi``."""
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    return convex_primitive(corners)


def cylinder(center, radius: float, half_height: float, axis: int = 1, sides: int = 12, top_radius: float | None = None) -> ConvexPrimitive:
    """An n-gon prism (or frustum when ``top_radius`` differs) along ``axis`` centred at ``center``."""
    ang = 2 * np.pi * (np.arange(sides) + 0.5) / sides
    ring = np.stack([np.cos(ang), np.sin(ang)], axis=1)
    other = [k for k in range(3) if k != axis]
    pts = []
    for h, r in ((-half_height, radius), (half_height, radius if top_radius is None else top_radius)):
        p = np.zeros((sides, 3))
        p[:, axis] = h
        p[:, other] = ring * r
        pts.append(p)
    return convex_primitive(np.concatenate(pts) + np.asarray(center, float))


def wedge(base_lo, base_hi, apex_height: float) -> ConvexPrimitive:
    """A triangular prism: a box footprint whose top face narrows to a ridge (along z) at ``apex_height``."""
    lo, hi = np.asarray(base_lo, float), np.asarray(base_hi, float)
    base = np.array([[x, lo[1], z] for x in (lo[0], hi[0]) for z in (lo[2], hi[2])])
    mid = (lo[0] + hi[0]) / 2
    ridge = np.array([[mid, lo[1] + apex_height, lo[2]], [mid, lo[1] + apex_height, hi[2]]])
    return convex_primitive(np.concatenate([base, ridge]))


def _chair(rng: np.random.Generator) -> list[ConvexPrimitive]:
    w, d = rng.uniform(0.28, 0.38), rng.uniform(0.28, 0.36)
    seat_y, t = rng.uniform(-0.1, 0.0), rng.uniform(0.04, 0.07)
    leg = rng.uniform(0.035, 0.06)
    back_h = rng.uniform(0.3, 0.42)
    parts = [box([-w, seat_y - t, -d], [w, seat_y, d])]
    for sx in (-1, 1):
        for sz in (-1, 1):
            x0, z0 = (sx * (w - leg)), (sz * (d - leg))
            parts.append(box([x0 - leg, -0.45, z0 - leg], [x0 + leg, seat_y - t, z0 + leg]))
    parts.append(box([-w, seat_y, d - 0.06], [w, min(seat_y + back_h, 0.45), d]))
    return parts


def _table(rng: np.random.Generator) -> list[ConvexPrimitive]:
    w, d = rng.uniform(0.35, 0.45), rng.uniform(0.25, 0.4)
    top_y, t = rng.uniform(0.05, 0.2), rng.uniform(0.04, 0.07)
    parts = [box([-w, top_y - t, -d], [w, top_y, d])]
    if rng.random() < 0.5:
        leg = rng.uniform(0.035, 0.06)
        for sx in (-1, 1):
            for sz in (-1, 1):
                x0, z0 = sx * (w - leg - 0.02), sz * (d - leg - 0.02)
                parts.append(box([x0 - leg, -0.45, z0 - leg], [x0 + leg, top_y - t, z0 + leg]))
    else:  # pedestal table
        parts.append(cylinder([0, (top_y - t - 0.4) / 2, 0], rng.uniform(0.04, 0.07), (top_y - t + 0.4) / 2))
        parts.append(cylinder([0, -0.43, 0], rng.uniform(0.18, 0.25), 0.02))
    return parts


def _lamp(rng: np.random.Generator) -> list[ConvexPrimitive]:
    base_r = rng.uniform(0.12, 0.18)
    pole_top = rng.uniform(0.1, 0.2)
    shade_r = rng.uniform(0.15, 0.25)
    return [
        cylinder([0, -0.42, 0], base_r, 0.03),
        cylinder([0, (pole_top - 0.39) / 2, 0], 0.025, (pole_top + 0.39) / 2, sides=8),
        cylinder([0, pole_top + 0.1, 0], shade_r, 0.12, top_radius=shade_r * 0.5),
    ]


def _plane(rng: np.random.Generator) -> list[ConvexPrimitive]:
    r = rng.uniform(0.05, 0.07)
    span = rng.uniform(0.35, 0.45)
    wing_z = rng.uniform(-0.05, 0.08)
    return [
        cylinder([0, 0, -0.02], r, 0.38, axis=2, sides=10),
        cylinder([0, 0, 0.41], r, 0.05, axis=2, sides=10, top_radius=0.01),  # nose cone
        box([-span, -0.015, wing_z - 0.1], [span, 0.015, wing_z + 0.06]),
        box([-0.16, -0.01, -0.4], [0.16, 0.01, -0.32]),
        wedge([-0.012, r * 0.5, -0.42], [0.012, r * 0.5, -0.3], rng.uniform(0.12, 0.18)),
    ]


_BUILDERS = {"chair": _chair, "table": _table, "lamp": _lamp, "plane": _plane}


def procedural_shape(category: str, seed: int) -> ProceduralShape:
    """One shape of ``category`` (one of :data:`CATEGORIES`) with sizes drawn from ``seed``."""
    if category not in _BUILDERS:
        raise ValueError(f"procedural_shape: unknown category {category!r}; expected one of {CATEGORIES}")
    parts = _BUILDERS[category](np.random.default_rng(seed))
    return ProceduralShape(f"{category}_{seed:03d}", category, parts)


def procedural_dataset(shapes_per_category: int, seed: int = 0, categories: tuple[str, ...] = CATEGORIES) -> list[ProceduralShape]:
    """``shapes_per_category`` shapes of each category; shape ``k`` of a category uses seed ``seed + k``."""
    return [procedural_shape(c, seed + k) for c in categories for k in range(shapes_per_category)]


def procedural_records(shapes: list[ProceduralShape], seed: int = 0, progress: bool = False) -> dict[str, np.ndarray]:
    """IM-NET records of the shapes, voxelised by :func:`threefold.datasets.mesh_prepare.prepare_mesh`
    (already in the unit cube, so not re-normalised); stacked arrays as :func:`write_imnet_hdf5` takes."""
    from tqdm import tqdm

    from threefold.datasets.mesh_prepare import prepare_mesh

    records = []
    for k, shape in enumerate(tqdm(shapes, desc="voxelising procedural shapes", disable=not progress)):
        verts, tris = shape.mesh()
        records.append(prepare_mesh(verts, tris, seed=seed + k, name=shape.name, normalize=False))
    return {key: np.stack([r[key] for r in records]) for key in records[0]}
