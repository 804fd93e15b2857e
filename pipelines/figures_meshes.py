"""Mesh figures (issue #11): the input voxels beside the output polygon mesh with each convex in its
own colour, the picture of BSP-Net (Chen, Tagliasacchi and Zhang, CVPR 2020, Fig. 1/6).

Pure plotting, headless (matplotlib ``Poly3DCollection`` on an Agg ``Figure``; no OpenGL context is
needed, which open3d's offscreen renderer would require). Coordinates follow IM-NET / BSP-Net: the
unit cube ``[-0.5, 0.5]^3``, voxel ``(i, j, k)`` of an ``R^3`` grid centred at
``((i, j, k) + 0.5) / R - 0.5`` (x, y, z), y up as in ShapeNet (shown as matplotlib's vertical axis).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from threefold.datasets.errors import DataFormatError
from threefold.pipelines.figures import _class_colours, new_figure, save_figure

PANEL_INCHES = 4.0
LIGHT = np.array([0.3, -0.5, 0.8]) / np.linalg.norm([0.3, -0.5, 0.8])  # in the displayed (x, z, y) frame
VOXEL_COLOUR = np.array([0.55, 0.62, 0.75])


def polygon_parts(polygons: Sequence[Sequence[int]], num_vertices: int) -> np.ndarray:
    """(F,) int64 part index of every polygon: connected components of polygons sharing a vertex.

    BSP-Net meshes keep each convex's vertices to itself (no welding across parts), so the
    components are exactly the convexes, numbered in order of their first polygon.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    sizes = np.array([len(p) for p in polygons], dtype=np.int64)
    if (sizes < 3).any():
        raise DataFormatError(f"polygon {int(np.argmax(sizes < 3))} has {int(sizes.min())} vertices; expected at least 3")
    flat = np.concatenate([np.asarray(p, np.int64) for p in polygons]) if len(polygons) else np.zeros(0, np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= num_vertices):
        raise DataFormatError(f"polygon vertex index {int(flat.max())} outside the {num_vertices} vertices")
    owner = np.repeat(np.arange(len(polygons)), sizes)
    # bipartite graph polygons <-> vertices: polygons in one component share vertices transitively
    n = len(polygons) + num_vertices
    graph = coo_matrix((np.ones(flat.size), (owner, len(polygons) + flat)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    face_labels = labels[: len(polygons)]
    _, first = np.unique(face_labels, return_index=True)
    order = np.argsort(np.argsort(first))  # renumber components by their first polygon
    remap = dict(zip(np.unique(face_labels).tolist(), order.tolist()))
    return np.array([remap[c] for c in face_labels.tolist()], dtype=np.int64)


def _shade(faces: list[np.ndarray], base: np.ndarray) -> np.ndarray:
    """(F, 3) face colours: ``base`` (F, 3) scaled by a fixed two-sided Lambert light."""
    shade = np.empty(len(faces))
    for i, f in enumerate(faces):
        n = np.cross(f[1] - f[0], f[2] - f[0])
        shade[i] = 0.45 + 0.55 * abs(float(n @ LIGHT)) / max(float(np.linalg.norm(n)), 1e-12)
    return np.clip(base * shade[:, None], 0, 1)


def _cube_axis(ax: Any, title: str) -> None:
    ax.set_xlim(-0.5, 0.5), ax.set_ylim(-0.5, 0.5), ax.set_zlim(-0.5, 0.5)
    ax.set_box_aspect((1, 1, 1))
    ax.view_init(elev=20, azim=-60)
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)


def draw_convex_mesh(ax: Any, vertices: np.ndarray, polygons: Sequence[Sequence[int]], title: str = "") -> int:
    """Draw a polygon mesh on a 3D axis, each convex (:func:`polygon_parts`) in its own colour;
    returns the number of convexes."""
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    verts = np.asarray(vertices, dtype=np.float64)
    if verts.ndim != 2 or verts.shape[1] != 3 or not np.isfinite(verts).all():
        raise DataFormatError(f"mesh vertices of shape {verts.shape}; expected finite (V, 3)")
    parts = polygon_parts(polygons, len(verts))
    count = int(parts.max()) + 1 if len(parts) else 0
    view = verts[:, [0, 2, 1]]  # matplotlib's z is up; the data's y is up
    faces = [view[np.asarray(p)] for p in polygons]
    if faces:
        colours = _shade(faces, _class_colours(max(count, 1))[parts % max(count, 1)])
        ax.add_collection3d(Poly3DCollection(faces, facecolors=colours, edgecolors=(0.1, 0.1, 0.1, 0.35),
                                             linewidths=0.3))
    _cube_axis(ax, title)
    return count


def draw_voxels(ax: Any, voxels: np.ndarray, title: str = "") -> int:
    """Draw the exposed faces of an occupancy grid (R, R, R) in the unit cube; returns the number
    of occupied voxels."""
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    occ = np.asarray(voxels)
    if occ.ndim == 4 and occ.shape[-1] == 1:
        occ = occ[..., 0]
    if occ.ndim != 3 or len(set(occ.shape)) != 1:
        raise DataFormatError(f"voxels of shape {np.asarray(voxels).shape}; expected a cube (R, R, R[, 1])")
    occ = occ > 0
    r = occ.shape[0]
    padded = np.pad(occ, 1)
    faces = []
    # one square per (occupied voxel, empty neighbour) pair: the surface, never hidden inner faces
    for axis in range(3):
        for step in (-1, 1):
            neighbour = np.roll(padded, -step, axis=axis)[1:-1, 1:-1, 1:-1]
            idx = np.argwhere(occ & ~neighbour).astype(np.float64)
            if not len(idx):
                continue
            corner = idx + (step > 0)  # the face plane along `axis`
            u, v = [a for a in range(3) if a != axis]
            quad = np.zeros((len(idx), 4, 3))
            for q, (du, dv) in enumerate(((0, 0), (1, 0), (1, 1), (0, 1))):
                quad[:, q] = idx
                quad[:, q, axis] = corner[:, axis]
                quad[:, q, u] += du
                quad[:, q, v] += dv
            faces.append(quad / r - 0.5)
    if faces:
        quads = np.concatenate(faces)[..., [0, 2, 1]]
        colours = _shade(list(quads), np.tile(VOXEL_COLOUR, (len(quads), 1)))
        ax.add_collection3d(Poly3DCollection(quads, facecolors=colours, edgecolors="none"))
    _cube_axis(ax, title)
    return int(occ.sum())


def plot_voxels_and_convexes(
    out: Path,
    voxels: np.ndarray,
    vertices: np.ndarray,
    polygons: Sequence[Sequence[int]],
    name: str = "",
    caption: str | None = None,
) -> Path:
    """Input voxels (R, R, R) beside the output mesh (``vertices`` (V, 3) float in the unit cube,
    ``polygons`` lists of vertex indices) with one colour per convex; 800 × 400 px PNG at ``out``."""
    fig = new_figure((2 * PANEL_INCHES, PANEL_INCHES))
    occupied = draw_voxels(fig.add_subplot(1, 2, 1, projection="3d"), voxels, f"{name} input voxels".strip())
    count = draw_convex_mesh(fig.add_subplot(1, 2, 2, projection="3d"), vertices, polygons, "output convexes")
    caption = caption or (f"{name}: input voxels ({occupied} occupied of {np.asarray(voxels).shape[0]}^3) and the "
                          f"output mesh, {count} convexes, each in its own colour.").strip()
    return save_figure(fig, out, caption)
