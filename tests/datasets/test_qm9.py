"""QM9 readers on files written here from the published layout (Ramakrishnan et al. 2014, Table 2)."""

from __future__ import annotations

import numpy as np
import pytest

from threefold.datasets.errors import DataFormatError, MissingFileError
from threefold.datasets.qm9 import QM9_PROPERTIES, read_qm9_folder, read_qm9_sdf_csv, read_qm9_xyz

METHANE = """5
gdb 1\t157.7118\t157.70997\t157.70699\t0.\t13.21\t-0.3877\t0.1171\t0.5048\t35.3641\t0.044749\t-40.47893\t-40.476062\t-40.475117\t-40.498597\t6.469\t
C\t-0.0126981359\t 1.0858041578\t 0.0080009958\t-0.535689
H\t 0.002150416\t-0.0060313176\t 0.0019761204\t 0.133921
H\t 1.0117308433\t 1.4637511618\t 0.0002765748\t 0.133922
H\t-0.540815069\t 1.4475266138\t-0.8766437152\t 0.133923
H\t-0.5238136345\t 1.4379326443\t 0.9063972942\t 1.2*^-3
1341.307\t1341.3284\t1341.365\t1562.6731\t1562.7453\t3038.3205\t3151.6034\t3151.6788\t3151.7078
C\tC\t
InChI=1S/CH4/h1H4\tInChI=1S/CH4/h1H4
"""


def test_read_original_xyz(tmp_path):
    (tmp_path / "dsgdb9nsd_000001.xyz").write_text(METHANE)
    (tmp_path / "dsgdb9nsd_000002.xyz").write_text(METHANE.replace("gdb 1", "gdb 2"))
    mols = read_qm9_folder(tmp_path)
    assert [m["name"] for m in mols] == ["gdb_1", "gdb_2"]
    m = mols[0]
    assert m["numbers"].tolist() == [6, 1, 1, 1, 1] and m["numbers"].dtype == np.int64
    assert m["positions"].dtype == np.float32
    np.testing.assert_allclose(m["positions"][1], [0.002150416, -0.0060313176, 0.0019761204], rtol=1e-6)
    assert set(m["props"]) == set(QM9_PROPERTIES)
    assert m["props"]["U0"] == pytest.approx(-40.47893) and m["props"]["Cv"] == pytest.approx(6.469)
    assert m["smiles"] == "C"
    # C-H bond lengths of the published geometry are ~1.09 Å
    d = np.linalg.norm(m["positions"][1:] - m["positions"][0], axis=1)
    np.testing.assert_allclose(d, 1.09, atol=0.005)


def test_bad_qm9_files(tmp_path):
    p = tmp_path / "dsgdb9nsd_000003.xyz"
    p.write_text(METHANE.replace("\nC\t-0.0126981359", "\nCl\t-0.0126981359"))
    with pytest.raises(DataFormatError, match="element 'Cl'"):
        read_qm9_xyz(p)
    p.write_text("\n".join(METHANE.splitlines()[:5]))
    with pytest.raises(DataFormatError, match="expected n_a \\+ 5"):
        read_qm9_xyz(p)
    p.write_text(METHANE.replace("gdb 1\t157.7118\t", "gdb 1\t"))
    with pytest.raises(DataFormatError, match="15 properties"):
        read_qm9_xyz(p)
    with pytest.raises(MissingFileError):
        read_qm9_folder(tmp_path / "nothing")


def test_sdf_csv_form(tmp_path):
    pytest.importorskip("rdkit")
    block = """gdb_1
     RDKit          3D

  5  4  0  0  0  0  0  0  0  0999 V2000
   -0.0127    1.0858    0.0080 C   0  0  0  0  0  0  0  0  0  0  0  0
    0.0022   -0.0060    0.0020 H   0  0  0  0  0  0  0  0  0  0  0  0
    1.0117    1.4638    0.0003 H   0  0  0  0  0  0  0  0  0  0  0  0
   -0.5408    1.4475   -0.8766 H   0  0  0  0  0  0  0  0  0  0  0  0
   -0.5238    1.4379    0.9064 H   0  0  0  0  0  0  0  0  0  0  0  0
  1  2  1  0
  1  3  1  0
  1  4  1  0
  1  5  1  0
M  END
$$$$
"""
    (tmp_path / "gdb9.sdf").write_text(block)
    (tmp_path / "gdb9.sdf.csv").write_text("mol_id,A,u0\ngdb_1,157.7118,-40.47893\n")
    mols = read_qm9_sdf_csv(tmp_path / "gdb9.sdf")
    assert mols[0]["numbers"].tolist() == [6, 1, 1, 1, 1]
    assert mols[0]["props"]["u0"] == pytest.approx(-40.47893)
    (tmp_path / "gdb9.sdf.csv").write_text("mol_id,A\ngdb_2,1.0\n")
    with pytest.raises(DataFormatError, match="no row with mol_id 'gdb_1'"):
        read_qm9_sdf_csv(tmp_path / "gdb9.sdf")


def test_qm9_dataset_splits(tmp_path):
    import torch

    from threefold.datasets.qm9 import QM9

    for i in range(1, 21):
        (tmp_path / f"dsgdb9nsd_{i:06d}.xyz").write_text(METHANE.replace("gdb 1\t", f"gdb {i}\t"))
    parts = [QM9(tmp_path, split, seed=3) for split in ("train", "val", "test")]
    assert [len(p) for p in parts] == [16, 2, 2]
    names = [p[i]["name"] for p in parts for i in range(len(p))]
    assert sorted(names) == sorted(f"gdb_{i}" for i in range(1, 21))  # disjoint and complete
    assert parts[0][0]["positions"].dtype == torch.float32 and len(QM9(tmp_path, "all")) == 20


def test_structures_csv_form(tmp_path):
    from threefold.datasets.qm9 import read_qm9_structures_csv

    lines = ["molecule_name,atom_index,atom,x,y,z"]
    rows = METHANE.splitlines()[2:7]
    for i in (2, 0, 4, 1, 3):  # shuffled rows: the reader orders by atom_index
        sym, x, y, z = rows[i].split()[:4]
        lines.append(f"dsgdb9nsd_000001,{i},{sym},{x},{y},{z}")
    lines.append("dsgdb9nsd_000002,0,O,0.0,0.0,0.0")
    p = tmp_path / "structures.csv"
    p.write_text("\n".join(lines) + "\n")
    mols = read_qm9_structures_csv(p)
    assert [m["name"] for m in mols] == ["dsgdb9nsd_000001", "dsgdb9nsd_000002"]
    ref = read_qm9_xyz(_write(tmp_path, METHANE))
    np.testing.assert_allclose(mols[0]["positions"], ref["positions"], atol=1e-6)
    assert mols[0]["numbers"].tolist() == ref["numbers"].tolist()
    p.write_text("\n".join(lines[:3] + ["dsgdb9nsd_000001,0,C,0,0,0"]) + "\n")
    with pytest.raises(DataFormatError, match="atom_index"):
        read_qm9_structures_csv(p)


def _write(tmp_path, text):
    p = tmp_path / "dsgdb9nsd_000001.xyz"
    p.write_text(text)
    return p
