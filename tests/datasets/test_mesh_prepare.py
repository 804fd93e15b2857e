"""Mesh preparation: ray-parity voxelisation against analytic inside tests, IM-NET point sampling,
and clear errors for bad meshes. Mesh files are written here as plain text from the format specs."""

from __future__ import annotations

import numpy as np
import pytest

from threefold.datasets.errors import DataFormatError, MissingFileError
from threefold.datasets.mesh_prepare import (
    load_mesh,
    occupancy_from_mesh,
    prepare_mesh,
    prepare_mesh_files,
    sample_points,
    voxels_from_occupancy,
)
from threefold.datasets.procedural_shapes import procedural_shape

CENTRES = (np.arange(256) + 0.5) / 256 - 0.5


def box_mesh(lo, hi):
    """A closed box: 8 vertices, 12 outward triangles (written out by hand)."""
    (x0, y0, z0), (x1, y1, z1) = lo, hi
    v = np.array([[x0, y0, z0], [x1, y0, z0], [x1, y1, z0], [x0, y1, z0], [x0, y0, z1], [x1, y0, z1], [x1, y1, z1], [x0, y1, z1]])
    f = np.array([[0, 2, 1], [0, 3, 2], [4, 5, 6], [4, 6, 7], [0, 1, 5], [0, 5, 4], [2, 3, 7], [2, 7, 6], [1, 2, 6], [1, 6, 5], [0, 4, 7], [0, 7, 3]])
    return v, f


def test_box_occupancy_matches_analytic():
    # Faces exactly on cell-centre planes (0.5/256 - 0.5 + k/256) exercise the edge/vertex tie-breaks.
    lo, hi = np.array([CENTRES[40], -0.2, CENTRES[10]]), np.array([CENTRES[200], 0.31, 0.123])
    v, f = box_mesh(lo, hi)
    occ = occupancy_from_mesh(v, f)
    X, Y, Z = np.meshgrid(CENTRES, CENTRES, CENTRES, indexing="ij")
    strict = (X > lo[0]) & (X < hi[0]) & (Y > lo[1]) & (Y < hi[1]) & (Z > lo[2]) & (Z < hi[2])
    closed = (X >= lo[0]) & (X <= hi[0]) & (Y >= lo[1]) & (Y <= hi[1]) & (Z >= lo[2]) & (Z <= hi[2])
    assert np.all(occ[strict]) and not np.any(occ[~closed])


@pytest.mark.parametrize("category", ["chair", "plane"])
def test_procedural_shape_occupancy_matches_halfspaces(category):
    shape = procedural_shape(category, 3)
    v, f = shape.mesh()
    occ = occupancy_from_mesh(v, f)[1::3, 2::3, ::3]  # every 27th cell keeps the reference cheap
    c = [CENTRES[1::3], CENTRES[2::3], CENTRES[::3]]
    grid = np.stack(np.meshgrid(*c, indexing="ij"), -1).reshape(-1, 3)
    ref = np.zeros(len(grid), dtype=bool)
    for part in shape.parts:  # analytic: inside every face plane of some convex part
        ref |= (grid @ part.halfspaces[:, :3].T + part.halfspaces[:, 3]).max(1) < 0
    assert ref.sum() > 1000 and np.array_equal(occ.ravel(), ref)


def test_sphere_against_radius():
    trimesh = pytest.importorskip("trimesh")
    ico = trimesh.creation.icosphere(subdivisions=3, radius=0.35)
    occ = occupancy_from_mesh(np.asarray(ico.vertices), np.asarray(ico.faces))[::2, 1::2, ::3]
    c = CENTRES
    r = np.sqrt(sum(g**2 for g in np.meshgrid(c[::2], c[1::2], c[::3], indexing="ij")))
    # The icosphere is inscribed: inside 0.35 * cos(max facet angle) it is certainly solid.
    assert np.all(occ[r < 0.345]) and not np.any(occ[r > 0.3501])


def test_sample_points_follow_imnet_layout():
    v, f = box_mesh([-0.3, -0.1, -0.2], [0.25, 0.2, 0.3])
    occ = occupancy_from_mesh(v, f)
    rec = sample_points(occ, seed=0)
    for res, n in ((16, 4096), (32, 4096), (64, 16384)):
        p, val = rec[f"points_{res}"], rec[f"values_{res}"]
        assert p.shape == (n, 3) and p.dtype == np.uint8 and val.shape == (n, 1)
        # each value is the occupancy of the 256-grid cell the point indexes
        np.testing.assert_array_equal(val[:, 0], occ[p[:, 0], p[:, 1], p[:, 2]])
        # at most one point per coarse block
        blocks = p.astype(int) // (256 // res)
        assert len(np.unique(blocks, axis=0)) == n
        # each value equals its coarse block's max-pooled occupancy
        coarse = voxels_from_occupancy(occ, res)
        np.testing.assert_array_equal(val[:, 0], coarse[blocks[:, 0], blocks[:, 1], blocks[:, 2]])
    # 16: exactly one point in every 16^3 block
    assert len(np.unique(rec["points_16"].astype(int) // 16, axis=0)) == 4096
    # 64: points concentrate near the surface: every surface block of the 64 grid is sampled
    from scipy.ndimage import maximum_filter, minimum_filter

    vox = voxels_from_occupancy(occ, 64)
    surface = (maximum_filter(vox, 3) != minimum_filter(vox, 3))
    surface[[0, -1]] = surface[:, [0, -1]] = surface[:, :, [0, -1]] = False
    got = np.zeros_like(surface)
    b = rec["points_64"].astype(int) // 4
    got[b[:, 0], b[:, 1], b[:, 2]] = True
    assert surface.sum() < 16384 and np.all(got[surface])
    # deterministic for a seed
    again = sample_points(occ, seed=0)
    assert all(np.array_equal(rec[k], again[k]) for k in rec)


def test_prepare_mesh_voxels():
    v, f = box_mesh([-0.25, -0.25, -0.25], [0.25, 0.25, 0.25])
    rec = prepare_mesh(v, f, normalize=False)
    vox = rec["voxels"][..., 0]
    assert rec["voxels"].shape == (64, 64, 64, 1)
    # cells 16..47 lie in [-0.25, 0.25]; max-pooled 256 cells reach exactly those
    expected = np.zeros((64, 64, 64), np.uint8)
    expected[16:48, 16:48, 16:48] = 1
    np.testing.assert_array_equal(vox, expected)


def write_obj(path, v, f):
    lines = [f"v {x:.9f} {y:.9f} {z:.9f}" for x, y, z in v] + [f"f {a + 1} {b + 1} {c + 1}" for a, b, c in f]
    path.write_text("\n".join(lines) + "\n")


def write_off(path, v, f):
    lines = ["OFF", f"{len(v)} {len(f)} 0"] + [f"{x} {y} {z}" for x, y, z in v] + [f"3 {a} {b} {c}" for a, b, c in f]
    path.write_text("\n".join(lines) + "\n")


def test_mesh_files_and_normalisation(tmp_path):
    pytest.importorskip("trimesh")
    v, f = box_mesh([0, 0, 0], [2.0, 1.0, 1.0])
    write_obj(tmp_path / "a.obj", v, f)
    write_off(tmp_path / "b.off", v * 3 + 5, f)
    names, rec = prepare_mesh_files([tmp_path / "a.obj", tmp_path / "b.off"], progress=False)
    assert names == ["a", "b"]
    assert rec["voxels"].shape == (2, 64, 64, 64, 1)
    # same shape up to similarity: identical voxels after normalisation
    np.testing.assert_array_equal(rec["voxels"][0], rec["voxels"][1])
    # longest side (x) spans 1 - 2/64 of the cube: cells 1..62
    occupied_x = np.flatnonzero(rec["voxels"][0, :, :, :, 0].any(axis=(1, 2)))
    assert occupied_x.min() == 1 and occupied_x.max() == 62


def test_bad_meshes_reported(tmp_path):
    pytest.importorskip("trimesh")
    v, f = box_mesh([0, 0, 0], [1, 1, 1])
    write_obj(tmp_path / "open.obj", v, f[:-1])
    with pytest.raises(DataFormatError, match=r"open.obj: not watertight: 3 edges"):
        prepare_mesh(*load_mesh(tmp_path / "open.obj"), name=str(tmp_path / "open.obj"))
    (tmp_path / "empty.obj").write_text("# nothing\n")
    with pytest.raises(DataFormatError, match="empty"):
        load_mesh(tmp_path / "empty.obj")
    (tmp_path / "x.xyz").write_text("0 0 0\n")
    with pytest.raises(DataFormatError, match="unsupported mesh suffix"):
        load_mesh(tmp_path / "x.xyz")
    with pytest.raises(MissingFileError):
        load_mesh(tmp_path / "missing.obj")
