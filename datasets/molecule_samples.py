"""The embedded molecule sample: 419 QM9-like molecules as deterministic RDKit ETKDG conformers.

``data/qm9_like_nci_smiles.tsv`` holds the SMILES of every molecule of RDKit's
``Data/NCI/first_5K.smi`` that looks like a QM9 molecule (at most 9 heavy atoms, all C, N, O or F;
neutral, one fragment, no radicals). Licence: the file ships with RDKit under the BSD 3-Clause
licence; the structures come from the NCI Open Database of the US National Cancer Institute (DTP).
The conformers are generated here, not shipped: hydrogens added, ETKDGv3 with a fixed seed and one
thread, so every run on every machine embeds the same coordinates for a given RDKit version.

Sample convention (shared with :mod:`threefold.datasets.molecules`): ``numbers`` (N,) int64 atomic
numbers, ``positions`` (N, 3) float32 Å, plus ``smiles`` and ``name``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from threefold.datasets.errors import DataFormatError, require

SMILES_FILE = Path(__file__).with_name("data") / "qm9_like_nci_smiles.tsv"


def embedded_smiles(path: Path = SMILES_FILE) -> list[str]:
    """The bundled SMILES, in file order (419 for the shipped file)."""
    return [line.split("\t")[0] for line in _rows(path)]


def _rows(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line and not line.startswith("#")]


def smiles_to_conformer(smiles: str, seed: int = 42, name: str = "") -> dict[str, object]:
    """One SMILES -> sample with hydrogens from RDKit ETKDGv3 (``seed``, single thread).

    Raises :class:`DataFormatError` naming the SMILES when RDKit cannot parse or embed it.
    """
    require("rdkit", extra="mol")
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise DataFormatError(f"SMILES {smiles!r} ({name or 'no name'}): RDKit cannot parse it")
    mol = Chem.AddHs(mol)
    params = AllChem.ETKDGv3()
    params.randomSeed = seed
    params.numThreads = 1
    if AllChem.EmbedMolecule(mol, params) != 0:
        raise DataFormatError(f"SMILES {smiles!r} ({name or 'no name'}): ETKDG found no conformer (seed {seed})")
    return {
        "numbers": np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64),
        "positions": mol.GetConformer().GetPositions().astype(np.float32),
        "smiles": Chem.MolToSmiles(Chem.RemoveHs(mol)),
        "name": name,
    }


def embedded_molecules(seed: int = 42, limit: int | None = None, path: Path = SMILES_FILE) -> list[dict[str, object]]:
    """The embedded sample as a list of molecule samples (see the module docstring)."""
    require("rdkit", extra="mol")
    from rdkit import RDLogger

    RDLogger.DisableLog("rdApp.*")
    rows = _rows(path)[:limit]
    return [smiles_to_conformer(r.split("\t")[0], seed, r.split("\t")[1] if "\t" in r else "") for r in rows]


def write_sdf(samples: list[dict[str, object]], path: Path) -> Path:
    """Write samples (``numbers``, ``positions`` Å) to an SDF, bonds perceived from 3D by RDKit.

    Bond perception: ``rdDetermineBonds.DetermineConnectivity`` (covalent radii), then bond orders
    where they can be assigned; a molecule whose bond orders fail keeps single bonds only, which
    the SDF records faithfully (the coordinates, the part tokenized, are always exact).
    """
    require("rdkit", extra="mol")
    from rdkit import Chem
    from rdkit.Chem import rdDetermineBonds

    path.parent.mkdir(parents=True, exist_ok=True)
    with Chem.SDWriter(str(path)) as writer:
        for i, s in enumerate(samples):
            mol = xyz_to_mol(np.asarray(s["numbers"]), np.asarray(s["positions"], dtype=np.float64))
            try:
                rdDetermineBonds.DetermineBondOrders(mol, charge=0)
            except (ValueError, RuntimeError):
                pass  # connectivity only; see docstring
            mol.SetProp("_Name", str(s.get("name") or f"mol{i}"))
            writer.write(mol)
    return path


def xyz_to_mol(numbers: np.ndarray, positions: np.ndarray):
    """An RDKit molecule with one conformer and connectivity perceived from 3D coordinates (Å)."""
    from rdkit import Chem
    from rdkit.Chem import rdDetermineBonds
    from rdkit.Geometry import Point3D

    rw = Chem.RWMol()
    for z in np.asarray(numbers).tolist():
        rw.AddAtom(Chem.Atom(int(z)))
    conf = Chem.Conformer(len(numbers))
    for i, (x, y, z) in enumerate(np.asarray(positions, dtype=np.float64).tolist()):
        conf.SetAtomPosition(i, Point3D(x, y, z))
    rw.AddConformer(conf, assignId=True)
    mol = rw.GetMol()
    rdDetermineBonds.DetermineConnectivity(mol)
    return mol
