"""Generated-molecule accumulator: batched / merged updates equal the one-shot definitions."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("rdkit")

from threefold.pipelines.metrics.molecules import MoleculeGenerationMetrics, smiles_hash  # noqa: E402
from threefold.science.molecule_metrics import molecule_metrics  # noqa: E402


def _mols():
    from threefold.datasets.molecule_samples import embedded_molecules

    mols = [(m["numbers"], m["positions"]) for m in embedded_molecules(limit=12)]
    clash = (np.array([6, 6]), np.array([[0.0, 0, 0], [0.2, 0, 0]]))
    empty = (np.zeros(0, np.int64), np.zeros((0, 3)))
    return mols + mols[:3] + [clash, empty]  # 3 duplicates, 2 invalid


def test_batched_and_merged_updates_match_one_shot():
    mols = _mols()
    train = {"CC(=NO)C(C)=NO", "CCO"}
    ref = molecule_metrics(mols, train)
    acc = MoleculeGenerationMetrics(training_smiles=train)
    acc.update(mols[:7])
    acc.update(mols[7:])
    got = {k: float(v) for k, v in acc.compute().items()}
    for k in ("validity", "uniqueness", "valid_and_unique", "atom_stability", "molecule_stability", "novelty"):
        assert got[k] == pytest.approx(ref[k]), k
    assert got["num_molecules"] == len(mols)
    # two "ranks" merged: the same numbers (sum / cat reductions)
    a, b = MoleculeGenerationMetrics(training_smiles=train), MoleculeGenerationMetrics(training_smiles=train)
    a.update(mols[::2])
    b.update(mols[1::2])
    a.merge_state(b)
    merged = {k: float(v) for k, v in a.compute().items()}
    assert merged == pytest.approx(got)


def test_hash_is_stable_and_non_negative():
    assert smiles_hash("CCO") == smiles_hash("CCO") != smiles_hash("OCC")
    assert 0 <= smiles_hash("c1ccccc1") < 2**63
