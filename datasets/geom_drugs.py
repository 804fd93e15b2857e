"""GEOM-DRUGS conformers (Axelrod & Gomez-Bombarelli, Sci. Data 9, 185, 2022): the per-molecule
RDKit pickles of ``rdkit_folder/drugs/*.pickle`` and SDF files with several conformers.

A GEOM pickle is a dict with ``smiles`` and ``conformers`` (a list of dicts holding ``rd_mol``,
an RDKit molecule with hydrogens and one conformer, plus energies and Boltzmann weights). Pickles
run code on load, so they are read only through
:func:`threefold.datasets.safe_pickle.safe_load_pickle` with an allow-list that admits the RDKit
molecule class and nothing else that can run code; any other global is refused before it runs.

Each conformer becomes one molecule sample: ``numbers`` (N,) int64, ``positions`` (N, 3) float32 Å,
``smiles``, ``name`` (``<file>#<conformer>``), ``props`` (the conformer's float fields).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from threefold.datasets.errors import DataFormatError, require
from threefold.datasets.safe_pickle import safe_load_pickle

# RDKit molecules pickle as rdkit.Chem.rdchem.Mol(<binary>); GEOM's floats may be numpy scalars.
GEOM_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("rdkit.Chem.rdchem", "Mol"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }
)


def read_geom_pickle(path: Path, max_conformers: int | None = None) -> list[dict[str, Any]]:
    """Conformers of one GEOM-DRUGS pickle as molecule samples (at most ``max_conformers``)."""
    chem = require("rdkit.Chem", extra="mol")
    path = Path(path)
    try:
        data = safe_load_pickle(path, GEOM_GLOBALS)
    except RuntimeError as exc:  # RDKit's Mol(<binary>) rejects a damaged molecule block this way
        raise DataFormatError(f"{path}: an RDKit molecule in the pickle is corrupt ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("conformers"), list):
        raise DataFormatError(f"{path}: expected a dict with a 'conformers' list (GEOM rdkit_folder layout)")
    out = []
    for k, conf in enumerate(data["conformers"][:max_conformers]):
        mol = conf.get("rd_mol") if isinstance(conf, dict) else None
        if not isinstance(mol, chem.Mol) or mol.GetNumConformers() == 0:
            raise DataFormatError(f"{path}: conformer {k} has no 'rd_mol' RDKit molecule with coordinates "
                                  f"(got {type(mol).__name__})")
        positions = mol.GetConformer().GetPositions().astype(np.float32)
        if not np.isfinite(positions).all():
            raise DataFormatError(f"{path}: conformer {k}: a coordinate is not a finite float32 number")
        out.append(
            {
                "numbers": np.array([a.GetAtomicNum() for a in mol.GetAtoms()], np.int64),
                "positions": positions,
                "smiles": str(data.get("smiles", "")),
                "name": f"{path.name}#{k}",
                "props": {key: float(v) for key, v in conf.items() if isinstance(v, (int, float, np.floating))},
            }
        )
    return out


def read_geom_sdf(path: Path) -> list[dict[str, Any]]:
    """Conformers from an SDF (one record per conformer, hydrogens kept)."""
    from threefold.datasets.molecules import read_sdf

    return read_sdf(path, sanitize=False)
