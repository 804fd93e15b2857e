"""LiDAR segmentation figures (issue #11): a scan seen from above (bird's-eye view) and as the
sensor sees it (range image), coloured by prediction, by ground truth and by error, in the official
SemanticKITTI colours (Behley et al., ICCV 2019; ``semantic-kitti.yaml``), plus the confusion
matrix.

Pure plotting: NumPy arrays in, PNG paths out, headless. Both views are rasterised in NumPy (one
pixel per cell, no per-point matplotlib artists), so a 120k-point scan draws in well under a second:

- bird's-eye view: ``bev_range`` metres around the sensor at ``bev_resolution`` m per pixel; where
  several points fall in one pixel the highest (largest z) is shown, as seen from above;
- range image: the spherical projection of RangeNet++ (Milioto et al., IROS 2019): column
  ``0.5 (1 - atan2(y, x) / pi) W``, row ``(1 - (pitch - fov_down) / (fov_up - fov_down)) H``, both
  floored and clipped to the image; where several points fall in one pixel the nearest is shown.
  Default 64 × 1024 for the HDL-64E (vertical field of view +2.0 to -24.8 degrees).

Colours: the official ``color_map`` is **BGR** (raw id → [b, g, r]); classes 0..18 map to raw ids
through ``learning_map_inv`` (the c-th learning id not in ``learning_ignore``, in increasing order:
official learning id c + 1). -1 (ignore) is drawn with the colour of raw id 0 ("unlabeled", black).
Error view: correct grey, wrong red, ignored (ground truth -1) black. Empty pixels are white.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from threefold.datasets.errors import ConfigError, DataFormatError, require
from threefold.datasets.semantickitti import HDL64_FOV_DEG
from threefold.pipelines.figures import figures_dir, new_figure, plot_confusion_matrix, save_figure

CORRECT_RGB = np.array([0.62, 0.62, 0.62])
WRONG_RGB = np.array([0.9, 0.0, 0.0])
IGNORE_RGB = np.array([0.0, 0.0, 0.0])
EMPTY_RGB = np.array([1.0, 1.0, 1.0])


def class_colours(color_map: Mapping[int, Sequence[int]], learning_map_inv: Mapping[int, int],
                  learning_ignore: Mapping[int, bool] | None = None) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """``(rgb (C, 3) float in [0, 1] of classes 0..C-1, rgb (3,) of ignore, raw ids (C,))`` from the
    official BGR ``color_map`` (raw id → [b, g, r] 0..255) and ``learning_map_inv`` (learning id →
    raw id). Learning ids flagged in ``learning_ignore`` (default: {0: True}, SemanticKITTI's
    "unlabeled") are no classes; the rest, in increasing order, are classes 0..C-1."""
    ignore = {0: True} if learning_ignore is None else learning_ignore
    learning = [k for k in sorted(int(k) for k in learning_map_inv) if not ignore.get(k, False)]
    raw = [int(learning_map_inv[k]) for k in learning]
    missing = [r for r in raw + [0] if r not in color_map]
    if missing:
        raise ConfigError(f"color_map has no colour for raw id(s) {missing}; expected one [b, g, r] per raw id")

    def rgb(r: int) -> np.ndarray:
        bgr = np.asarray(color_map[r], dtype=np.float64)
        if bgr.shape != (3,) or (bgr < 0).any() or (bgr > 255).any():
            raise ConfigError(f"color_map[{r}] = {color_map[r]!r}; expected [b, g, r] in 0..255")
        return bgr[::-1] / 255.0

    return np.stack([rgb(r) for r in raw]), rgb(0), raw


def range_projection(coord: np.ndarray, height: int = 64, width: int = 1024,
                     fov_deg: tuple[float, float] = HDL64_FOV_DEG) -> np.ndarray:
    """(height, width) int64: index of the nearest point in each pixel of the spherical projection
    (module docstring), -1 where no point falls. ``coord`` (N, 3) metres, sensor at the origin."""
    xyz = np.asarray(coord, dtype=np.float64)
    down, up = np.radians(fov_deg[0]), np.radians(fov_deg[1])
    if not up > down:
        raise ConfigError(f"fov_deg={fov_deg}: expected (down, up) with up > down")
    depth = np.linalg.norm(xyz, axis=1)
    keep = depth > 0
    pitch = np.arcsin(np.clip(xyz[keep, 2] / depth[keep], -1, 1))
    yaw = np.arctan2(xyz[keep, 1], xyz[keep, 0])
    u = np.clip(np.floor(0.5 * (1.0 - yaw / np.pi) * width), 0, width - 1).astype(np.int64)
    v = np.clip(np.floor((1.0 - (pitch - down) / (up - down)) * height), 0, height - 1).astype(np.int64)
    idx = np.flatnonzero(keep)
    order = np.argsort(-depth[idx], kind="stable")  # far first: the nearest point is written last
    image = np.full(height * width, -1, dtype=np.int64)
    image[v[order] * width + u[order]] = idx[order]
    return image.reshape(height, width)


def bev_projection(coord: np.ndarray, extent: float = 50.0, resolution: float = 0.1) -> np.ndarray:
    """(S, S) int64 with S = round(2 extent / resolution): index of the highest point in each cell
    of the square ``[-extent, extent)^2`` (x right, y up in the image), -1 where empty."""
    xyz = np.asarray(coord, dtype=np.float64)
    size = int(round(2 * extent / resolution))
    col = np.floor((xyz[:, 0] + extent) / resolution).astype(np.int64)
    row = np.floor((extent - xyz[:, 1]) / resolution).astype(np.int64)  # image rows grow downwards
    idx = np.flatnonzero((col >= 0) & (col < size) & (row >= 0) & (row < size))
    order = idx[np.argsort(xyz[idx, 2], kind="stable")]  # lowest first: the highest is written last
    image = np.full(size * size, -1, dtype=np.int64)
    image[row[order] * size + col[order]] = order
    return image.reshape(size, size)


def _paint(index: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """(H, W) point indices (-1 empty) → (H, W, 3) float RGB from per-point ``colours`` (N, 3)."""
    out = np.broadcast_to(EMPTY_RGB, index.shape + (3,)).copy()
    hit = index >= 0
    out[hit] = colours[index[hit]]
    return out


def _labels(a: np.ndarray, n: int, num_classes: int, what: str) -> np.ndarray:
    lab = np.asarray(a)
    if lab.shape != (n,) or not np.issubdtype(lab.dtype, np.integer):
        raise DataFormatError(f"{what}: shape {lab.shape}, dtype {lab.dtype}; expected ({n},) integer classes")
    if lab.size and (lab.min() < -1 or lab.max() >= num_classes):
        raise DataFormatError(f"{what}: classes {int(lab.min())}..{int(lab.max())}; expected -1..{num_classes - 1}")
    return lab.astype(np.int64)


def plot_lidar_views(
    fig_dir: Path,
    coord: np.ndarray,
    pred: np.ndarray,
    target: np.ndarray | None,
    color_map: Mapping[int, Sequence[int]],
    learning_map_inv: Mapping[int, int],
    name: str = "scan",
    labels: Mapping[int, str] | None = None,
    learning_ignore: Mapping[int, bool] | None = None,
    range_shape: tuple[int, int] = (64, 1024),
    fov_deg: tuple[float, float] = HDL64_FOV_DEG,
    bev_extent: float = 50.0,
    bev_resolution: float = 0.2,
) -> list[Path]:
    """Bird's-eye and range views of one scan, and its confusion matrix.

    ``coord`` (N, 3) float metres (sensor at the origin); ``pred`` (N,) int classes 0..C-1 or -1;
    ``target`` (N,) the same or None (prediction only); ``color_map`` / ``learning_map_inv`` /
    ``learning_ignore`` / ``labels`` (raw id → name, for the legend) as in SemanticKITTI's yaml
    (``threefold.datasets.semantickitti.semantickitti_config()``). ``fig_dir``: a run folder or its
    ``figures/`` folder. Writes ``<name>_bev.png`` (500 × 500 px per panel, one panel per view —
    prediction, ground truth, error — plus a 200 px legend), ``<name>_range.png`` (1100 px wide, one
    64-row image shown 2× tall per view) and, with a target, ``<name>_confusion.png``
    (:func:`plot_confusion_matrix`, rows ground truth, ignored points left out). Returns the paths.
    """
    xyz = np.asarray(coord, dtype=np.float64)
    if xyz.ndim != 2 or xyz.shape[1] != 3 or not np.isfinite(xyz).all():
        raise DataFormatError(f"coord: shape {xyz.shape}; expected finite (N, 3) metres")
    rgb, ignore_rgb, raw = class_colours(color_map, learning_map_inv, learning_ignore)
    c = len(rgb)
    p = _labels(pred, len(xyz), c, "pred")
    t = None if target is None else _labels(target, len(xyz), c, "target")
    out_dir = Path(fig_dir) if Path(fig_dir).name == "figures" else figures_dir(fig_dir)
    palette = np.vstack([rgb, ignore_rgb])  # index -1 picks the last row: ignore

    views: list[tuple[str, np.ndarray]] = [("prediction", palette[p])]
    if t is not None:
        error = np.where((t < 0)[:, None], IGNORE_RGB, np.where((p == t)[:, None], CORRECT_RGB, WRONG_RGB))
        views += [("ground truth", palette[t]), ("error (grey correct, red wrong, black ignored)", error)]
    names = [labels.get(r, str(r)) if labels is not None else f"class {k} (raw {r})" for k, r in enumerate(raw)]

    bev = bev_projection(xyz, bev_extent, bev_resolution)
    fig = new_figure((5.0 * len(views) + 2.0, 5.0))
    axes = fig.subplots(1, len(views) + 1, width_ratios=[5.0] * len(views) + [2.0])
    for ax, (title, colours) in zip(axes, views):
        ax.imshow(_paint(bev, colours), extent=(-bev_extent, bev_extent, -bev_extent, bev_extent),
                  interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("x (m)", fontsize=8)
        ax.set_ylabel("y (m)", fontsize=8)
        ax.tick_params(labelsize=7)
    _legend(axes[-1], rgb, names)
    acc = "" if t is None else _accuracy_text(p, t)
    paths = [save_figure(fig, out_dir / f"{name}_bev.png",
                         f"{name}: bird's-eye view ({2 * bev_extent:g} m square, {bev_resolution:g} m pixels, highest "
                         f"point per pixel), " + ", ".join(v for v, _ in views) + f"; SemanticKITTI colours.{acc}")]

    h, w = range_shape
    rng = range_projection(xyz, h, w, fov_deg)
    fig = new_figure((11.0, (2 * h / 100 + 0.35) * len(views)))
    axes = np.atleast_1d(fig.subplots(len(views), 1))
    for ax, (title, colours) in zip(axes, views):
        ax.imshow(_paint(rng, colours), aspect=2.0, interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.set_axis_off()
    paths.append(save_figure(fig, out_dir / f"{name}_range.png",
                             f"{name}: range image {h}x{w} (spherical projection, vertical field of view {fov_deg[1]:g} "
                             f"to {fov_deg[0]:g} degrees, nearest point per pixel), " + ", ".join(v for v, _ in views)
                             + f".{acc}"))
    if t is not None:
        valid = (t >= 0) & (p >= 0)
        conf = np.bincount(t[valid] * c + p[valid], minlength=c * c).reshape(c, c)
        paths.append(plot_confusion_matrix(conf, out_dir / f"{name}_confusion.png", names,
                                           caption=f"{name}: confusion matrix over {int(valid.sum())} labelled points "
                                                   "(rows: ground truth, each row divided by its number of points)."))
    return paths


def _accuracy_text(p: np.ndarray, t: np.ndarray) -> str:
    valid = t >= 0
    return f" Point accuracy {(p[valid] == t[valid]).mean():.4f} over {int(valid.sum())} labelled points." if valid.any() else ""


def _legend(ax: Any, rgb: np.ndarray, names: Sequence[str]) -> None:
    patches = require("matplotlib.patches", extra="viz")
    ax.set_axis_off()
    ax.legend(handles=[patches.Patch(color=tuple(col), label=n) for col, n in zip(rgb, names)], loc="center",
              fontsize=7, frameon=False)

