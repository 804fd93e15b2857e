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


def test_cached_conformers_match_their_smiles():
    """Bonds perceived from the cached 3D coordinates (RDKit DetermineBonds) give back each SMILES."""
    from rdkit import Chem

    from threefold.science.molecule_metrics import canonical_smiles

    mols = embedded_molecules()
    assert len(mols) == 419 and [m["name"] for m in mols[:2]] == ["NCI-1", "NCI-9"]
    agree = 0
    for m in mols[::7]:
        flat = Chem.MolToSmiles(Chem.MolFromSmiles(m["smiles"]), isomericSmiles=False)
        got = canonical_smiles(m["numbers"], m["positions"])
        agree += got is not None and Chem.MolToSmiles(Chem.MolFromSmiles(got), isomericSmiles=False) == flat
    assert agree >= 0.9 * len(mols[::7])


def test_conformers_are_deterministic_and_keep_hydrogens():
    a = embedded_molecules(seed=7, limit=5)
    b = embedded_molecules(seed=7, limit=5)
    assert not np.array_equal(a[0]["positions"], embedded_molecules(limit=1)[0]["positions"])
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
