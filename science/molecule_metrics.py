"""Standard metrics of 3D molecule generation: validity, uniqueness, novelty, atom / molecule stability.

- Validity (as in EDM, Hoogeboom et al. 2022, and Uni-3DAR's evaluation): bonds perceived from the
  3D coordinates with RDKit ``rdDetermineBonds`` (connectivity from covalent radii, then bond
  orders for a neutral molecule), the largest fragment must sanitise; its canonical SMILES is the
  molecule's identity.
- Uniqueness: distinct canonical SMILES among the valid molecules / valid molecules.
- Novelty: valid unique SMILES absent from the training set / valid unique molecules.
- Stability (EDM): bond orders from pairwise distances with the tables below (single, double,
  triple bond lengths in pm, margins 10 / 5 / 3 pm); an atom is stable when the sum of its bond
  orders equals an allowed valence of its element; a molecule is stable when all its atoms are.

Bond lengths are the standard covalent values used by EDM's ``bond_analyze`` tables (entered here
from the published values, for H, C, N, O, F and the heavier QM9/GEOM elements below); a pair
missing from a table has no bond of that order.
"""

from __future__ import annotations

import numpy as np

from threefold.datasets.errors import require

# pm; keyed by sorted atomic-number pairs
_SINGLE = {
    (1, 1): 74, (1, 6): 109, (1, 7): 101, (1, 8): 96, (1, 9): 92, (1, 16): 134, (1, 17): 127, (1, 35): 141,
    (6, 6): 154, (6, 7): 147, (6, 8): 143, (6, 9): 135, (6, 15): 184, (6, 16): 182, (6, 17): 177, (6, 35): 194,
    (7, 7): 145, (7, 8): 140, (7, 9): 136, (7, 16): 168, (7, 17): 175,
    (8, 8): 148, (8, 9): 142, (8, 15): 163, (8, 16): 151, (9, 9): 142, (16, 16): 204,
}  # fmt: skip
_DOUBLE = {(6, 6): 134, (6, 7): 129, (6, 8): 120, (6, 16): 160, (7, 7): 125, (7, 8): 121, (8, 8): 121, (8, 15): 150,
           (8, 16): 143}  # fmt: skip
_TRIPLE = {(6, 6): 120, (6, 7): 116, (6, 8): 113, (7, 7): 110}
MARGINS_PM = (10, 5, 3)
ALLOWED_VALENCE: dict[int, tuple[int, ...]] = {
    1: (1,), 5: (3,), 6: (4,), 7: (3,), 8: (2,), 9: (1,), 15: (3, 5), 16: (2, 4, 6), 17: (1,), 35: (1,), 53: (1,),
}  # fmt: skip


def _table(table: dict[tuple[int, int], int], size: int = 54) -> np.ndarray:
    out = np.zeros((size, size))
    for (a, b), v in table.items():
        out[a, b] = out[b, a] = v
    return out


_T1, _T2, _T3 = _table(_SINGLE), _table(_DOUBLE), _table(_TRIPLE)


def bond_orders(numbers: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """EDM bond orders (N, N) int64 from atomic numbers (N,) and positions (N, 3) Å, vectorised."""
    z = np.clip(np.asarray(numbers, np.int64), 0, _T1.shape[0] - 1)
    d = np.linalg.norm(positions[:, None, :] - positions[None, :, :], axis=-1) * 100.0  # pm
    t1, t2, t3 = _T1[z[:, None], z[None]], _T2[z[:, None], z[None]], _T3[z[:, None], z[None]]
    m1, m2, m3 = MARGINS_PM
    order = np.where((t1 > 0) & (d < t1 + m1), 1, 0)
    order = np.where((order == 1) & (t2 > 0) & (d < t2 + m2), 2, order)
    order = np.where((order == 2) & (t3 > 0) & (d < t3 + m3), 3, order)
    np.fill_diagonal(order, 0)
    return order


def stability(numbers: np.ndarray, positions: np.ndarray) -> tuple[int, bool]:
    """(number of stable atoms, molecule stable) by the EDM rule; an empty molecule is unstable."""
    if len(numbers) == 0:
        return 0, False
    valence = bond_orders(numbers, positions).sum(1)
    stable = np.array([v in ALLOWED_VALENCE.get(int(z), ()) for z, v in zip(np.asarray(numbers).tolist(), valence)])
    return int(stable.sum()), bool(stable.all())


def canonical_smiles(numbers: np.ndarray, positions: np.ndarray) -> str | None:
    """Canonical SMILES of the largest fragment after RDKit bond perception, or None when invalid."""
    require("rdkit", extra="mol")
    from rdkit import Chem
    from rdkit.Chem import rdDetermineBonds

    from threefold.datasets.molecule_samples import xyz_to_mol

    if len(numbers) == 0:
        return None
    from rdkit import rdBase

    # invalid samples are expected and counted: RDKit's per-molecule log lines would flood the output
    with rdBase.BlockLogs():
        try:
            mol = xyz_to_mol(np.asarray(numbers), np.asarray(positions, np.float64))
            rdDetermineBonds.DetermineBondOrders(mol, charge=0)
            frags = Chem.GetMolFrags(mol, asMols=True, sanitizeFrags=False)
            largest = max(frags, key=lambda m: m.GetNumAtoms())
            Chem.SanitizeMol(largest)
            return Chem.MolToSmiles(Chem.RemoveHs(largest))
        except (ValueError, RuntimeError):
            return None


def molecule_metrics(
    molecules: list[tuple[np.ndarray, np.ndarray]], training_smiles: set[str] | None = None
) -> dict[str, float]:
    """Validity, uniqueness, novelty, atom and molecule stability of (numbers, positions) pairs."""
    n = len(molecules)
    smiles = [canonical_smiles(z, p) for z, p in molecules]
    valid = [s for s in smiles if s is not None]
    unique = set(valid)
    stab = [stability(z, p) for z, p in molecules]
    atoms = sum(len(z) for z, _ in molecules)
    out = {
        "num_molecules": n,
        "validity": len(valid) / n if n else 0.0,
        "uniqueness": len(unique) / len(valid) if valid else 0.0,
        "valid_and_unique": len(unique) / n if n else 0.0,
        "atom_stability": sum(s for s, _ in stab) / atoms if atoms else 0.0,
        "molecule_stability": sum(m for _, m in stab) / n if n else 0.0,
    }
    if training_smiles is not None:
        out["novelty"] = len(unique - training_smiles) / len(unique) if unique else 0.0
    return out
