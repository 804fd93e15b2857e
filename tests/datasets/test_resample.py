"""World-space resampling against analytic fields, and the training grid of a registration pair."""

from __future__ import annotations

import numpy as np
import pytest

from threefold.datasets.errors import ConfigError, DataFormatError
from threefold.datasets.resample import grid_size, resample_volume, training_grid


def _world(affine, shape):
    idx = np.indices(shape).reshape(3, -1)
    return (affine[:3, :3] @ idx + affine[:3, 3:4]).reshape(3, *shape)


def test_linear_world_function_is_resampled_exactly():
    # f(world) = c · world + d is reproduced exactly by trilinear interpolation inside the source
    src_aff = np.array([[-1.2, 0, 0, 20.0], [0, 0.9, 0.1, -15.0], [0, -0.1, 0.9, -10.0], [0, 0, 0, 1]])
    src_shape = (30, 32, 28)
    c, d = np.array([0.3, -0.2, 0.5]), 1.5
    src = np.einsum("i,i...->...", c, _world(src_aff, src_shape)) + d
    dst_aff = np.diag([1.7, 1.3, 2.2, 1.0])
    dst_aff[:3, 3] = [-6.0, -5.0, -3.0]
    dst_shape = (6, 7, 5)
    shift = np.eye(4)
    shift[:3, 3] = [0.5, -1.0, 0.25]  # destination world -> source world
    out = resample_volume(src, src_aff, dst_shape, dst_aff, world_transform=shift)
    expected = np.einsum("i,i...->...", c, _world(shift @ dst_aff, dst_shape)) + d
    np.testing.assert_allclose(out, expected, atol=1e-9)


def test_nearest_keeps_labels_and_channels():
    labels = np.random.default_rng(0).integers(0, 4, (2, 6, 6, 6))
    same = resample_volume(labels, np.eye(4), (6, 6, 6), np.eye(4), order=0)
    assert same.dtype == labels.dtype and np.array_equal(same, labels)
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = 5.0  # the same world points, index i reversed
    np.testing.assert_array_equal(resample_volume(labels, np.eye(4), (6, 6, 6), flip, order=0), labels[:, ::-1])
    with pytest.raises(DataFormatError, match="shape"):
        resample_volume(labels[0, 0], np.eye(4), (6, 6), np.eye(4))
    with pytest.raises(ConfigError, match="order"):
        resample_volume(labels, np.eye(4), (6, 6, 6), np.eye(4), order=3)


def test_training_grid_covers_the_field_of_view():
    aff = np.diag([-1.25, 1.25, 1.25, 1.0])
    aff[:3, 3] = [90.0, -126.0, -72.0]
    shape = (145, 174, 145)  # an HCP diffusion grid
    dims, grid = training_grid(shape, aff, 64)
    assert dims == (64, 64, 64)
    spacing = np.linalg.norm(grid[:3, :3], axis=0)
    np.testing.assert_allclose(spacing, 174 * 1.25 / 64)  # the longest extent fits exactly
    np.testing.assert_allclose(np.sign(np.diag(grid[:3, :3])), [-1, 1, 1])  # directions kept
    centre = lambda a, s: (a @ np.append((np.asarray(s) - 1) / 2.0, 1.0))[:3]
    np.testing.assert_allclose(centre(grid, dims), centre(aff, shape))


def test_grid_size_multiple_of_32():
    assert grid_size(96) == (96, 96, 96)
    assert grid_size((64, 96, 128)) == (64, 96, 128)
    with pytest.warns(UserWarning, match="padded to \\(96, 96, 96\\)"):
        assert grid_size(80) == (96, 96, 96)
    with pytest.raises(ConfigError):
        grid_size(0)
