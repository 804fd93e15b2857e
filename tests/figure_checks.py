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


def check_run_figures(figs: Path, report: str, expected: dict[str, tuple[int, int]]) -> list[str]:
    """The PNGs of a run's ``figures/`` folder: besides an optional ``curves.png`` exactly ``expected``
    (name → (height, width) px at 100 dpi), ``curves.png`` 400 × 320 px per logged metric family, none
    blank, each linked from ``report``. Returns the names found."""
    names = sorted(p.name for p in figs.glob("*.png"))
    assert [n for n in names if n != "curves.png"] == sorted(expected)
    for name in names:
        img = decode(figs / name)
        if name == "curves.png":  # 400 x 320 px per logged metric family
            assert img.shape[0] % 320 == 0 and img.shape[1] % 400 == 0, img.shape
        else:
            assert img.shape[:2] == expected[name], (name, img.shape)
        assert_not_blank(img, figs / name)
        assert f"(figures/{name})" in report
    return names
