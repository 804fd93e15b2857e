"""GEOM-DRUGS pickles through the restricted unpickler: a GEOM-layout pickle built here, and a
payload pickle that must be refused before it runs."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from threefold.datasets.errors import DataFormatError, UnsafePickleError
from threefold.datasets.geom_drugs import read_geom_pickle

pytest.importorskip("rdkit")


def test_geom_layout_pickle(tmp_path):
    from rdkit import Chem
    from rdkit.Chem import AllChem

    confs = []
    for seed in (1, 2):
        m = Chem.AddHs(Chem.MolFromSmiles("CC(=O)Nc1ccccc1"))
        p = AllChem.ETKDGv3()
        p.randomSeed = seed
        AllChem.EmbedMolecule(m, p)
        confs.append({"rd_mol": m, "boltzmannweight": 0.5, "totalenergy": -40.0 - seed})
    path = tmp_path / "acetanilide.pickle"
    path.write_bytes(pickle.dumps({"smiles": "CC(=O)Nc1ccccc1", "conformers": confs, "uniqueconfs": 2}))
    out = read_geom_pickle(path)
    assert len(out) == 2 and out[1]["name"] == "acetanilide.pickle#1"
    for o, c in zip(out, confs):
        np.testing.assert_allclose(o["positions"], c["rd_mol"].GetConformer().GetPositions(), atol=1e-5)
        assert o["numbers"].tolist() == [a.GetAtomicNum() for a in c["rd_mol"].GetAtoms()]
    assert out[0]["props"]["totalenergy"] == -41.0


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_code_running_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pickle"
    path.write_bytes(pickle.dumps({"conformers": [{"rd_mol": _Payload()}]}))
    with pytest.raises(UnsafePickleError, match="system"):
        read_geom_pickle(path)
    path.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(DataFormatError, match="conformers"):
        read_geom_pickle(path)
