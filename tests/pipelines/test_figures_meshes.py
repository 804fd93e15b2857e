"""Mesh figures (issue #11): convex labels of a BSP mesh against the parts it was built from, the
voxel/convex picture on analytic shapes, and shapenet-bspnet on its embedded default (CI-size
overrides) writing PNGs that exist, decode, have the documented size, are not blank and link from
the report."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from figure_checks import assert_not_blank, decode  # noqa: E402
from threefold.datasets.errors import DataFormatError  # noqa: E402
from threefold.geometry.bspnet.extraction import parts_from_halfspaces  # noqa: E402
from threefold.pipelines.figures import png_caption  # noqa: E402
from threefold.pipelines.figures_meshes import VOXEL_COLOUR, plot_voxels_and_convexes, polygon_parts  # noqa: E402

TAB10 = np.array([[0.122, 0.467, 0.706], [1.0, 0.498, 0.055], [0.173, 0.627, 0.173]])


def has_hue(img: np.ndarray, rgb: np.ndarray, tol: float = 0.02) -> bool:
    """Shading scales a face colour (value), keeping its hue and saturation."""
    from matplotlib.colors import rgb_to_hsv

    hsv, ref = rgb_to_hsv(np.clip(img[..., :3], 0, 1)), rgb_to_hsv(rgb)
    close = (np.abs(hsv[..., 0] - ref[0]) < tol) & (np.abs(hsv[..., 1] - ref[1]) < 0.05) & (hsv[..., 2] > 0.2)
    return int(close.sum()) > 50


def box(lo, hi) -> np.ndarray:
    return np.concatenate([np.c_[np.eye(3), -np.asarray(hi)], np.c_[-np.eye(3), np.asarray(lo)]])


def three_boxes():
    return parts_from_halfspaces([box([-0.4, -0.3, -0.1], [0.0, -0.1, 0.1]), box([-0.1, -0.1, -0.1], [0.1, 0.3, 0.1]),
                                  box([0.05, -0.3, -0.2], [0.35, 0.0, 0.2])])


def test_polygon_parts_are_the_convexes():
    mesh = three_boxes()
    labels = polygon_parts(mesh.polygons, len(mesh.vertices))
    # the mesh lists each part's polygons in turn; the parts are known independently of connectivity
    expected = np.repeat(np.arange(mesh.num_convexes), [len(p.polygons) for p in mesh.parts])
    np.testing.assert_array_equal(labels, expected)
    with pytest.raises(DataFormatError, match="outside the 8 vertices"):
        polygon_parts([[0, 1, 8]], 8)


def test_voxels_beside_coloured_convexes(tmp_path):
    mesh = three_boxes()
    g = (np.arange(32) + 0.5) / 32 - 0.5
    x, y, z = np.meshgrid(g, g, g, indexing="ij")
    voxels = (x**2 + y**2 + z**2 < 0.35**2).astype(np.uint8)
    path = plot_voxels_and_convexes(tmp_path / "m.png", voxels, mesh.vertices, mesh.polygons, "spheres")
    img = decode(path)
    assert img.shape[:2] == (400, 800)
    assert_not_blank(img, path)
    left, right = img[:, :400], img[:, 400:]
    assert has_hue(left, VOXEL_COLOUR) and not has_hue(right, VOXEL_COLOUR)
    assert all(has_hue(right, c) for c in TAB10) and not has_hue(left, TAB10[1])  # one colour per convex
    assert f"({int(voxels.sum())} occupied of 32^3)" in png_caption(path) and "3 convexes" in png_caption(path)
    with pytest.raises(DataFormatError, match="expected a cube"):
        plot_voxels_and_convexes(tmp_path / "bad.png", voxels[:, :, :5], mesh.vertices, mesh.polygons)


TINY = [
    "model.ef_dim=2", "model.p_dim=16", "model.c_dim=4",
    "train.steps_16=2", "train.steps_32=2", "train.steps_64=2", "train.steps_final=2", "train.points_per_step=128",
    "trainer.batch_size=2", "embedded.shapes_per_category=1", "eval.n_sample=1024", "eval.n_keep=256",
    "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
]


def test_bspnet_run_writes_voxel_and_convex_figures(tmp_path, monkeypatch):
    from threefold.pipelines.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["run", "shapenet-bspnet", *TINY]) == 0
    (run,) = (tmp_path / "runs" / "shapenet-bspnet").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    meshed = [r for r in metrics["per_shape"] if r["mesh"]]
    assert meshed, "the tiny run meshed no shape"
    expected = {f"mesh_{r['shape']}.png" for r in meshed} | {"curves.png"}
    figs = run / "figures"
    assert {p.name for p in figs.glob("*.png")} == expected
    report = (run / "report.md").read_text()
    for row in meshed:
        path = figs / f"mesh_{row['shape']}.png"
        img = decode(path)
        assert img.shape[:2] == (400, 800)
        assert_not_blank(img, path)
        assert has_hue(img[:, :400], VOXEL_COLOUR)
        assert f"each of its {row['num_convexes']} convexes" in png_caption(path)
        assert f"(figures/{path.name})" in report
