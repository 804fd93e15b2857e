"""Crystal validity against ASE's minimum-image distances and hand-checked compositions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from threefold.science.crystal_metrics import composition_valid, min_periodic_distance, structure_valid

ase = pytest.importorskip("ase")


def _crystals():
    import ase.io
    from ase.build import bulk

    out = [ase.io.read(p) for p in sorted((Path(ase.__file__).parent / "test/testdata/minerals").glob("*.cif"))]
    return out + [bulk("Cu", "fcc", a=3.6), bulk("NaCl", "rocksalt", a=5.64), bulk("Mg", "hcp", a=3.2, c=5.2)]


def test_min_distance_matches_ase_minimum_image():
    for atoms in _crystals():
        lattice = atoms.cell.array
        frac = atoms.get_scaled_positions()
        expected = np.inf
        if len(atoms) > 1:
            d = atoms.get_all_distances(mic=True)
            expected = d[~np.eye(len(atoms), dtype=bool)].min()
        shifts = np.array([[i, j, k] for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1) if (i, j, k) != (0, 0, 0)])
        expected = min(expected, np.linalg.norm(shifts @ lattice, axis=1).min())  # an atom and its own image
        assert min_periodic_distance(frac, lattice) == pytest.approx(expected, abs=1e-6)
        assert structure_valid(frac, lattice)


def test_structure_invalid_cases():
    lattice = np.eye(3) * 4.0
    assert not structure_valid(np.array([[0.0, 0, 0], [0.05, 0, 0]]), lattice)  # 0.2 Å apart
    assert not structure_valid(np.array([[0.0, 0, 0], [0.99, 0, 0]]), lattice)  # 0.04 Å through the boundary
    assert not structure_valid(np.array([[0.0, 0, 0]]), np.diag([4.0, 4.0, 1e-3]))  # flat cell


@pytest.mark.parametrize(
    "formula, valid",
    [([11, 17], True), ([11, 17, 17], False), ([26, 26, 8, 8, 8], True), ([29], True), ([29, 30], True),
     ([14, 6], True), ([1, 1, 8], True), ([8, 8, 11], False), ([3, 8, 8], False), ([94, 8, 8], False)],
)  # fmt: skip
def test_composition_validity(formula, valid):
    # NaCl ok, NaCl2 not neutral, Fe2O3 ok, Cu element, CuZn alloy, SiC, H2O; NaO2 has no neutral assignment
    # in the common states (superoxide is not among them); LiO2 likewise; Pu is outside the table -> invalid
    assert composition_valid(np.array(formula)) is valid
