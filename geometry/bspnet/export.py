"""Write BSP-Net meshes as Wavefront ``.obj`` or ASCII ``.ply`` with planar polygon faces.

The files are written directly from the published formats (OBJ: ``v x y z`` / ``f i j k ...`` with
1-based indices; PLY 1.0 ASCII: ``vertex`` x/y/z float, ``face`` ``list uchar int vertex_indices``),
so export needs no optional package. Polygons are counter-clockwise seen from outside. With
``parts=True`` each convex also goes to its own closed file under ``<stem>_parts/``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from threefold.datasets.errors import ConfigError
from threefold.geometry.bspnet.extraction import BSPMesh


def write_polygon_mesh(path: str | Path, vertices: np.ndarray, polygons: list[np.ndarray]) -> Path:
    """Write one polygon mesh; the format follows the suffix (``.obj`` or ``.ply``)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".obj", ".ply"):
        raise ConfigError(f"{path}: mesh export supports .obj and .ply, not {path.suffix!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    vlines = "".join(f"{x:.7f} {y:.7f} {z:.7f}\n" for x, y, z in np.asarray(vertices, np.float64))
    if suffix == ".obj":
        body = "".join("v " + line for line in vlines.splitlines(keepends=True))
        body += "".join("f " + " ".join(str(int(i) + 1) for i in poly) + "\n" for poly in polygons)
        path.write_text("# BSP-Net mesh (threefold)\n" + body)
    else:
        header = (
            "ply\nformat ascii 1.0\n"
            f"element vertex {len(vertices)}\nproperty float x\nproperty float y\nproperty float z\n"
            f"element face {len(polygons)}\nproperty list uchar int vertex_indices\nend_header\n"
        )
        faces = "".join(f"{len(poly)} " + " ".join(str(int(i)) for i in poly) + "\n" for poly in polygons)
        path.write_text(header + vlines + faces)
    return path


def export_bsp_mesh(mesh: BSPMesh, path: str | Path, parts: bool = False) -> list[Path]:
    """Write the union of convexes to ``path`` and, with ``parts``, one file per convex.

    Returns the written paths (the union first). Each part file is a closed polytope.
    """
    path = Path(path)
    written = [write_polygon_mesh(path, mesh.vertices, mesh.polygons)]
    if parts:
        folder = path.with_name(f"{path.stem}_parts")
        for part in mesh.parts:
            written.append(write_polygon_mesh(folder / f"convex_{part.index:03d}{path.suffix}", part.vertices, part.polygons))
    return written
