"""SDF records written here by hand from the CTfile spec (V2000 and V3000), XYZ by hand and extended
XYZ written by ASE as the independent writer; every unreadable record reported with its index."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from threefold.datasets.errors import DataFormatError, MissingFileError
from threefold.datasets.molecules import SDFMolecules, XYZMolecules, element_numbers, read_sdf, read_xyz
from threefold.datasets.registry import get_dataset

pytest.importorskip("rdkit")

WATER = """water
  handwritten

  3  2  0  0  0  0  0  0  0  0999 V2000
    0.0000    0.0000    0.1173 O   0  0  0  0  0  0  0  0  0  0  0  0
    0.0000    0.7572   -0.4692 H   0  0  0  0  0  0  0  0  0  0  0  0
    0.0000   -0.7572   -0.4692 H   0  0  0  0  0  0  0  0  0  0  0  0
  1  2  1  0
  1  3  1  0
M  END
> <energy>
-76.4

> <source>
test

$$$$
"""
GARBAGE = "garbage\n$$$$\n"
# carbon with five bonds: RDKit parses it but sanitization rejects the valence
PENTAVALENT = """bad valence
  handwritten

  6  5  0  0  0  0  0  0  0  0999 V2000
    0.0000    0.0000    0.0000 C   0  0  0  0  0  0  0  0  0  0  0  0
    1.0000    0.0000    0.0000 H   0  0  0  0  0  0  0  0  0  0  0  0
   -1.0000    0.0000    0.0000 H   0  0  0  0  0  0  0  0  0  0  0  0
    0.0000    1.0000    0.0000 H   0  0  0  0  0  0  0  0  0  0  0  0
    0.0000   -1.0000    0.0000 H   0  0  0  0  0  0  0  0  0  0  0  0
    0.0000    0.0000    1.0000 H   0  0  0  0  0  0  0  0  0  0  0  0
  1  2  1  0
  1  3  1  0
  1  4  1  0
  1  5  1  0
  1  6  1  0
M  END
$$$$
"""
HCN_V3000 = """hydrogen cyanide
  handwritten

  0  0  0     0  0            999 V3000
M  V30 BEGIN CTAB
M  V30 COUNTS 3 2 0 0 0
M  V30 BEGIN ATOM
M  V30 1 H -1.0660 0.0 0.0 0
M  V30 2 C 0.0 0.0 0.0 0
M  V30 3 N 1.1560 0.0 0.0 0
M  V30 END ATOM
M  V30 BEGIN BOND
M  V30 1 1 1 2
M  V30 2 3 2 3
M  V30 END BOND
M  V30 END CTAB
M  END
$$$$
"""


def _write(path, text):
    path.write_text(text)
    return path


def test_sdf_reads_atoms_positions_props_and_keeps_hydrogens(tmp_path):
    mols = read_sdf(_write(tmp_path / "m.sdf", WATER + HCN_V3000))
    water, hcn = mols
    assert water["numbers"].tolist() == [8, 1, 1] and water["numbers"].dtype == np.int64
    assert np.allclose(water["positions"], [[0, 0, 0.1173], [0, 0.7572, -0.4692], [0, -0.7572, -0.4692]])
    assert water["positions"].dtype == np.float32
    assert water["props"] == {"energy": -76.4, "source": "test"} and water["name"] == "water"
    assert hcn["numbers"].tolist() == [1, 6, 7] and hcn["index"] == 1
    assert np.allclose(hcn["positions"][:, 0], [-1.066, 0.0, 1.156])


def test_sdf_reports_every_bad_record_with_its_index(tmp_path):
    path = _write(tmp_path / "mixed.sdf", WATER + GARBAGE + PENTAVALENT + HCN_V3000)
    with pytest.raises(DataFormatError, match=r"mixed\.sdf: 2 of 4 records.*record 1: .*record 2: RDKit sanitization"):
        read_sdf(path)
    with pytest.warns(UserWarning, match="record 1.*record 2"):
        kept = read_sdf(path, skip_invalid=True)
    assert [m["index"] for m in kept] == [0, 3]
    assert [m["name"] for m in kept] == ["water", "hydrogen cyanide"]
    # without sanitization the pentavalent carbon is a readable 3D structure, hydrogens included
    with pytest.warns(UserWarning, match="record 1"):
        raw = read_sdf(path, sanitize=False, skip_invalid=True)
    assert [m["index"] for m in raw] == [0, 2, 3] and raw[1]["numbers"].tolist() == [6, 1, 1, 1, 1, 1]


def test_sdf_errors(tmp_path):
    with pytest.raises(MissingFileError, match="none.sdf"):
        read_sdf(tmp_path / "none.sdf")
    with pytest.raises(DataFormatError, match=r"\.csv"):
        read_sdf(_write(tmp_path / "m.csv", WATER))
    with pytest.raises(DataFormatError, match="no molecule records"):
        read_sdf(_write(tmp_path / "empty.sdf", ""))
    huge = HCN_V3000.replace("COUNTS 3 2", "COUNTS 1000000000 2")
    with pytest.raises(DataFormatError, match="record 0: V3000 COUNTS declares 1000000000 atoms"):
        read_sdf(_write(tmp_path / "huge.sdf", huge))
    nan = WATER.replace("    0.0000    0.0000    0.1173 O", "       nan    0.0000    0.1173 O")
    with pytest.raises(DataFormatError, match="record 0"):
        read_sdf(_write(tmp_path / "nan.sdf", nan))


def test_xyz_plain_multi_frame(tmp_path):
    text = "3\nwater\nO 0.0 0.0 0.1173\nH 0.0 0.7572 -0.4692\nh 0.0 -0.7572 -0.4692\n2\n\n6 0 0 0 0.5\n8 0 0 1.128 -0.5\n"
    frames = read_xyz(_write(tmp_path / "w.xyz", text))
    assert [f["numbers"].tolist() for f in frames] == [[8, 1, 1], [6, 8]]
    assert np.allclose(frames[1]["positions"], [[0, 0, 0], [0, 0, 1.128]])
    assert frames[1]["atom_props"]["extra"].tolist() == [0.5, -0.5]  # one extra column -> (N,)
    with pytest.raises(DataFormatError, match=r"frame 1 declares 5 atoms"):
        read_xyz(_write(tmp_path / "cut.xyz", text.replace("2\n\n6", "5\n\n6")))
    with pytest.raises(DataFormatError, match="record 0: unknown element symbol 'Qq'"):
        read_xyz(_write(tmp_path / "q.xyz", "1\n\nQq 0 0 0\n"))
    with pytest.raises(DataFormatError, match="line 1 should be the atom count"):
        read_xyz(_write(tmp_path / "bad.xyz", "three\n\nO 0 0 0\n"))
    with pytest.raises(DataFormatError, match="record 0: NaN/inf"):
        read_xyz(_write(tmp_path / "n.xyz", "1\n\nO inf 0 0\n"))
    with pytest.raises(DataFormatError, match="record 0: Lattice=.*singular"):
        read_xyz(_write(tmp_path / "s.xyz", '1\nLattice="1 0 0 2 0 0 0 0 1"\nO 0 0 0\n'))


def test_extended_xyz_written_by_ase(tmp_path):
    ase = pytest.importorskip("ase")
    import ase.io

    crystal = ase.Atoms("NaCl", scaled_positions=[[0, 0, 0], [0.5, 0.5, 0.5]],
                        cell=[[5.64, 0, 0], [0.1, 5.64, 0], [0, 0, 5.64]], pbc=[True, True, False])
    crystal.info["energy"] = -7.25
    crystal.arrays["charge"] = np.array([0.9, -0.9])
    molecule = ase.Atoms("H2O", positions=[[0, 0.7572, -0.4692], [0, -0.7572, -0.4692], [0, 0, 0.1173]])
    ase.io.write(tmp_path / "c.xyz", [crystal, molecule], format="extxyz")
    ref = ase.io.read(tmp_path / "c.xyz", index=":")
    frames = read_xyz(tmp_path / "c.xyz")
    for ours, theirs in zip(frames, ref):
        assert ours["numbers"].tolist() == theirs.numbers.tolist()
        assert np.allclose(ours["positions"], theirs.positions, atol=1e-6)
    assert np.allclose(frames[0]["lattice"], ref[0].cell.array) and frames[0]["pbc"].tolist() == [True, True, False]
    assert frames[0]["props"]["energy"] == pytest.approx(-7.25)
    assert np.allclose(frames[0]["atom_props"]["charge"], [0.9, -0.9])


def test_molecule_datasets(tmp_path):
    _write(tmp_path / "train.sdf", WATER + HCN_V3000)
    entry = get_dataset("sdf-molecules")
    assert entry.cls is SDFMolecules and entry.modality == "molecule"
    ds = entry.cls(tmp_path, split="train")
    assert len(ds) == 2 and isinstance(ds[0]["positions"], torch.Tensor) and ds[1]["numbers"].tolist() == [1, 6, 7]
    _write(tmp_path / "train.xyz", "1\nLattice=\"3 0 0 0 3 0 0 0 3\"\nFe 0 0 0\n")
    xs = get_dataset("xyz-molecules").cls(tmp_path, split="train")
    assert xs[0]["lattice"].shape == (3, 3) and xs[0]["pbc"].tolist() == [True] * 3
    assert XYZMolecules is type(xs)
    with pytest.raises(MissingFileError, match="test.sdf"):
        SDFMolecules(tmp_path, split="test")
    _write(tmp_path / "bad.sdf", WATER + GARBAGE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DataFormatError, match="record 1"):
            SDFMolecules(tmp_path, split="bad")


def test_element_numbers():
    assert element_numbers(np.array(["C", "cl", "CL", "8", "Og"])).tolist() == [6, 17, 17, 8, 118]
