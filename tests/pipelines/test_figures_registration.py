"""Registration figures (issue #11) on a synthetic case: a smooth displacement applied with SciPy,
its Jacobian determinant from NumPy finite differences, with and without folding. The PNGs exist,
decode, have the documented size, are not blank, and the folding shown (magenta pixels, caption
count) matches an independent count."""

from __future__ import annotations

import re

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from threefold.datasets.errors import ConfigError, DataFormatError  # noqa: E402
from threefold.pipelines.figures import png_caption  # noqa: E402
from threefold.pipelines.figures_registration import FOLD_RGBA, checkerboard, plot_registration  # noqa: E402
from figure_checks import assert_not_blank, decode  # noqa: E402


def count_colour(img: np.ndarray, rgb, tol: float = 0.02) -> int:
    return int((np.abs(img[..., :3] - np.asarray(rgb)[:3]).max(-1) < tol).sum())


SHAPE = (24, 32, 28)


def synthetic_case(amplitude: float):
    """Fixed: a striped ellipsoid; ddf: sinusoids along axis 0 (det J = 1 + d ddf0 / d x0) and axis 1; moving =
    fixed sampled at x - ddf, warped = moving sampled at x + ddf (SciPy, linear)."""
    from scipy.ndimage import map_coordinates

    grid = np.indices(SHAPE, dtype=np.float64)
    centre = (np.array(SHAPE) - 1) / 2
    r = np.sqrt((((grid - centre[:, None, None, None]) / (np.array(SHAPE)[:, None, None, None] / 3)) ** 2).sum(0))
    fixed = (r < 1) * (1.0 + 0.5 * np.sin(grid[2] / 2.0))
    ddf = np.zeros((3, *SHAPE))
    ddf[0] = amplitude * np.sin(2 * np.pi * grid[0] / 8.0)
    ddf[1] = 0.5 * amplitude * np.sin(2 * np.pi * grid[2] / 12.0)
    moving = map_coordinates(fixed, grid - ddf, order=1, mode="nearest")
    warped = map_coordinates(moving, grid + ddf, order=1, mode="nearest")
    grads = np.stack([np.stack(np.gradient(ddf[k]), 0) for k in range(3)])  # [component, derivative axis]
    jac = np.linalg.det(np.moveaxis(grads, (0, 1), (-2, -1)) + np.eye(3))
    return fixed, moving, warped, ddf, jac


def test_checkerboard_tiles():
    a, b = np.zeros((16, 12)), np.ones((16, 12))
    board = checkerboard(a, b, tiles=8)  # squares of 2 pixels
    i, j = np.indices(board.shape)
    np.testing.assert_array_equal(board, ((i // 2 + j // 2) % 2 == 1).astype(float))
    with pytest.raises(DataFormatError, match="two equal 2-D shapes"):
        checkerboard(a, b[:3])


@pytest.mark.parametrize("amplitude", [0.4, 2.5])
def test_registration_figures(tmp_path, amplitude):
    fixed, moving, warped, ddf, jac = synthetic_case(amplitude)
    folds = int((jac <= 0).sum())
    assert (folds > 0) == (amplitude > 1)  # the analytic case: 1 + d(ddf0)/dx1 ... crosses 0 only when large
    paths = plot_registration(tmp_path, fixed, moving, warped, ddf, jac, name="case7")
    sizes = {"slices": (900, 900), "checkerboard": (600, 900), "grid": (500, 500), "jacobian": (330, 980)}
    assert [p.name for p in paths] == [f"case7_{k}.png" for k in sizes]
    for p in paths:
        img = decode(p)
        assert img.shape[:2] == sizes[p.stem.split("_", 1)[1]], (p.name, img.shape)
        assert_not_blank(img, p)
    caption = png_caption(paths[3])
    assert re.search(rf"{folds} of {jac.size} voxels folded", caption)
    magenta = count_colour(decode(paths[3]), FOLD_RGBA)
    centre_folds = sum(int((np.take(jac, s // 2, axis=k) <= 0).sum()) for k, s in enumerate(SHAPE))
    assert (magenta > 0) == (centre_folds > 0)
    assert count_colour(decode(paths[2]), (1.0, 0.498, 0.055)) > 100  # the orange grid lines


def test_bad_inputs(tmp_path):
    fixed, moving, warped, ddf, jac = synthetic_case(0.4)
    with pytest.raises(DataFormatError, match=r"ddf: shape \(2, 24, 32, 28\)"):
        plot_registration(tmp_path, fixed, moving, warped, ddf[:2], jac)
    with pytest.raises(DataFormatError, match=r"warped: shape \(24, 32, 27\); expected \(D, H, W\) = \(24, 32, 28\)"):
        plot_registration(tmp_path, fixed, moving, warped[..., :27], ddf, jac)
    with pytest.raises(ConfigError, match="slices"):
        plot_registration(tmp_path, fixed, moving, warped, ddf, jac, slices=(0, 0, 99))
