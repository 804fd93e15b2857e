"""I2P-MAE multi-view depth projection and back-projection against a brute-force NumPy splat written
from the paper's / reference's description (not from the package code)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from threefold.datasets.errors import DataFormatError
from threefold.geometry.i2pmae.projection import (
    project_depth,
    project_views,
    sample_view_map,
    view_coordinates,
    view_pixels,
)

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def np_project(p: np.ndarray, size: int = 224) -> tuple[np.ndarray, np.ndarray, tuple]:
    """One view, point by point: cell = floor((xy - min) / grid), grid = max range / (size - 3); 5 x 5
    splat at cell + offset + 1; footprint centred (midpoint -> size/2 - 1); clamp; depths summed."""
    lo = p[:, :2].min(0)
    # grid = range x float32(1 / (size - 3)): how CUDA evaluates the reference's `range / (size - 3)`
    # (a division by a scalar becomes a multiplication), and what threefold does on every device.
    grid = (p[:, :2].max(0) - lo).max() * np.float32(1.0 / (size - 3))
    cells = np.floor((p[:, :2] - lo) / grid).astype(np.int64)
    footprint = [cells[i] + np.array([dx, dy]) + 1 for i in range(len(p)) for dx in range(-2, 3) for dy in range(-2, 3)]
    footprint = np.array(footprint)
    mid = (footprint.max(0) + footprint.min(0)) // 2
    shift = size // 2 - mid - 1
    img = np.zeros((size, size))
    for i in range(len(p)):
        for dx in range(-2, 3):
            for dy in range(-2, 3):
                r, c = np.clip(cells[i] + np.array([dx, dy]) + 1 + shift, 0, size - 1)
                img[r, c] += p[i, 2]
    img = 1 / (1 + np.exp(-img))
    out = (img[None] - MEAN[:, None, None]) / STD[:, None, None]
    return out, cells, (lo, grid, shift)


def test_depth_view_equals_brute_force_splat():
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(2, 60, 3)) * np.array([0.5, 0.3, 0.4])
    img, geom = project_depth(torch.tensor(pts, dtype=torch.float32))
    assert img.shape == (2, 3, 224, 224) and img.dtype == torch.float32
    for b in range(2):
        want, _, (lo, grid, shift) = np_project(pts[b].astype(np.float32).astype(np.float64))
        np.testing.assert_allclose(img[b].numpy(), want, atol=2e-5)
        np.testing.assert_allclose(geom.origin[b].numpy(), lo, rtol=1e-6)
        np.testing.assert_array_equal(geom.offset[b].numpy(), shift)
    # Empty pixels: sigmoid(0) = 0.5, ImageNet-normalised.
    torch.testing.assert_close(img[0, :, 0, 0], torch.tensor((0.5 - MEAN) / STD, dtype=torch.float32))


def test_three_views_are_the_cyclic_axis_permutations():
    rng = np.random.default_rng(1)
    pts = torch.tensor(rng.uniform(-1, 1, size=(1, 40, 3)), dtype=torch.float32)
    images, geoms = project_views(pts)
    assert images.shape == (3, 1, 3, 224, 224) and len(geoms) == 3
    for v, axes in enumerate([(0, 1, 2), (2, 0, 1), (1, 2, 0)]):
        want, _, _ = np_project(pts[0].numpy()[:, axes].astype(np.float64))
        np.testing.assert_allclose(images[v, 0].numpy(), want, atol=2e-5)
        assert torch.equal(view_coordinates(pts, v), pts[..., list(axes)])


def test_back_projection_reads_each_points_own_pixel():
    rng = np.random.default_rng(2)
    pts = rng.uniform(-1, 1, size=(1, 30, 3)).astype(np.float32)
    _, geom = project_depth(torch.tensor(pts))
    _, cells, (_, _, shift) = np_project(pts[0])  # float32, the arithmetic of project_depth
    rows, cols = (cells + 1 + shift).T
    # A full-resolution map: bicubic "upsampling" to the same size is the identity, so the value read
    # is the id of the pixel the point was taken to.
    ids = torch.arange(224 * 224, dtype=torch.float64).reshape(1, 1, 224, 224)
    got = sample_view_map(ids, torch.tensor(pts), geom)
    np.testing.assert_allclose(got[0, :, 0].numpy(), rows * 224 + cols, rtol=1e-12)
    assert torch.equal(view_pixels(torch.tensor(pts), geom)[0], torch.tensor(rows * 224 + cols))


def test_back_projection_equals_upsample_then_gather():
    """The reference's I2P: interpolate(map, 224, bicubic) then gather at the pixel index."""
    pts = torch.rand(2, 300, 3) * 2 - 1
    _, geom = project_depth(pts)
    fmap = torch.randn(2, 6, 14, 14, dtype=torch.float64)
    up = torch.nn.functional.interpolate(fmap, size=(224, 224), mode="bicubic", align_corners=False)
    idx = view_pixels(pts, geom)
    want = torch.stack([up[b].reshape(6, -1)[:, idx[b]].T for b in range(2)])
    torch.testing.assert_close(sample_view_map(fmap, pts, geom), want)
    # Edge pixels too (replicated borders): a map read at every pixel of the image.
    every = torch.stack(torch.meshgrid(torch.arange(224.0), torch.arange(224.0), indexing="ij"), -1).reshape(1, -1, 2)
    from threefold.geometry.i2pmae.projection import ViewGeometry

    flat = ViewGeometry(torch.zeros(1, 2), torch.ones(1), torch.full((1, 2), -1))
    got = sample_view_map(fmap[:1], torch.cat([every + 0.5, torch.zeros(1, every.shape[1], 1)], -1), flat)
    torch.testing.assert_close(got[0].T.reshape(6, 224, 224), up[0])


def test_constant_maps_read_back_constant_and_channels_stay_separate():
    pts = torch.rand(2, 50, 3)
    _, geom = project_depth(pts)
    fmap = torch.stack([torch.full((14, 14), 3.0), torch.full((14, 14), -1.5)]).expand(2, 2, 14, 14)
    got = sample_view_map(fmap, pts, geom)
    assert got.shape == (2, 50, 2)
    torch.testing.assert_close(got[..., 0], torch.full((2, 50), 3.0))
    torch.testing.assert_close(got[..., 1], torch.full((2, 50), -1.5))


def test_bad_shapes_raise():
    with pytest.raises(DataFormatError, match="expected"):
        project_depth(torch.rand(10, 3))
