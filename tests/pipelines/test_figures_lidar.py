"""LiDAR figures (issue #11): the range-image and bird's-eye projections on analytic points, the
official SemanticKITTI colour map read as BGR, and the views of a synthetic 64-beam scan: PNGs that
exist, decode, have the documented size, are not blank, carry the official colours (not their
channel-swapped twins) and an accuracy caption that matches an independent count."""

from __future__ import annotations

import re

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from threefold.datasets.errors import ConfigError, DataFormatError  # noqa: E402
from threefold.pipelines.figures import png_caption  # noqa: E402
from threefold.pipelines.figures_lidar import (  # noqa: E402
    CORRECT_RGB,
    WRONG_RGB,
    bev_projection,
    class_colours,
    plot_lidar_views,
    range_projection,
)
from figure_checks import assert_not_blank, decode  # noqa: E402


def count_colour(img: np.ndarray, rgb, tol: float = 0.01) -> int:
    return int((np.abs(img[..., :3] - np.asarray(rgb)).max(-1) < tol).sum())


def direction(yaw_deg: float, pitch_deg: float, r: float = 10.0) -> np.ndarray:
    y, p = np.radians(yaw_deg), np.radians(pitch_deg)
    return r * np.array([np.cos(p) * np.cos(y), np.cos(p) * np.sin(y), np.sin(p)])


def test_range_projection_analytic():
    eps = 1e-3  # stay inside a pixel, away from its edges
    pts = np.stack([
        direction(0.0, 2.0 - eps),  # straight ahead, top of the field of view: row 0, column W/2
        direction(90.0 - eps, -10.0),  # left (+y): yaw pi/2 -> column W/4 - 1 .. W/4
        direction(0.0, -24.8 + eps),  # bottom beam: last row
        direction(0.0, -60.0),  # below the field of view: clipped to the last row
        direction(180.0 - eps, -10.0, r=5.0),  # behind: column 0 (just left of the seam)
        direction(180.0 - eps, -10.0, r=20.0),  # same pixel, farther: hidden
    ])  # fmt: skip
    img = range_projection(pts, 64, 1024)
    assert img.shape == (64, 1024)
    assert img[0, 512] == 0
    row10 = int((1 - (-10.0 + 24.8) / 26.8) * 64)
    assert img[row10, 256] == 1 or img[row10, 255] == 1
    # 2 and 3 share the bottom pixel ahead at equal range: one of them is shown (the later)
    assert img[63, 512] == 3 and 2 not in img
    assert img[row10, 0] == 4 and 5 not in img  # the nearer of two points in one pixel
    assert (img >= 0).sum() == 4
    with pytest.raises(ConfigError, match="up > down"):
        range_projection(pts, fov_deg=(2.0, -24.8))


def test_bev_projection_keeps_the_highest_point():
    pts = np.array([[0.05, 0.05, -1.5], [0.05, 0.05, 0.5], [-49.95, 49.95, 0.0], [60.0, 0.0, 0.0]])
    img = bev_projection(pts, extent=50.0, resolution=0.1)
    assert img.shape == (1000, 1000)
    assert img[499, 500] == 1  # x in [0, 0.1) -> column 500; y in [0, 0.1) -> row 499 (y up)
    assert img[0, 0] == 2 and (img >= 0).sum() == 2  # x = 60 m lies outside the 100 m square


def test_official_colour_map_is_bgr():
    from threefold.datasets.semantickitti import SEMANTICKITTI_CLASSES, semantickitti_config

    cfg = semantickitti_config()
    rgb, ignore, raw = class_colours(cfg["color_map"], cfg["learning_map_inv"], cfg["learning_ignore"])
    assert len(rgb) == 19 and raw[0] == 10 and raw[-1] == 81
    assert [cfg["labels"][r] for r in raw] == list(SEMANTICKITTI_CLASSES)
    # car: official [b, g, r] = [245, 150, 100] -> RGB (100, 150, 245), a blue
    np.testing.assert_allclose(rgb[0] * 255, [100, 150, 245])
    np.testing.assert_allclose(ignore, [0, 0, 0])
    with pytest.raises(ConfigError, match="no colour for raw id"):
        class_colours({0: [0, 0, 0]}, {0: 0, 1: 10})


TINY_MAP = {0: [0, 0, 0], 10: [245, 150, 100], 40: [255, 0, 255], 70: [0, 175, 0]}  # BGR
TINY_INV = {0: 0, 1: 10, 2: 40, 3: 70}  # learning id 0 ignored: classes 0 car, 1 road, 2 vegetation


def synthetic_scan(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """64 beams x 512 azimuths hitting a ground plane 1.73 m below the sensor, a car-sized box ahead,
    a hedge on the left; prediction = truth with a wrong patch and an unlabelled patch."""
    rng = np.random.default_rng(seed)
    pitch = np.radians(np.linspace(-24.8, -1.0, 48))
    yaw = np.radians(np.linspace(-180, 180, 512, endpoint=False))
    p, y = np.meshgrid(pitch, yaw, indexing="ij")
    r = 1.73 / np.tan(-p)
    ground = np.stack([r * np.cos(y), r * np.sin(y), np.full_like(r, -1.73)], -1).reshape(-1, 3)
    ground = ground[np.abs(ground[:, :2]).max(1) < 45]
    car = rng.uniform([8, -1, -1.7], [12, 1, -0.2], (800, 3))
    hedge = rng.uniform([-20, 6, -1.7], [20, 7, 0.5], (1500, 3))
    coord = np.concatenate([ground, car, hedge])
    target = np.concatenate([np.ones(len(ground), int), np.zeros(len(car), int), np.full(len(hedge), 2)])
    target[: len(ground) // 20] = -1  # unlabelled ring closest to the sensor
    pred = target.copy()
    pred[len(ground) : len(ground) + 300] = 1  # part of the car called road
    pred[pred < 0] = 1
    return coord, pred, target


def test_lidar_views_of_a_synthetic_scan(tmp_path):
    coord, pred, target = synthetic_scan()
    paths = plot_lidar_views(tmp_path, coord, pred, target, TINY_MAP, TINY_INV, name="seq08_000000",
                             labels={10: "car", 40: "road", 70: "vegetation"})
    assert [p.name for p in paths] == ["seq08_000000_bev.png", "seq08_000000_range.png", "seq08_000000_confusion.png"]
    assert all(p.parent == tmp_path / "figures" for p in paths)
    sizes = {"bev": (500, 1700), "range": (489, 1100), "confusion": (450, 450)}
    for p in paths:
        img = decode(p)
        assert img.shape[:2] == sizes[p.stem.rsplit("_", 1)[1]], (p.name, img.shape)
        assert_not_blank(img, p)
    bev, rng = decode(paths[0]), decode(paths[1])
    car, road = np.array([100, 150, 245]) / 255, np.array([255, 0, 255]) / 255
    swapped_car = np.array([245, 150, 100]) / 255  # what reading the map as RGB would draw
    for img in (bev, rng):
        assert count_colour(img, car) > 20 and count_colour(img, road) > 20
        assert count_colour(img, swapped_car) == 0
        assert count_colour(img, WRONG_RGB) > 5 and count_colour(img, CORRECT_RGB) > 20
    valid = target >= 0
    accuracy = (pred[valid] == target[valid]).mean()
    for p in paths[:2]:
        m = re.search(r"Point accuracy ([0-9.]+) over (\d+) labelled points", png_caption(p))
        assert float(m.group(1)) == pytest.approx(accuracy, abs=1e-4) and int(m.group(2)) == valid.sum()
    assert f"over {valid.sum()} labelled points" in png_caption(paths[2])


def test_prediction_only_and_bad_input(tmp_path):
    coord, pred, _ = synthetic_scan()
    paths = plot_lidar_views(tmp_path / "figures", coord, pred, None, TINY_MAP, TINY_INV)
    assert [p.name for p in paths] == ["scan_bev.png", "scan_range.png"]
    assert decode(paths[0]).shape[:2] == (500, 700) and decode(paths[1]).shape[:2] == (163, 1100)
    with pytest.raises(DataFormatError, match=r"pred: classes 0\.\.3; expected -1\.\.2"):
        plot_lidar_views(tmp_path, coord, np.r_[pred[:-1], 3], None, TINY_MAP, TINY_INV)
    with pytest.raises(DataFormatError, match=r"coord: shape \(5, 2\)"):
        plot_lidar_views(tmp_path, np.zeros((5, 2)), np.zeros(5, int), None, TINY_MAP, TINY_INV)
