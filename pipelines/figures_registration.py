"""Deformable registration figures (issue #11), the panels registration papers show (e.g. VoxelMorph,
Balakrishnan et al., TMI 2019, Fig. 4/5; TransMorph, Chen et al., MedIA 2022, Fig. 6): fixed /
moving / warped slices in three planes, a checkerboard of fixed and moving before and of fixed and
warped after registration, the deformation grid (regular grid lines carried by the displacement in
one plane), and the Jacobian determinant map with folding (J <= 0) highlighted.

Pure plotting, headless: NumPy arrays in, PNG paths out. Conventions: volumes are (D, H, W) arrays;
``ddf`` (3, D, H, W) is the dense displacement in voxels, component ``k`` along array axis ``k``
(the warped image samples the moving image at ``x + ddf(x)``); ``jacobian`` (D, H, W) is
``det(I + grad ddf)`` at each voxel. Slices are the central ones unless ``slices`` says otherwise;
plane ``k`` is the slice at a fixed index of axis ``k`` and is drawn with the remaining axes as
(rows, columns).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from threefold.datasets.errors import ConfigError, DataFormatError, require
from threefold.pipelines.figures import figures_dir, new_figure, save_figure

PANEL_INCHES = 3.0
FOLD_RGBA = (1.0, 0.0, 1.0, 1.0)  # magenta: no colour of the diverging Jacobian map


def _volume(a: np.ndarray, what: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    v = np.asarray(a, dtype=np.float64)
    if v.ndim != 3 or (shape is not None and v.shape != shape):
        raise DataFormatError(f"{what}: shape {v.shape}; expected (D, H, W)" + (f" = {shape}" if shape else ""))
    if not np.isfinite(v).all():
        raise DataFormatError(f"{what}: holds NaN or inf values")
    return v


def _slice(v: np.ndarray, axis: int, index: int) -> np.ndarray:
    return np.take(v, index, axis=axis)


def checkerboard(a: np.ndarray, b: np.ndarray, tiles: int = 8) -> np.ndarray:
    """2-D checkerboard of two equally shaped images: ``tiles`` squares along the longer side,
    ``a`` in the squares whose row + column index is even, ``b`` in the others."""
    if a.shape != b.shape or a.ndim != 2:
        raise DataFormatError(f"checkerboard: images {a.shape} and {b.shape}; expected two equal 2-D shapes")
    size = max(1, int(np.ceil(max(a.shape) / tiles)))
    i, j = np.indices(a.shape)
    return np.where(((i // size) + (j // size)) % 2 == 0, a, b)


def _window(*volumes: np.ndarray) -> tuple[float, float]:
    """Shared grey window: 1st-99th percentile of the volumes together (robust to a few hot voxels)."""
    values = np.concatenate([v.ravel() for v in volumes])
    lo, hi = np.percentile(values, [1, 99])
    return float(lo), float(hi if hi > lo else lo + 1)


def _grid_lines(ax: Any, disp_r: np.ndarray, disp_c: np.ndarray, step: int) -> None:
    """Lines r = const and c = const of a regular grid every ``step`` pixels, moved by the in-plane
    displacement (rows ``disp_r``, columns ``disp_c``)."""
    rows, cols = disp_r.shape
    r, c = np.indices((rows, cols), dtype=np.float64)
    yr, xc = r + disp_r, c + disp_c
    for k in range(0, rows, step):
        ax.plot(xc[k], yr[k], color="tab:orange", linewidth=0.7)
    for k in range(0, cols, step):
        ax.plot(xc[:, k], yr[:, k], color="tab:orange", linewidth=0.7)


def plot_registration(
    fig_dir: Path,
    fixed: np.ndarray,
    moving: np.ndarray,
    warped: np.ndarray,
    ddf: np.ndarray,
    jacobian: np.ndarray,
    name: str = "case0",
    slices: Sequence[int] | None = None,
    grid_plane: int = 0,
    grid_step: int | None = None,
    plane_names: Sequence[str] = ("plane 0", "plane 1", "plane 2"),
) -> list[Path]:
    """Write the four registration figures of one case; returns their paths.

    ``fixed``, ``moving``, ``warped``, ``jacobian`` (D, H, W) float; ``ddf`` (3, D, H, W) float,
    voxels (module docstring). ``fig_dir``: a run folder or its ``figures/`` folder. ``slices``:
    index along axes 0, 1, 2 of the three planes (default: the centres). Files (at 100 dpi):
    ``<name>_slices.png`` (3 × 3 panels of 300 px: rows fixed / moving / warped, columns the planes),
    ``<name>_checkerboard.png`` (2 × 3: fixed|moving before, fixed|warped after),
    ``<name>_grid.png`` (500 × 500: warped grid every ``grid_step`` voxels, default a sixteenth of the
    larger in-plane side, over the fixed slice of plane ``grid_plane``), ``<name>_jacobian.png``
    (1 × 3 panels plus a colour bar: det J on a diverging map centred at 1, J <= 0 magenta).
    """
    colors = require("matplotlib.colors", extra="viz")
    f = _volume(fixed, "fixed")
    m = _volume(moving, "moving", f.shape)
    w = _volume(warped, "warped", f.shape)
    jac = _volume(jacobian, "jacobian", f.shape)
    u = np.asarray(ddf, dtype=np.float64)
    if u.shape != (3, *f.shape) or not np.isfinite(u).all():
        raise DataFormatError(f"ddf: shape {u.shape}; expected finite (3, {', '.join(map(str, f.shape))}) voxels")
    idx = [s // 2 for s in f.shape] if slices is None else [int(s) for s in slices]
    if len(idx) != 3 or any(not 0 <= i < s for i, s in zip(idx, f.shape)):
        raise ConfigError(f"slices={slices}: expected three indices inside {f.shape}")
    if grid_plane not in (0, 1, 2):
        raise ConfigError(f"grid_plane={grid_plane}; expected 0, 1 or 2")
    out_dir = Path(fig_dir) if Path(fig_dir).name == "figures" else figures_dir(fig_dir)
    planes = [f"{plane_names[k]} ({'DHW'[k]} = {idx[k]})" for k in range(3)]
    lo, hi = _window(f, m, w)
    grey = {"cmap": "gray", "vmin": lo, "vmax": hi, "interpolation": "nearest"}
    paths = []

    fig = new_figure((3 * PANEL_INCHES, 3 * PANEL_INCHES))
    axes = fig.subplots(3, 3)
    for row, (label, vol) in enumerate((("fixed", f), ("moving", m), ("warped", w))):
        for k in range(3):
            axes[row, k].imshow(_slice(vol, k, idx[k]), **grey)
            axes[row, k].set_title(f"{label}, {planes[k]}", fontsize=8)
            axes[row, k].set_axis_off()
    paths.append(save_figure(fig, out_dir / f"{name}_slices.png",
                             f"{name}: fixed, moving and warped images in three planes ({', '.join(planes)}), one grey "
                             "window for all."))

    fig = new_figure((3 * PANEL_INCHES, 2 * PANEL_INCHES))
    axes = fig.subplots(2, 3)
    for row, (label, vol) in enumerate((("before: fixed | moving", m), ("after: fixed | warped", w))):
        for k in range(3):
            axes[row, k].imshow(checkerboard(_slice(f, k, idx[k]), _slice(vol, k, idx[k])), **grey)
            axes[row, k].set_title(f"{label}, {planes[k]}", fontsize=8)
            axes[row, k].set_axis_off()
    paths.append(save_figure(fig, out_dir / f"{name}_checkerboard.png",
                             f"{name}: checkerboards of the fixed image with the moving image (before) and with the warped "
                             "image (after registration); edges that continue across tiles are aligned."))

    in_plane = [a for a in range(3) if a != grid_plane]
    background = _slice(f, grid_plane, idx[grid_plane])
    step = grid_step or max(1, max(background.shape) // 16)
    fig = new_figure((5.0, 5.0))
    ax = fig.subplots()
    ax.imshow(background, **grey)
    _grid_lines(ax, _slice(u[in_plane[0]], grid_plane, idx[grid_plane]), _slice(u[in_plane[1]], grid_plane, idx[grid_plane]),
                step)
    ax.set_xlim(-0.5, background.shape[1] - 0.5)
    ax.set_ylim(background.shape[0] - 0.5, -0.5)
    ax.set_title(f"deformation grid, {planes[grid_plane]}", fontsize=9)
    ax.set_axis_off()
    paths.append(save_figure(fig, out_dir / f"{name}_grid.png",
                             f"{name}: a regular grid every {step} voxels moved by the in-plane displacement "
                             f"(axes {in_plane[0]} and {in_plane[1]}) over the fixed image, {planes[grid_plane]}."))

    folds = jac <= 0
    spread = max(float(np.abs(jac - 1).max()), 1e-6)
    norm = colors.TwoSlopeNorm(vcenter=1.0, vmin=1.0 - spread, vmax=1.0 + spread)
    fig = new_figure((3 * PANEL_INCHES + 0.8, PANEL_INCHES + 0.3))
    axes = fig.subplots(1, 3)
    for k in range(3):
        image = axes[k].imshow(_slice(jac, k, idx[k]), cmap="RdBu_r", norm=norm, interpolation="nearest")
        fold = _slice(folds, k, idx[k])
        overlay = np.zeros(fold.shape + (4,))
        overlay[fold] = FOLD_RGBA
        axes[k].imshow(overlay, interpolation="nearest")
        axes[k].set_title(f"det J, {planes[k]}: {int(fold.sum())} folded", fontsize=8)
        axes[k].set_axis_off()
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="det J")
    paths.append(save_figure(fig, out_dir / f"{name}_jacobian.png",
                             f"{name}: Jacobian determinant of the deformation (blue < 1 contraction, red > 1 expansion), "
                             f"folding (det J <= 0) in magenta; {int(folds.sum())} of {folds.size} voxels folded "
                             f"({100 * folds.mean():.3f} %), det J from {jac.min():.3f} to {jac.max():.3f}."))
    return paths
