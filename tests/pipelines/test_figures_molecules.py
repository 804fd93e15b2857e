"""Molecule and crystal figures (issue #11): the plotting functions on hand-made molecules, a crystal
and token counts, and qm9-uni3dar / geomdrugs-uni3dar / mp20-uni3dar on their embedded defaults
(CI-size overrides) writing PNGs that exist, decode, have the documented size, are not blank, whose captions agree with
metrics.json, and that the molecule grid is skipped with a note (not a failure) without RDKit."""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("rdkit")

from threefold.datasets.errors import DataFormatError  # noqa: E402
from threefold.pipelines.figures import png_caption  # noqa: E402
from threefold.pipelines.figures_molecules import (  # noqa: E402
    INVALID_COLOUR,
    VALID_COLOUR,
    plot_crystal_grid,
    plot_molecule_grid,
    plot_token_lengths,
)
from figure_checks import assert_not_blank, decode  # noqa: E402


def has_colour(img: np.ndarray, rgb, tol: float = 0.03) -> bool:
    return int((np.abs(img[..., :3] - np.asarray(rgb)).max(-1) < tol).sum()) > 20


# Ethanol (C, C, O, 6 H) from a standard conformer, Å
ETHANOL = (np.array([6, 6, 8, 1, 1, 1, 1, 1, 1]), np.array([
    [-0.8883, 0.1670, -0.0273], [0.4658, -0.5116, -0.0368], [1.4311, 0.3229, 0.5867], [-0.8487, 1.1175, -0.5695],
    [-1.6471, -0.4704, -0.4896], [-1.1964, 0.3907, 0.9977], [0.7828, -0.7369, -1.0589], [0.4200, -1.4593, 0.5103],
    [1.4816, 1.1533, 0.0839]]))  # fmt: skip
# Neutral NH4: nitrogen with four hydrogens at 1.01 Å has no neutral bond-order assignment
NH4 = (np.array([7, 1, 1, 1, 1]), np.array([[0, 0, 0], [0.58, 0.58, 0.58], [-0.58, -0.58, 0.58], [-0.58, 0.58, -0.58],
                                           [0.58, -0.58, -0.58]], dtype=float))  # fmt: skip
EMPTY = (np.zeros(0, np.int64), np.zeros((0, 3)))


def test_molecule_grid_marks_validity(tmp_path):
    path = plot_molecule_grid(tmp_path / "grid.png", [ETHANOL, NH4, EMPTY])
    img = decode(path)
    assert img.shape[:2] == (250, 750)  # one row of three 250 px cells
    assert_not_blank(img, path)
    first, rest = img[:, :250], img[:, 250:]
    assert has_colour(first, VALID_COLOUR) and not has_colour(first, INVALID_COLOUR)
    assert has_colour(rest, INVALID_COLOUR) and not has_colour(rest, VALID_COLOUR)
    assert "1 valid" in png_caption(path) and "2 invalid" in png_caption(path)
    with pytest.raises(DataFormatError, match=r"molecule 0: numbers \(9,\) and positions \(9, 2\)"):
        plot_molecule_grid(tmp_path / "bad.png", [(ETHANOL[0], ETHANOL[1][:, :2])])


def test_token_length_histogram(tmp_path):
    a, b = np.array([6, 6, 6, 7]), np.array([9, 10, 10, 12])
    path = plot_token_lengths(tmp_path / "len.png", {"two-level": a, "per child": b})
    img = decode(path)
    assert img.shape[:2] == (400, 600)
    assert_not_blank(img, path)
    assert "two-level: mean 6.25, min 6, max 7; per child: mean 10.25, min 9, max 12" in png_caption(path)
    with pytest.raises(DataFormatError, match="non-negative ints"):
        plot_token_lengths(tmp_path / "bad.png", {"x": np.array([1.5])})


def test_crystal_grid(tmp_path):
    pytest.importorskip("ase")
    from ase.build import bulk

    si = bulk("Si", "diamond", a=5.43)
    crystal = {"numbers": si.numbers, "frac": si.get_scaled_positions(), "lattice": si.cell.array}
    path = plot_crystal_grid(tmp_path / "c.png", [crystal, None, crystal], [True, False, False])
    img = decode(path)
    assert img.shape[:2] == (250, 750)
    assert_not_blank(img, path)
    assert has_colour(img[:, :250], VALID_COLOUR) and has_colour(img[:, 250:], INVALID_COLOUR)
    assert "1 valid" in png_caption(path) and "2 invalid" in png_caption(path)


def test_tree_token_counts_of_one_atom():
    """Independent count: one atom in a depth-6 octree has one non-empty node per level (6 tokens)
    and one occupied child per level (5 non-root nodes + its finest cell = 6)."""
    from threefold.science.octree import OctreeTokenizer

    c = OctreeTokenizer("qm9").tokenize(np.array([6]), np.zeros((1, 3))).compression()
    assert c["tree_tokens"].tolist() == [6] and c["child_tokens"].tolist() == [6]


def run_dir(tmp_path: Path, name: str) -> Path:
    return next((tmp_path / name).iterdir())


def check_pngs(run: Path, expected: dict[str, tuple[int, int]]) -> None:
    figs = run / "figures"
    assert sorted(p.name for p in figs.glob("*.png")) == sorted(expected)
    report = (run / "report.md").read_text()
    for name, shape in expected.items():
        img = decode(figs / name)
        if name == "curves.png":  # 400 x 320 px per logged metric family, at most 3 a row
            assert img.shape[0] % 320 == 0 and img.shape[1] % 400 == 0, img.shape
        else:
            assert img.shape[:2] == shape, (name, img.shape)
        assert_not_blank(img, figs / name)
        assert f"(figures/{name})" in report


SMALL_MOLECULE_RUN = ["limit_molecules=24", "heldout_fraction=0.25", "model.d_model=32", "model.layers=1", "model.heads=2",
                      "trainer.max_epochs=2", "trainer.batch_size=6", "sample.num=6", "sample.batch_size=6",
                      "sample.max_items=120", "trainer.accelerator=cpu"]  # fmt: skip


def run_and_check_molecule_figures(tmp_path, pipeline: str) -> tuple[Path, dict]:
    """A small run of a molecule pipeline; its figures' sizes, the sample grid's validity count against
    metrics.json and the token-length caption's structure count."""
    from threefold.pipelines.cli import main

    assert main(["run", pipeline, *SMALL_MOLECULE_RUN, "--runs-dir", str(tmp_path)]) == 0
    run = run_dir(tmp_path, pipeline)
    metrics = json.loads((run / "metrics.json").read_text())
    check_pngs(run, {"curves.png": (0, 0), "token_lengths.png": (400, 600), "samples.png": (500, 1000)})
    valid = int(re.search(r"(\d+) valid", png_caption(run / "figures" / "samples.png")).group(1))
    assert valid == round(metrics["sampling"]["validity"] * 6)
    assert "24 of 24 structures" in png_caption(run / "figures" / "token_lengths.png")
    return run, metrics


def test_qm9_uni3dar_figures_and_missing_rdkit(tmp_path, monkeypatch, caplog):
    from threefold.pipelines.config import read_yaml, resolve_config
    from threefold.pipelines.registry import get_pipeline

    run, metrics = run_and_check_molecule_figures(tmp_path, "qm9-uni3dar")

    pipe = get_pipeline("qm9-uni3dar")
    cfg = resolve_config(pipe.config_class, overrides=read_yaml(run / "config.yaml"))
    (run / "figures" / "samples.png").unlink()
    monkeypatch.setitem(sys.modules, "rdkit", None)  # import rdkit now fails, as on the GPU image
    with caplog.at_level(logging.WARNING):
        written = pipe.figures(cfg, run, metrics)
    assert sorted(p.name for p in written) == ["curves.png", "token_lengths.png"]
    assert "samples.png skipped" in caplog.text and "threefold[mol]" in caplog.text


def test_geomdrugs_uni3dar_figures(tmp_path):
    """geomdrugs-uni3dar shares ``_Uni3DARPipelineBase.figures`` with qm9-uni3dar; its own embedded default."""
    pytest.importorskip("rdkit")
    run_and_check_molecule_figures(tmp_path, "geomdrugs-uni3dar")


def test_mp20_uni3dar_figures(tmp_path):
    pytest.importorskip("ase")
    from threefold.pipelines.cli import main

    overrides = ["model.d_model=32", "model.layers=1", "model.heads=2", "trainer.max_epochs=1", "trainer.batch_size=16",
                 "sample.num=4", "sample.batch_size=4", "sample.max_items=300", "trainer.accelerator=cpu",
                 "limit_molecules=20"]  # fmt: skip
    assert main(["run", "mp20-uni3dar", *overrides, "--runs-dir", str(tmp_path)]) == 0
    run = run_dir(tmp_path, "mp20-uni3dar")
    metrics = json.loads((run / "metrics.json").read_text())
    check_pngs(run, {"curves.png": (0, 0), "token_lengths.png": (400, 600), "samples.png": (250, 1000)})
    valid = int(re.search(r"(\d+) valid", png_caption(run / "figures" / "samples.png")).group(1))
    assert valid == round(metrics["sampling"]["valid"] * 4)
    assert "20 of 20 structures" in png_caption(run / "figures" / "token_lengths.png")
