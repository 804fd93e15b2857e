"""The embedded object sample: labelled procedural shapes sampled to surface point clouds with normals.

A deterministic generator of :data:`CLASSES` (12 classes: primitives and furniture-like assemblies),
each instance with its own proportions, drawn from ``(seed, class, index)``. Every part is a closed
triangle mesh built procedurally as a surface of revolution (a profile polyline in the (radius,
height) half-plane swept about the z axis; 4 sweep segments give boxes and square pyramids), so the
faces are oriented outward by the divergence theorem (sum of ``area * n · (x - c)`` = 3 × volume > 0).
Points are drawn area-weighted over all faces (uniform triangle, barycentric ``sqrt`` trick) and carry
the face's unit normal — the surface sampling of the ModelNet40 resampled release (Qi et al.,
PointNet++, NeurIPS 2017), without any mesh library.

:func:`write_modelnet_layout` writes the sample in the ``modelnet40_normal_resampled`` text layout,
:func:`write_shapenet_layout` in ShapeNet-55's ``.npy`` + list layout and :func:`write_scanobjectnn_layout`
in ScanObjectNN's HDF5 layout, so the pipelines run the real readers of :mod:`threefold.datasets.objects`
on it. Coordinates are unitless (z up), roughly within the unit sphere.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable

import numpy as np

from threefold.datasets.errors import ConfigError, require

Mesh = tuple[np.ndarray, np.ndarray]  # vertices (V, 3) float64, faces (F, 3) int64


def revolve(profile: np.ndarray, segments: int = 32, phase: float = 0.0, closed_profile: bool = False) -> Mesh:
    """Sweep a profile ``(P, 2)`` of (radius >= 0, z) points about the z axis into a triangle mesh.

    A profile that starts and ends on the axis (radius 0) gives a closed surface; ``closed_profile``
    joins its last point to its first (a torus). Faces are oriented outward.
    """
    angles = phase + 2 * math.pi * np.arange(segments) / segments
    r, z = profile[:, 0], profile[:, 1]
    verts = np.stack([r[:, None] * np.cos(angles), r[:, None] * np.sin(angles),
                      np.broadcast_to(z[:, None], (len(r), segments))], -1).reshape(-1, 3)
    rows = len(r) if closed_profile else len(r) - 1
    i = np.arange(rows)[:, None]
    j = np.arange(segments)[None, :]
    a = i * segments + j
    b = i * segments + (j + 1) % segments
    c = ((i + 1) % len(r)) * segments + j
    d = ((i + 1) % len(r)) * segments + (j + 1) % segments
    faces = np.concatenate([np.stack([a, b, d], -1).reshape(-1, 3), np.stack([a, d, c], -1).reshape(-1, 3)])
    return verts, _outward(verts, faces)


def _outward(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    tri = verts[faces]
    cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    signed_volume = (cross * (tri.mean(1) - verts.mean(0))).sum()
    return faces if signed_volume > 0 else faces[:, ::-1].copy()


def _box(size: tuple[float, float, float], center: tuple[float, float, float]) -> Mesh:
    # A 4-segment sweep of a "cylinder" at 45 degrees is a unit square prism; scale it per axis.
    s = math.sqrt(0.5)
    verts, faces = revolve(np.array([[0, -0.5], [s, -0.5], [s, 0.5], [0, 0.5]]), 4, math.pi / 4)
    return verts * np.asarray(size) + np.asarray(center), faces


def _moved(mesh: Mesh, center: tuple[float, float, float], scale: tuple[float, float, float] = (1, 1, 1)) -> Mesh:
    return mesh[0] * np.asarray(scale) + np.asarray(center), mesh[1]


def _arc(radius: float, z0: float, start: float, stop: float, n: int = 12) -> np.ndarray:
    t = np.linspace(start, stop, n)
    return np.stack([radius * np.cos(t), z0 + radius * np.sin(t)], -1)


def _sphere(u: np.ndarray) -> list[Mesh]:
    r = 0.6 + 0.3 * u[0]
    return [_moved(revolve(_arc(1.0, 0.0, -math.pi / 2, math.pi / 2, 16), 32), (0, 0, 0),
                   (r, r * (0.85 + 0.3 * u[1]), r * (0.85 + 0.3 * u[2])))]


def _cube(u: np.ndarray) -> list[Mesh]:
    return [_box(tuple(0.8 + 0.4 * u[:3]), (0, 0, 0))]


def _cylinder(u: np.ndarray) -> list[Mesh]:
    r, h = 0.3 + 0.2 * u[0], 1.0 + 0.6 * u[1]
    return [revolve(np.array([[0, -h / 2], [r, -h / 2], [r, h / 2], [0, h / 2]]), 32)]


def _cone(u: np.ndarray) -> list[Mesh]:
    r, h = 0.4 + 0.3 * u[0], 0.9 + 0.6 * u[1]
    return [revolve(np.array([[0, -h / 2], [r, -h / 2], [0, h / 2]]), 32)]


def _torus(u: np.ndarray) -> list[Mesh]:
    big, small = 0.6 + 0.2 * u[0], 0.12 + 0.12 * u[1]
    circle = _arc(small, 0.0, 0, 2 * math.pi, 17)[:-1] + np.array([big, 0.0])
    return [revolve(circle, 48, closed_profile=True)]


def _capsule(u: np.ndarray) -> list[Mesh]:
    r, h = 0.25 + 0.15 * u[0], 0.6 + 0.6 * u[1]
    profile = np.concatenate([_arc(r, -h / 2, -math.pi / 2, 0, 8), _arc(r, h / 2, 0, math.pi / 2, 8)])
    return [revolve(profile, 32)]


def _pyramid(u: np.ndarray) -> list[Mesh]:
    r, h = 0.6 + 0.3 * u[0], 0.8 + 0.6 * u[1]
    return [revolve(np.array([[0, -h / 2], [r, -h / 2], [0, h / 2]]), 4, math.pi / 4)]


def _legs(w: float, d: float, h: float, t: float, z0: float) -> list[Mesh]:
    return [_box((t, t, h), (sx * (w - t) / 2, sy * (d - t) / 2, z0 + h / 2)) for sx in (-1, 1) for sy in (-1, 1)]


def _chair(u: np.ndarray) -> list[Mesh]:
    w, d, leg, back, t = 0.7 + 0.2 * u[0], 0.7 + 0.2 * u[1], 0.6 + 0.2 * u[2], 0.6 + 0.3 * u[3], 0.06
    z0 = -(leg + back) / 2
    return [*_legs(w, d, leg, t, z0), _box((w, d, t), (0, 0, z0 + leg + t / 2)),
            _box((w, t, back), (0, (d - t) / 2, z0 + leg + t + back / 2))]


def _table(u: np.ndarray) -> list[Mesh]:
    w, d, leg, t = 1.2 + 0.4 * u[0], 0.7 + 0.3 * u[1], 0.6 + 0.2 * u[2], 0.07
    z0 = -(leg + t) / 2
    return [*_legs(w, d, leg, 0.07, z0), _box((w, d, t), (0, 0, z0 + leg + t / 2))]


def _stool(u: np.ndarray) -> list[Mesh]:
    r, leg, t = 0.35 + 0.1 * u[0], 0.6 + 0.3 * u[1], 0.07
    z0 = -(leg + t) / 2
    seat = revolve(np.array([[0, 0], [r, 0], [r, t], [0, t]]), 32)
    legs = [_box((0.06, 0.06, leg), (0.75 * r * math.cos(a), 0.75 * r * math.sin(a), z0 + leg / 2))
            for a in (0.0, 2 * math.pi / 3, 4 * math.pi / 3)]
    return [*legs, _moved(seat, (0, 0, z0 + leg))]


def _lamp(u: np.ndarray) -> list[Mesh]:
    pole, shade = 0.9 + 0.3 * u[0], 0.3 + 0.15 * u[1]
    z0 = -(pole + 0.4) / 2
    base = revolve(np.array([[0, 0], [0.3, 0], [0.3, 0.05], [0, 0.05]]), 32)
    rod = revolve(np.array([[0, 0], [0.03, 0], [0.03, pole], [0, pole]]), 16)
    cone = revolve(np.array([[0, 0], [shade, 0], [0.4 * shade, 0.4], [0, 0.4]]), 32)
    return [_moved(base, (0, 0, z0)), _moved(rod, (0, 0, z0)), _moved(cone, (0, 0, z0 + pole - 0.1))]


def _bottle(u: np.ndarray) -> list[Mesh]:
    r, h, neck = 0.25 + 0.1 * u[0], 0.8 + 0.3 * u[1], 0.08 + 0.04 * u[2]
    profile = np.array([[0, -h / 2], [r, -h / 2], [r, h / 4], [neck, h / 2 - 0.05], [neck, h / 2 + 0.2],
                        [0, h / 2 + 0.2]])
    return [revolve(profile, 32)]


#: Class name -> builder of the instance's parts from 5 uniform draws in [0, 1).
CLASSES: dict[str, Callable[[np.ndarray], list[Mesh]]] = {
    "sphere": _sphere, "cube": _cube, "cylinder": _cylinder, "cone": _cone, "torus": _torus,
    "capsule": _capsule, "pyramid": _pyramid, "chair": _chair, "table": _table, "stool": _stool,
    "lamp": _lamp, "bottle": _bottle,
}


def sample_surface(parts: list[Mesh], num_points: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Area-weighted uniform surface sample of a union of meshes.

    Returns ``points (num_points, 3)`` and ``normals (num_points, 3)`` float64, the unit normal of the
    face each point lies on.
    """
    tris = np.concatenate([v[f] for v, f in parts])  # (F, 3, 3)
    cross = np.cross(tris[:, 1] - tris[:, 0], tris[:, 2] - tris[:, 0])
    area = 0.5 * np.linalg.norm(cross, axis=1)
    face = rng.choice(len(tris), size=num_points, p=area / area.sum())
    r1, r2 = rng.random(num_points), rng.random(num_points)
    s = np.sqrt(r1)
    w = np.stack([1 - s, s * (1 - r2), s * r2], -1)
    points = (w[:, :, None] * tris[face]).sum(1)
    normals = cross[face] / (2 * area[face, None])
    return points, normals


def procedural_object(name: str, index: int, num_points: int = 2048, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Instance ``index`` of class ``name``: ``points (N, 3)`` and unit ``normals (N, 3)``, float64.

    Deterministic in ``(seed, class, index)``; each instance has its own proportions (5 uniform draws)
    and a rotation about the vertical axis of up to ±30 degrees.
    """
    if name not in CLASSES:
        raise ConfigError(f"procedural object class {name!r}; known classes: {', '.join(CLASSES)}")
    rng = np.random.default_rng([seed, list(CLASSES).index(name), index])
    parts = CLASSES[name](rng.random(5))
    points, normals = sample_surface(parts, num_points, rng)
    a = math.radians(rng.uniform(-30, 30))
    rot = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    return points @ rot.T, normals @ rot.T


def _instances(per_class: int, offset: int, num_points: int, seed: int):
    for c, name in enumerate(CLASSES):
        for i in range(per_class):
            yield c, name, i + offset, *procedural_object(name, i + offset, num_points, seed)


def write_modelnet_layout(root: str | os.PathLike, train_per_class: int = 16, test_per_class: int = 8,
                          num_points: int = 2048, seed: int = 0) -> Path:
    """Write the sample as ``modelnet40_normal_resampled``: ``<class>/<class>_NNNN.txt`` rows
    ``x,y,z,nx,ny,nz`` (6 decimals), ``modelnet40_shape_names.txt``, ``modelnet40_{train,test}.txt``.
    Test instances follow the training ones in numbering (``<class>_0017`` …). Returns ``root``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "modelnet40_shape_names.txt").write_text("\n".join(CLASSES) + "\n")
    for split, count, offset in (("train", train_per_class, 0), ("test", test_per_class, train_per_class)):
        stems = []
        for _, name, i, pts, nrm in _instances(count, offset, num_points, seed):
            stem = f"{name}_{i + 1:04d}"
            (root / name).mkdir(exist_ok=True)
            np.savetxt(root / name / f"{stem}.txt", np.concatenate([pts, nrm], 1), fmt="%.6f", delimiter=",")
            stems.append(stem)
        (root / f"modelnet40_{split}.txt").write_text("\n".join(stems) + "\n")
    return root


def write_shapenet_layout(root: str | os.PathLike, train_per_class: int = 16, test_per_class: int = 8,
                          num_points: int = 8192, seed: int = 0) -> Path:
    """Write the sample as ShapeNet-55: ``shapenet_pc/<taxonomy>-<model>.npy`` (N×3 float32) with the
    taxonomy id ``9000000<c>``-style (8 digits, one per class) and ``train.txt`` / ``test.txt``."""
    root = Path(root)
    (root / "shapenet_pc").mkdir(parents=True, exist_ok=True)
    for split, count, offset in (("train", train_per_class, 0), ("test", test_per_class, train_per_class)):
        names = []
        for c, _, i, pts, _ in _instances(count, offset, num_points, seed):
            fname = f"{90000000 + c:08d}-model{i:04d}.npy"
            np.save(root / "shapenet_pc" / fname, pts.astype(np.float32))
            names.append(fname)
        (root / f"{split}.txt").write_text("\n".join(names) + "\n")
    return root


def write_scanobjectnn_layout(root: str | os.PathLike, train_per_class: int = 16, test_per_class: int = 8,
                              num_points: int = 2048, seed: int = 0) -> Path:
    """Write the sample as ScanObjectNN PB_T50_RS (``main_split/{training,test}_objectdataset_augmentedrot_scale75.h5``,
    ``data`` (M, N, 3) float32, ``label`` (M,) int64, ``mask`` (M, N) int32 all object (0)), each cloud
    normalised to the unit sphere and rotated about z by a uniform angle, the "RS" perturbation."""
    h5py = require("h5py", extra="points")
    folder = Path(root) / "main_split"
    folder.mkdir(parents=True, exist_ok=True)
    for split, count, offset in (("training", train_per_class, 0), ("test", test_per_class, train_per_class)):
        data, label = [], []
        for c, _, i, pts, _ in _instances(count, offset, num_points, seed):
            a = np.random.default_rng([seed, 7919, c, i]).uniform(0, 2 * math.pi)
            rot = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
            p = (pts - pts.mean(0)) @ rot.T
            data.append(p / np.linalg.norm(p, axis=1).max())
            label.append(c)
        with h5py.File(folder / f"{split}_objectdataset_augmentedrot_scale75.h5", "w") as f:
            f["data"] = np.asarray(data, dtype=np.float32)
            f["label"] = np.asarray(label, dtype=np.int64)
            f["mask"] = np.zeros((len(data), num_points), dtype=np.int32)
    return Path(root)
