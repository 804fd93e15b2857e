"""Crystal readers: ASE's shipped CIFs, an MP-20 CSV and a CIF written here from the CIF 1.1 spec."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from threefold.datasets.crystals import read_cif, read_mp20_csv, write_cif
from threefold.datasets.errors import DataFormatError

pytest.importorskip("ase")

# Rock salt in P1 with the 8 atoms of the conventional cell listed explicitly (CIF 1.1 core tags)
NACL_P1 = """data_NaCl
_cell_length_a 5.64
_cell_length_b 5.64
_cell_length_c 5.64
_cell_angle_alpha 90
_cell_angle_beta 90
_cell_angle_gamma 90
_symmetry_space_group_name_H-M 'P 1'
loop_
_symmetry_equiv_pos_as_xyz
'x, y, z'
loop_
_atom_site_label
_atom_site_type_symbol
_atom_site_fract_x
_atom_site_fract_y
_atom_site_fract_z
Na1 Na 0.0 0.0 0.0
Na2 Na 0.5 0.5 0.0
Na3 Na 0.5 0.0 0.5
Na4 Na 0.0 0.5 0.5
Cl1 Cl 0.5 0.0 0.0
Cl2 Cl 0.0 0.5 0.0
Cl3 Cl 0.0 0.0 0.5
Cl4 Cl 0.5 0.5 0.5
"""


def test_cif_by_spec_and_writer_round_trip(tmp_path):
    p = tmp_path / "nacl.cif"
    p.write_text(NACL_P1)
    s = read_cif(p)
    np.testing.assert_allclose(s["lattice"], np.eye(3) * 5.64, atol=1e-5)
    assert sorted(s["numbers"].tolist()) == [11] * 4 + [17] * 4
    d = np.linalg.norm(s["positions"][:, None] - s["positions"][None], axis=-1)
    assert d[d > 0].min() == pytest.approx(2.82, abs=1e-4)  # Na-Cl nearest distance a/2
    back = read_cif(write_cif(s, tmp_path / "out.cif"))
    np.testing.assert_allclose(back["lattice"], s["lattice"], atol=1e-4)
    np.testing.assert_allclose(np.sort(back["frac"], 0), np.sort(s["frac"], 0), atol=1e-5)


def test_ase_shipped_minerals():
    import ase

    cifs = sorted((Path(ase.__file__).parent / "test/testdata/minerals").glob("*.cif"))
    for p in cifs:
        s = read_cif(p)
        assert s["positions"].shape == (len(s["numbers"]), 3)
        assert ((s["frac"] >= 0) & (s["frac"] < 1)).all()
        shift = s["positions"].astype(np.float64) @ np.linalg.inv(s["lattice"].astype(np.float64)) - s["frac"]
        np.testing.assert_allclose(shift, np.round(shift), atol=1e-5)  # wrapping moves by whole cells only


def test_mp20_csv(tmp_path):
    p = tmp_path / "train.csv"
    with p.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["", "material_id", "formation_energy_per_atom", "pretty_formula", "cif"])
        w.writerow([0, "mp-22862", -2.0, "NaCl", NACL_P1])
    (s,) = read_mp20_csv(p)
    assert s["name"] == "mp-22862" and s["props"]["pretty_formula"] == "NaCl"
    assert s["props"]["formation_energy_per_atom"] == -2.0 and len(s["numbers"]) == 8
    bad = tmp_path / "bad.csv"
    bad.write_text("material_id,structure\nmp-1,xyz\n")
    with pytest.raises(DataFormatError, match="no 'cif' column"):
        read_mp20_csv(bad)
    broken = tmp_path / "broken.csv"
    with broken.open("w", newline="") as f:
        csv.writer(f).writerows([["material_id", "cif"], ["mp-2", "data_x\n_cell_length_a 1\n"]])
    with pytest.raises(DataFormatError, match="row 0"):
        read_mp20_csv(broken)
