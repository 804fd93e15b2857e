"""Point-cloud figures (issue #11): masked input, reconstruction and ground truth side by side for
masked point modelling (Point-MAE, Pang et al. ECCV 2022, Fig. 1/4), and the three depth-map views
with their 2D-guided saliency for I2P-MAE (Zhang et al., "Learning 3D Representations from 2D
Pre-trained Models via Image-to-Point Masked Autoencoders", CVPR 2023, Fig. 3).

Pure plotting: NumPy arrays in, PNG paths out, headless (``Figure`` + Agg through
:func:`threefold.pipelines.figures.new_figure`). Point clouds are drawn as matplotlib 3D scatters
with an equal-aspect cube around the ground truth, y up as in ShapeNet (matplotlib's z axis shows
the data's y). Sizes at 100 dpi: one 300 × 300 px cell per cloud; depth views 300 × 300 px each.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from threefold.datasets.errors import ConfigError, DataFormatError
from threefold.pipelines.figures import figures_dir, new_figure, save_figure

CELL_INCHES = 3.0
VISIBLE_COLOUR = (0.12, 0.47, 0.71)  # tab:blue
MASKED_COLOUR = (1.0, 0.50, 0.05)  # tab:orange


def _points(a: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(a, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != 3:
        raise DataFormatError(f"{what}: array of shape {x.shape}; expected (N, 3) points")
    if not np.isfinite(x).all():
        raise DataFormatError(f"{what}: holds NaN or inf coordinates")
    return x


def scatter_cloud(ax: Any, layers: Sequence[tuple[np.ndarray, tuple[float, float, float]]], centre: np.ndarray,
                  half: float, title: str) -> None:
    """Draw ``(points (N, 3), rgb)`` layers on a 3D axis, y up, in the cube ``centre ± half``."""
    for pts, colour in layers:
        if len(pts):
            ax.scatter(pts[:, 0], pts[:, 2], pts[:, 1], s=3.0, color=colour, depthshade=False, linewidths=0)
    ax.set_xlim(centre[0] - half, centre[0] + half)
    ax.set_ylim(centre[2] - half, centre[2] + half)
    ax.set_zlim(centre[1] - half, centre[1] + half)
    ax.set_box_aspect((1, 1, 1))
    ax.view_init(elev=20, azim=-60)
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)


def plot_point_reconstructions(
    out: Path,
    visible: Sequence[np.ndarray],
    predicted: Sequence[np.ndarray],
    target: Sequence[np.ndarray],
    names: Sequence[str] | None = None,
    caption: str | None = None,
) -> Path:
    """Masked point modelling, one row per shape: the masked input (visible points), the
    reconstruction (visible points + predicted masked points) and the ground truth (visible points +
    the true masked points). Visible points blue, masked ones orange, as in Point-MAE's figures.

    ``visible[i]`` (V_i, 3), ``predicted[i]`` (M_i, 3), ``target[i]`` (M_i', 3) float, in the model's
    (normalised) units, patch offsets already added back to their centres. Writes a
    900 × (300·n) px PNG to ``out``.
    """
    n = len(visible)
    if n == 0 or len(predicted) != n or len(target) != n:
        raise ConfigError(f"plot_point_reconstructions: {n} visible, {len(predicted)} predicted, {len(target)} "
                          "target clouds; expected the same number (at least one)")
    names = list(names) if names is not None else [f"shape {i}" for i in range(n)]
    if len(names) != n:
        raise ConfigError(f"plot_point_reconstructions: {len(names)} names for {n} shapes")
    fig = new_figure((3 * CELL_INCHES, CELL_INCHES * n))
    for i in range(n):
        vis = _points(visible[i], f"visible[{i}]")
        pred = _points(predicted[i], f"predicted[{i}]")
        gt = _points(target[i], f"target[{i}]")
        full = np.concatenate([vis, gt])
        lo, hi = full.min(0), full.max(0)
        centre, half = (lo + hi) / 2, max(float((hi - lo).max()) / 2, 1e-6)
        panels = (
            (f"{names[i]}\nmasked input", [(vis, VISIBLE_COLOUR)]),
            ("reconstruction", [(vis, VISIBLE_COLOUR), (pred, MASKED_COLOUR)]),
            ("ground truth", [(vis, VISIBLE_COLOUR), (gt, MASKED_COLOUR)]),
        )
        for j, (title, layers) in enumerate(panels):
            scatter_cloud(fig.add_subplot(n, 3, 3 * i + j + 1, projection="3d"), layers, centre, half, title)
    caption = caption or (
        f"Masked input, reconstruction and ground truth of {n} shapes (visible points blue, masked points orange)."
    )
    return save_figure(fig, out, caption)


def plot_depth_views(
    fig_dir: Path,
    depth_maps: np.ndarray,
    saliency: np.ndarray | None = None,
    name: str = "depth_views",
    view_names: Sequence[str] = ("front", "side", "top"),
    caption: str | None = None,
) -> list[Path]:
    """I2P-MAE's three projected depth maps and, when given, the 2D-guided saliency of each view.

    ``depth_maps`` (3, H, W) float: depth per pixel (any unit; 0 or NaN where no point projects,
    drawn as background). ``saliency`` (3, H, W) float or None: the 2D pre-trained model's
    attention back-projected per view; drawn as a heat map over the grey depth map. ``fig_dir``: a
    run folder or its ``figures/`` folder (PNG goes to ``figures/<name>.png``). Returns the written
    path in a list: 900 × 300 px (depth only) or 900 × 600 px (depth and saliency).
    """
    depth = np.asarray(depth_maps, dtype=np.float64)
    if depth.ndim != 3 or depth.shape[0] != len(view_names):
        raise DataFormatError(f"depth_maps of shape {depth.shape}; expected ({len(view_names)}, H, W)")
    sal = None
    if saliency is not None:
        sal = np.asarray(saliency, dtype=np.float64)
        if sal.shape != depth.shape:
            raise DataFormatError(f"saliency of shape {sal.shape}; expected the depth maps' shape {depth.shape}")
        if not np.isfinite(sal).all():
            raise DataFormatError("saliency holds NaN or inf values")
    out_dir = Path(fig_dir) if Path(fig_dir).name == "figures" else figures_dir(fig_dir)
    empty = ~np.isfinite(depth) | (depth == 0)
    rows = 1 if sal is None else 2
    fig = new_figure((3 * CELL_INCHES, CELL_INCHES * rows))
    axes = np.atleast_2d(fig.subplots(rows, 3, squeeze=False))
    if sal is not None:  # one saliency scale for the three views; a constant map still gets a range
        lo, hi = float(sal.min()), float(sal.max())
        hi = hi if hi > lo else lo + 1.0
    occupied = depth[~empty]
    vmin, vmax = (float(occupied.min()), float(occupied.max())) if occupied.size else (0.0, 1.0)
    for v, view in enumerate(view_names):
        shown = np.ma.masked_array(depth[v], empty[v])
        image = axes[0, v].imshow(shown, cmap="viridis_r", vmin=vmin, vmax=vmax, interpolation="nearest")
        axes[0, v].set_title(f"depth, {view} view", fontsize=9)
        if sal is not None:
            axes[1, v].imshow(np.where(empty[v], np.nan, 1.0), cmap="gray", vmin=0, vmax=2, interpolation="nearest")
            heat = axes[1, v].imshow(sal[v], cmap="inferno", alpha=0.75, interpolation="nearest", vmin=lo, vmax=hi)
            axes[1, v].set_title(f"2D saliency, {view} view", fontsize=9)
    for ax in axes.ravel():
        ax.set_axis_off()
    fig.colorbar(image, ax=list(axes[0]), shrink=0.8, label="depth")
    if sal is not None:
        fig.colorbar(heat, ax=list(axes[1]), shrink=0.8, label="saliency")
    caption = caption or (
        f"Depth maps of the {', '.join(view_names)} views (near: yellow, far: purple, no point: white)"
        + (" and the 2D-guided saliency of each view." if sal is not None else ".")
    )
    return [save_figure(fig, out_dir / f"{name}.png", caption)]
