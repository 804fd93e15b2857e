"""A deterministic synthetic SemanticKITTI-format LiDAR sample: a 64-beam spinning sensor ray-cast
against procedural street scenes.

Sensor: HDL-64E-like, ``n_beams`` beams uniformly spaced in elevation from +2.0 deg (ring 0) to
-24.8 deg, one firing every ``azimuth_step_deg`` over 360 deg, mounted 1.73 m above the road (as on
the KITTI car), 80 m maximum range, Gaussian range noise sigma = 2 cm. Rays are cast with open3d's
``RaycastingScene`` (extra ``lidar``; imported inside the functions).

Scene (new draw per scan, from ``numpy.random.default_rng([seed, sequence, scan])``): a straight
street at a random heading — road plane with parked (raw id 10, car) and driving (252, moving-car)
cars as two-box bodies, curbs and sidewalks (48) raised 0.15 m, terrain strips (72), building blocks
(50) with gaps, poles (80), trees (trunk 71 + crown 70), bushes (70) and a few small boxes labelled
other-structure (52, which the official learning map sends to "unlabeled", i.e. ignored). Eight
learnable classes: car, road, sidewalk, building, vegetation, trunk, terrain, pole.

Remission model: per-object reflectance a (road 0.10-0.20, sidewalk 0.25-0.35, building 0.30-0.60,
car 0.05-0.80, pole 0.40-0.55, trunk 0.20-0.35, vegetation 0.45-0.65, terrain 0.35-0.50) times
(0.3 + 0.7 |cos θ|) for the incidence angle θ, plus N(0, 0.02) noise, clipped to [0, 0.99].

Written in the official layout with raw SemanticKITTI ids (instance id in the high 16 bits for cars),
so :class:`threefold.datasets.semantickitti.SemanticKITTI` and the evaluator read it unchanged::

    root/sequences/XX/velodyne/NNNNNN.bin  root/sequences/XX/labels/NNNNNN.label

Sizes (seed 0): at the default 0.16 deg step (2,250 firings x 64 beams = 144,000 rays) about
118,000 points per scan (1.9 MB .bin); at 1.0 deg (23,040 rays) about 19,000 points, the CI size.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from threefold.datasets.errors import ConfigError, require
from threefold.datasets.paths import atomic_write

SENSOR_HEIGHT = 1.73  # metres above the road, KITTI's Velodyne mount
MAX_RANGE = 80.0  # metres
RANGE_NOISE = 0.02  # metres, 1 sigma
FOV_DEG = (-24.8, 2.0)

RAW = {"car": 10, "moving-car": 252, "road": 40, "sidewalk": 48, "building": 50, "other-structure": 52,
       "vegetation": 70, "trunk": 71, "terrain": 72, "pole": 80}
_REFLECTANCE = {"car": (0.05, 0.80), "moving-car": (0.05, 0.80), "road": (0.10, 0.20), "sidewalk": (0.25, 0.35),
                "building": (0.30, 0.60), "other-structure": (0.20, 0.70), "vegetation": (0.45, 0.65),
                "trunk": (0.20, 0.35), "terrain": (0.35, 0.50), "pole": (0.40, 0.55)}
_MARKER = ".threefold-lidar-sample.json"


class _Scene:
    """Collects triangle meshes with their raw label, instance id and reflectance."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.meshes: list[tuple[np.ndarray, np.ndarray]] = []
        self.meta: list[tuple[int, int, float]] = []  # raw id, instance id, reflectance

    def add(self, vertices: np.ndarray, triangles: np.ndarray, cls: str, instance: int = 0) -> None:
        lo, hi = _REFLECTANCE[cls]
        self.meshes.append((np.asarray(vertices, dtype=np.float32), np.asarray(triangles, dtype=np.uint32)))
        self.meta.append((RAW[cls], instance, float(self.rng.uniform(lo, hi))))

    def box(self, lo: Sequence[float], hi: Sequence[float], cls: str, yaw: float = 0.0,
            centre: Sequence[float] | None = None, instance: int = 0) -> None:
        """Axis-aligned box [lo, hi], optionally rotated by ``yaw`` about the vertical through ``centre``."""
        lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        if yaw:
            c = np.asarray(centre if centre is not None else (lo + hi) / 2, dtype=np.float64)
            corners = _rotz(corners - c, yaw) + c
        # corner index = 4 ix + 2 iy + iz; two triangles per face
        quads = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
        tris = [t for a, b, c, d in quads for t in ((a, b, c), (a, c, d))]
        self.add(corners, np.array(tris), cls, instance)

    def cylinder(self, x: float, y: float, z0: float, z1: float, radius: float, cls: str, segments: int = 16) -> None:
        ang = np.linspace(0.0, 2 * np.pi, segments, endpoint=False)
        ring = np.stack([x + radius * np.cos(ang), y + radius * np.sin(ang)], axis=1)
        v = np.concatenate([np.c_[ring, np.full(segments, z0)], np.c_[ring, np.full(segments, z1)],
                            [[x, y, z1]]])
        i = np.arange(segments)
        j = (i + 1) % segments
        side = np.concatenate([np.stack([i, j, j + segments], 1), np.stack([i, j + segments, i + segments], 1)])
        top = np.stack([i + segments, j + segments, np.full(segments, 2 * segments)], 1)
        self.add(v, np.concatenate([side, top]), cls)

    def ellipsoid(self, centre: Sequence[float], radii: Sequence[float], cls: str, bumps: float = 0.0) -> None:
        """A UV sphere scaled to ``radii`` with random radial bumps (foliage)."""
        nu, nv = 18, 10
        u = np.linspace(0, 2 * np.pi, nu, endpoint=False)
        v = np.linspace(0, np.pi, nv + 1)[1:-1]
        uu, vv = np.meshgrid(u, v)
        dirs = np.stack([np.sin(vv) * np.cos(uu), np.sin(vv) * np.sin(uu), np.cos(vv)], -1).reshape(-1, 3)
        dirs = np.concatenate([dirs, [[0, 0, 1], [0, 0, -1]]])
        scale = 1.0 + bumps * self.rng.uniform(-1, 1, size=(dirs.shape[0], 1))
        verts = np.asarray(centre) + dirs * np.asarray(radii) * scale
        tris = []
        for a in range(nv - 2):
            for b in range(nu):
                p, q = a * nu + b, a * nu + (b + 1) % nu
                tris += [(p, q, q + nu), (p, q + nu, p + nu)]
        top, bot = (nv - 1) * nu, (nv - 1) * nu + 1
        for b in range(nu):
            tris.append((top, (b + 1) % nu, b))
            tris.append((bot, (nv - 2) * nu + b, (nv - 2) * nu + (b + 1) % nu))
        self.add(verts, np.array(tris), cls)


def _rotz(p: np.ndarray, yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return p @ np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]])


def _street(rng: np.random.Generator) -> _Scene:
    """One procedural street in the street frame (x along the street, sensor above the origin)."""
    sc = _Scene(rng)
    g = -SENSOR_HEIGHT
    half = rng.uniform(3.5, 6.5)  # half road width
    off = rng.uniform(-1.5, 1.5)  # sensor's lateral offset from the road centre
    L = MAX_RANGE + 10
    sc.box((-L, off - half, g - 0.2), (L, off + half, g), "road")
    instance = 1
    for side in (-1, 1):
        edge = off + side * half
        walk = rng.uniform(2.0, 4.5)
        sc.box((-L, min(edge, edge + side * walk), g), (L, max(edge, edge + side * walk), g + 0.15), "sidewalk")
        inner = edge + side * walk
        terr = rng.uniform(0.0, 8.0)
        if terr > 0.5:
            sc.box((-L, min(inner, inner + side * terr), g - 0.2), (L, max(inner, inner + side * terr), g + 0.08 +
                   rng.uniform(0, 0.1)), "terrain")
        facade = inner + side * terr
        # buildings along the facade line, with gaps showing terrain behind
        x = -L
        while x < L:
            length = rng.uniform(8, 30)
            if rng.random() < 0.8:
                depth = rng.uniform(8, 16)
                y0 = facade + side * rng.uniform(0.0, 1.5)
                sc.box((x, min(y0, y0 + side * depth), g - 0.2), (x + length, max(y0, y0 + side * depth),
                       g + rng.uniform(4, 18)), "building")
            x += length + rng.uniform(0, 6)
        sc.box((-L, min(facade, facade + side * 40), g - 0.25), (L, max(facade, facade + side * 40), g + 0.05),
               "terrain")
        # poles and trees along the sidewalk's outer side, vegetation near facades
        x = -L + rng.uniform(0, 10)
        while x < L:
            y = edge + side * rng.uniform(0.4, 1.0)
            if rng.random() < 0.35:
                sc.cylinder(x, y, g + 0.15, g + rng.uniform(5, 8), rng.uniform(0.08, 0.15), "pole")
            else:
                ty = inner + side * rng.uniform(0.5, max(0.6, terr - 0.5)) if terr > 1.5 else y
                top = g + rng.uniform(1.5, 2.5)
                sc.cylinder(x, ty, g, top, rng.uniform(0.15, 0.3), "trunk")
                r = rng.uniform(1.2, 2.5)
                sc.ellipsoid((x, ty, top + 0.8 * r), (r, r, 0.9 * r), "vegetation", bumps=0.15)
            x += rng.uniform(6, 14)
        # hedges and bushes on the terrain strip (or against the facades where there is none)
        for _ in range(rng.integers(4, 10)):
            bx = rng.uniform(-L, L)
            by = facade - side * rng.uniform(0.6, max(0.7, min(terr, 3.0)))
            sc.ellipsoid((bx, by, g + 0.3), (rng.uniform(1.5, 5), rng.uniform(0.5, 1.0), rng.uniform(0.6, 1.5)),
                         "vegetation", bumps=0.2)
        for _ in range(rng.integers(0, 3)):
            bx, by = rng.uniform(-L, L), edge + side * rng.uniform(0.5, walk - 0.3)
            sc.box((bx, by - 0.3, g + 0.15), (bx + 0.6, by + 0.3, g + 1.1), "other-structure")
        # parked cars along this kerb
        x = -L + rng.uniform(0, 8)
        while x < L:
            if rng.random() < 0.35:
                instance = _car(sc, x, edge - side * 1.1, g, rng.uniform(-0.05, 0.05), "car", instance)
            x += rng.uniform(5.5, 12.0)
    # cars driving in the lanes, keeping clear of the sensor
    for _ in range(rng.integers(1, 6)):
        x = rng.choice([-1, 1]) * rng.uniform(6, 50)
        lane = off + rng.choice([-1, 1]) * rng.uniform(0.0, max(0.1, half - 2.6))
        instance = _car(sc, x, lane, g, rng.uniform(-0.1, 0.1), "moving-car", instance)
    return sc


def _car(sc: _Scene, x: float, y: float, g: float, yaw: float, cls: str, instance: int) -> int:
    rng = sc.rng
    length, width = rng.uniform(3.8, 4.8), rng.uniform(1.6, 1.9)
    body = rng.uniform(0.8, 1.0)
    c = (x, y, g)
    sc.box((x - length / 2, y - width / 2, g + 0.25), (x + length / 2, y + width / 2, g + 0.25 + body), cls, yaw, c,
           instance)
    cab = length * rng.uniform(0.45, 0.6)
    cx = x + rng.uniform(-0.3, 0.1) * length
    sc.box((cx - cab / 2, y - width / 2 + 0.1, g + 0.25 + body), (cx + cab / 2, y + width / 2 - 0.1,
           g + 0.25 + body + rng.uniform(0.45, 0.6)), cls, yaw, c, instance)
    return instance + 1


def _rays(n_beams: int, azimuth_step_deg: float) -> np.ndarray:
    """(n_beams * W, 3) unit directions, beam-major (ring 0 = +2 deg first), azimuth 0..360."""
    elev = np.deg2rad(np.linspace(FOV_DEG[1], FOV_DEG[0], n_beams))
    width = int(round(360.0 / azimuth_step_deg))
    az = np.deg2rad(np.arange(width) * (360.0 / width))
    e, a = np.meshgrid(elev, az, indexing="ij")
    return np.stack([np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e)], -1).reshape(-1, 3)


def simulate_scan(seed: int, sequence: int, scan: int, n_beams: int = 64,
                  azimuth_step_deg: float = 0.16) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic scan: ``points`` (N, 4) float32 (x, y, z metres, remission) and ``labels`` (N,)
    uint32 (raw SemanticKITTI id | instance << 16), deterministic in (seed, sequence, scan)."""
    o3d = require("open3d", extra="lidar")
    rng = np.random.default_rng([seed, sequence, scan])
    street = _street(rng)
    heading = rng.uniform(0, 2 * np.pi)
    rcs = o3d.t.geometry.RaycastingScene()
    for verts, tris in street.meshes:
        rcs.add_triangles(o3d.core.Tensor(_rotz(verts.astype(np.float64), heading).astype(np.float32)),
                          o3d.core.Tensor(tris))
    meta = np.array(street.meta, dtype=np.float64)  # one row per geometry id (ids are assigned 0, 1, ...)
    dirs = _rays(n_beams, azimuth_step_deg).astype(np.float32)
    rays = np.concatenate([np.zeros_like(dirs), dirs], axis=1)
    hit = rcs.cast_rays(o3d.core.Tensor(rays))
    t = hit["t_hit"].numpy().astype(np.float64)
    gid = hit["geometry_ids"].numpy().astype(np.int64)
    normal = hit["primitive_normals"].numpy().astype(np.float64)
    ok = np.isfinite(t) & (t < MAX_RANGE) & (t > 0.5)
    t, gid, normal, d = t[ok], gid[ok], normal[ok], dirs[ok].astype(np.float64)
    t_noisy = t + rng.normal(0.0, RANGE_NOISE, size=t.shape)
    xyz = d * t_noisy[:, None]
    cos = np.abs((normal * d).sum(axis=1))
    refl = meta[gid, 2] * (0.3 + 0.7 * cos) + rng.normal(0.0, 0.02, size=t.shape)
    points = np.concatenate([xyz, np.clip(refl, 0.0, 0.99)[:, None]], axis=1).astype("<f4")
    labels = (meta[gid, 0].astype(np.uint32) | (meta[gid, 1].astype(np.uint32) << 16)).astype("<u4")
    return points, labels


def generate_lidar_sample(root: str | os.PathLike, sequences: Sequence[str] = ("00", "01", "02", "08"),
                          scans_per_sequence: int = 4, seed: int = 0, n_beams: int = 64,
                          azimuth_step_deg: float = 0.16) -> Path:
    """Write a synthetic SemanticKITTI-layout sample under ``root`` and return ``root``.

    ``sequences`` defaults to three training sequences (00, 01, 02) and the validation sequence 08;
    ``scans_per_sequence`` scans each, ``NNNNNN.bin`` + ``NNNNNN.label`` (see the module docstring for
    the sensor, scene and sizes). ``azimuth_step_deg`` sets the points per scan: 0.16 (default)
    ≈ 118k points, 1.0 ≈ 19k. Deterministic: the same arguments give byte-identical files.
    Idempotent: a marker file records the arguments, and a complete sample with the same arguments
    is left as it is; files are written atomically, so an interrupted run resumes cleanly.
    """
    if scans_per_sequence < 1 or n_beams < 2 or not 0.01 <= azimuth_step_deg <= 10:
        raise ConfigError(f"generate_lidar_sample: scans_per_sequence={scans_per_sequence}, n_beams={n_beams}, "
                          f"azimuth_step_deg={azimuth_step_deg} out of range")
    seqs = [f"{int(s):02d}" for s in sequences]
    root = Path(root)
    params = {"version": 1, "sequences": seqs, "scans_per_sequence": scans_per_sequence, "seed": seed,
              "n_beams": n_beams, "azimuth_step_deg": azimuth_step_deg}
    files = [(s, i, root / "sequences" / s / "velodyne" / f"{i:06d}.bin",
              root / "sequences" / s / "labels" / f"{i:06d}.label") for s in seqs for i in range(scans_per_sequence)]
    marker = root / _MARKER
    try:
        done = json.loads(marker.read_text()) == params and all(b.is_file() and lab.is_file() for _, _, b, lab in files)
    except (OSError, ValueError):
        done = False
    if done:
        return root
    for s, i, bin_path, label_path in files:
        points, labels = simulate_scan(seed, int(s), i, n_beams, azimuth_step_deg)
        atomic_write(bin_path, lambda f: f.write(points.tobytes()))
        atomic_write(label_path, lambda f: f.write(labels.tobytes()))
    atomic_write(marker, lambda f: f.write(json.dumps(params).encode()))
    return root


__all__ = ["generate_lidar_sample", "simulate_scan"]
