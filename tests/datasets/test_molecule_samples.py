"""The embedded molecule sample: bundled SMILES, deterministic ETKDG conformers, SDF writer."""

from __future__ import annotations

import numpy as np
import pytest

from threefold.datasets.errors import DataFormatError
from threefold.datasets.molecule_samples import embedded_molecules, embedded_smiles, smiles_to_conformer, write_sdf

pytest.importorskip("rdkit")


def test_bundled_smiles_are_qm9_like():
    from rdkit import Chem

    smiles = embedded_smiles()
    assert len(smiles) == 419
    for s in smiles:
        m = Chem.MolFromSmiles(s)
        assert m.GetNumHeavyAtoms() <= 9 and {a.GetSymbol() for a in m.GetAtoms()} <= {"C", "N", "O", "F"}


def test_conformers_are_deterministic_and_keep_hydrogens():
    a = embedded_molecules(limit=5)
    b = embedded_molecules(limit=5)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["positions"], y["positions"])
        assert x["positions"].dtype == np.float32 and x["numbers"].dtype == np.int64
    first = a[0]  # CC1=CC(=O)C=CC1=O, C7H6O2
    assert sorted(first["numbers"].tolist()) == sorted([6] * 7 + [1] * 6 + [8] * 2)
    assert first["name"] == "NCI-1"


def test_sdf_writer_round_trip(tmp_path):
    from rdkit import Chem

    mols = embedded_molecules(limit=4)
    path = write_sdf(mols, tmp_path / "x.sdf")
    back = [m for m in Chem.SDMolSupplier(str(path), removeHs=False)]
    for m, s in zip(back, mols):
        assert m is not None
        np.testing.assert_allclose(m.GetConformer().GetPositions(), s["positions"], atol=1e-4)  # 4 decimals in V2000
        flat = Chem.MolToSmiles(Chem.MolFromSmiles(s["smiles"]), isomericSmiles=False)
        assert Chem.MolToSmiles(Chem.RemoveHs(m), isomericSmiles=False) == flat  # 3D adds stereo flags


def test_bad_smiles():
    with pytest.raises(DataFormatError, match="cannot parse"):
        smiles_to_conformer("C1CC(", name="broken")
