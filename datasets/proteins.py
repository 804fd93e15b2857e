"""Protein Cα traces typed by residue, from PDB (fixed columns) and mmCIF (``_atom_site`` loop).

Both readers keep, per residue, the Cα of the first model and the first alternate location (blank
or ``A``), in file order. A trace sample::

    residues   list[str]           three-letter residue names (N,)
    positions  (N, 3) float32, Å   Cα positions
    chains     list[str]           chain id per residue
    resseq     (N,) int64          residue sequence number (author numbering)
    name       str                 file name

No third-party parser is needed (the wwPDB formats are read directly).
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import numpy as np

from threefold.datasets.errors import DataFormatError, MissingFileError


def _trace(res: list[str], pos: list[list[float]], chains: list[str], seq: list[int], name: str) -> dict[str, Any]:
    if not res:
        raise DataFormatError(f"{name}: no Cα atoms (ATOM records with atom name CA)")
    return {"residues": res, "positions": np.array(pos, np.float32), "chains": chains,
            "resseq": np.array(seq, np.int64), "name": name}  # fmt: skip


def read_pdb_ca(path: Path) -> dict[str, Any]:
    """Cα trace of a PDB file (columns of the wwPDB v3.3 ATOM record)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: PDB file not found")
    res, pos, chains, seq = [], [], [], []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("ENDMDL"):
            break
        if not line.startswith("ATOM") or line[12:16].strip() != "CA" or line[16:17] not in (" ", "A"):
            continue
        try:
            xyz = [float(line[30:38]), float(line[38:46]), float(line[46:54])]
            number = int(line[22:26])
        except ValueError as exc:
            raise DataFormatError(f"{path}: line {i}: bad coordinates or residue number in {line!r}") from exc
        res.append(line[17:20].strip())
        chains.append(line[21])
        seq.append(number)
        pos.append(xyz)
    return _trace(res, pos, chains, seq, str(path))


def read_mmcif_ca(path: Path) -> dict[str, Any]:
    """Cα trace of an mmCIF file from its ``_atom_site`` loop (column order read from the header)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: mmCIF file not found")
    lines = path.read_text().splitlines()
    cols: list[str] = []
    i = 0
    while i < len(lines):
        if lines[i].strip() == "loop_" and i + 1 < len(lines) and lines[i + 1].startswith("_atom_site."):
            i += 1
            while i < len(lines) and lines[i].startswith("_atom_site."):
                cols.append(lines[i].strip().split(".", 1)[1])
                i += 1
            break
        i += 1
    need = ["group_PDB", "label_atom_id", "label_comp_id", "Cartn_x", "Cartn_y", "Cartn_z"]
    missing = [c for c in need if c not in cols]
    if missing:
        raise DataFormatError(f"{path}: _atom_site loop lacks {missing}")
    at = {c: k for k, c in enumerate(cols)}
    res, pos, chains, seq = [], [], [], []
    first_model = None
    for line in lines[i:]:
        if not line.strip() or line.startswith(("#", "loop_", "_")):
            break
        f = shlex.split(line)
        if len(f) != len(cols):
            raise DataFormatError(f"{path}: _atom_site row has {len(f)} fields, expected {len(cols)}: {line!r}")
        model = f[at["pdbx_PDB_model_num"]] if "pdbx_PDB_model_num" in at else "1"
        first_model = first_model or model
        alt = f[at["label_alt_id"]] if "label_alt_id" in at else "."
        if model != first_model or f[at["group_PDB"]] != "ATOM" or f[at["label_atom_id"]] != "CA" or alt not in ".?A":
            continue
        res.append(f[at["label_comp_id"]])
        chains.append(f[at.get("auth_asym_id", at.get("label_asym_id", 0))])
        seq.append(int(f[at["auth_seq_id"]]) if "auth_seq_id" in at else len(seq) + 1)
        pos.append([float(f[at[c]]) for c in ("Cartn_x", "Cartn_y", "Cartn_z")])
    return _trace(res, pos, chains, seq, str(path))


def ideal_alpha_helix_ca(n: int, rise: float = 1.5, radius: float = 2.3, per_turn: float = 3.6) -> np.ndarray:
    """Cα positions (n, 3) float64 Å of an ideal α-helix along z (3.6 residues per turn, 1.5 Å rise)."""
    theta = np.arange(n) * 2 * np.pi / per_turn
    return np.stack([radius * np.cos(theta), radius * np.sin(theta), rise * np.arange(n)], 1)
