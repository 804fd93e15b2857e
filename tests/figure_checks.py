"""PNG checks shared by the figure tests (issue #11): decode a written figure and require that it is
not blank. Importable from any test module because tests/conftest.py puts this folder on sys.path."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def decode(path: Path) -> np.ndarray:
    """``(H, W, 3|4)`` float array of a PNG, values in [0, 1] (matplotlib's decoder)."""
    from matplotlib.image import imread

    return imread(path)


def assert_not_blank(img: np.ndarray, path: Path) -> None:
    """A figure must vary (gray-level variance above 2e-3) and draw on at least 1 % of its pixels."""
    gray = img[..., :3].mean(-1)
    assert gray.var() > 2e-3, f"{path} looks blank (variance {gray.var():.2e})"
    assert (gray < 0.9).mean() > 0.01, f"{path}: under 1% of the pixels are drawn"
