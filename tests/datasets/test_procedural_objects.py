"""The embedded procedural object sample: determinism, area-weighted sampling (analytic face shares),
outward unit normals, and round trips through the real readers of each published layout."""

from __future__ import annotations

import math

import numpy as np
import pytest

from threefold.datasets.errors import ConfigError
from threefold.datasets.objects import ModelNet40, ScanObjectNN, ShapeNet55
from threefold.datasets.procedural_objects import (
    CLASSES,
    procedural_object,
    revolve,
    sample_surface,
    write_modelnet_layout,
    write_scanobjectnn_layout,
    write_shapenet_layout,
)

CONVEX = ("sphere", "cube", "cylinder", "cone", "capsule", "pyramid")


def test_at_least_ten_classes_with_the_issue_names():
    assert len(CLASSES) >= 10
    assert {"sphere", "cube", "cylinder", "cone", "torus", "capsule", "pyramid", "chair", "table"} <= set(CLASSES)


def test_deterministic_per_seed_class_and_index():
    a = procedural_object("chair", 3, 256, seed=1)
    b = procedural_object("chair", 3, 256, seed=1)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.allclose(a[0], procedural_object("chair", 4, 256, seed=1)[0])
    assert not np.allclose(a[0], procedural_object("chair", 3, 256, seed=2)[0])
    with pytest.raises(ConfigError, match="sofa"):
        procedural_object("sofa", 0)


@pytest.mark.parametrize("name", list(CLASSES))
def test_unit_normals_and_bounded_size(name):
    p, n = procedural_object(name, 0, 512)
    np.testing.assert_allclose(np.linalg.norm(n, axis=1), 1, atol=1e-9)
    assert np.isfinite(p).all() and 0.3 < np.linalg.norm(p - p.mean(0), axis=1).max() < 1.5


@pytest.mark.parametrize("name", CONVEX)
def test_convex_shapes_have_outward_normals(name):
    p, n = procedural_object(name, 1, 1000)
    # Inside a convex solid every surface normal points away from any interior point (the centre
    # of the bounding box is interior for these shapes).
    c = (p.max(0) + p.min(0)) / 2
    assert (((p - c) * n).sum(1) > -1e-9).all()


def test_area_weighted_box_face_shares_are_analytic():
    s = math.sqrt(0.5)
    verts, faces = revolve(np.array([[0, -0.5], [s, -0.5], [s, 0.5], [0, 0.5]]), 4, math.pi / 4)
    verts = verts * [1.0, 2.0, 3.0]  # a 1 x 2 x 3 box, faces of area 6, 3, 2 (twice each)
    p, n = sample_surface([(verts, faces)], 40000, np.random.default_rng(0))
    np.testing.assert_allclose(np.abs(p).max(0), [0.5, 1.0, 1.5], atol=1e-9)
    axis = np.abs(n).argmax(1)
    shares = np.bincount(axis, minlength=3) / len(p)
    np.testing.assert_allclose(shares, np.array([6, 3, 2]) / 11, atol=0.01)
    # points lie on the face their normal names
    on_face = np.abs(np.abs(p[np.arange(len(p)), axis]) - np.array([0.5, 1.0, 1.5])[axis])
    assert on_face.max() < 1e-9


def test_revolved_sphere_points_lie_on_the_polyhedron():
    t = np.linspace(-math.pi / 2, math.pi / 2, 33)
    verts, faces = revolve(np.stack([np.cos(t), np.sin(t)], 1), 64)
    p, _ = sample_surface([(verts, faces)], 2000, np.random.default_rng(1))
    r = np.linalg.norm(p, axis=1)
    # chords of a 64 x 32 polyhedron inscribed in the unit sphere
    assert r.max() <= 1 + 1e-9 and r.min() > math.cos(math.pi / 32) ** 2 - 1e-6


def test_modelnet_layout_round_trips_through_the_reader(tmp_path):
    root = write_modelnet_layout(tmp_path, train_per_class=2, test_per_class=1, num_points=300, seed=0)
    train = ModelNet40(root, "train", 300, use_normals=True)
    assert len(train) == 2 * len(CLASSES) and train.class_names == list(CLASSES)
    for i in (0, 5, len(train) - 1):
        item = train[i]
        assert train.class_names[int(item["category"])] == item["name"].rsplit("_", 1)[0]
        np.testing.assert_allclose(np.linalg.norm(item["normal"].numpy(), axis=1), 1, atol=1e-5)
    test = ModelNet40(root, "test", 300)
    assert len(test) == len(CLASSES) and test[0]["name"] == f"{list(CLASSES)[0]}_0003"
    p, _ = procedural_object(list(CLASSES)[0], 2, 300, seed=0)
    c = p - p.mean(0)
    np.testing.assert_allclose(test[0]["coord"].numpy(), c / np.linalg.norm(c, axis=1).max(), atol=1e-5)


def test_shapenet_and_scanobjectnn_layouts_round_trip(tmp_path):
    pytest.importorskip("h5py")
    sn = ShapeNet55(write_shapenet_layout(tmp_path / "sn", 1, 1, 2048), "test", 1024)
    assert len(sn) == len(CLASSES) and sn.num_classes == len(CLASSES)
    assert [int(sn[i]["category"]) for i in range(len(sn))] == list(range(len(CLASSES)))
    so = ScanObjectNN(write_scanobjectnn_layout(tmp_path / "so", 1, 1, 256), "test", "pb_t50_rs", None)
    assert len(so) == len(CLASSES) and int(so[3]["category"]) == 3
    norms = np.linalg.norm(so[3]["coord"].numpy(), axis=1)
    assert norms.max() == pytest.approx(1, abs=1e-6)
