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

import re
from pathlib import Path
from typing import Any

import numpy as np

from threefold.datasets.errors import DataFormatError, MissingFileError

_FLOAT32_MAX = float(np.finfo(np.float32).max)

# One CIF 1.1 token: a quoted string closes only at a quote followed by whitespace or the line end,
# so ``"O5'"`` and ``'a'b'`` are single tokens; an unquoted token may not start with a quote.
_CIF_TOKEN = re.compile(r"""\s*(?:'(.*?)'(?=\s|$)|"(.*?)"(?=\s|$)|([^\s'"]\S*))""")


def _read_text(path: Path, what: str) -> list[str]:
    try:
        return path.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataFormatError(f"{path}: byte {exc.start} is not UTF-8 text ({what} files are ASCII)") from exc


def _coords(texts: list[str], path: Path, line: int) -> list[float]:
    """Three finite Å coordinates that fit float32; NaN / inf / garbage marks a damaged record."""
    try:
        xyz = [float(t) for t in texts]
    except ValueError as exc:
        raise DataFormatError(f"{path}: line {line}: coordinates {texts} are not numbers") from exc
    if not all(abs(v) <= _FLOAT32_MAX for v in xyz):  # also false for NaN
        raise DataFormatError(f"{path}: line {line}: coordinates {texts} are not finite float32 values")
    return xyz


def _cif_fields(line: str, path: Path, number: int) -> list[str]:
    fields, pos = [], 0
    while pos < len(line) and not line[pos:].isspace():
        m = _CIF_TOKEN.match(line, pos)
        if m is None:
            raise DataFormatError(f"{path}: line {number}: unbalanced quote at column {pos + 1} in {line!r}")
        fields.append(next(g for g in m.groups() if g is not None))
        pos = m.end()
    return fields


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
    for i, line in enumerate(_read_text(path, "PDB"), 1):
        if line.startswith("ENDMDL"):
            break
        if not line.startswith("ATOM") or line[12:16].strip() != "CA" or line[16:17] not in (" ", "A"):
            continue
        xyz = _coords([line[30:38], line[38:46], line[46:54]], path, i)
        try:
            number = int(line[22:26])
        except ValueError as exc:
            raise DataFormatError(f"{path}: line {i}: residue number {line[22:26]!r} is not an integer") from exc
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
    lines = _read_text(path, "mmCIF")
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
    for number, line in enumerate(lines[i:], i + 1):
        if not line.strip() or line.startswith(("#", "loop_", "_")):
            break
        f = _cif_fields(line, path, number)
        if len(f) != len(cols):
            raise DataFormatError(f"{path}: _atom_site row has {len(f)} fields, expected {len(cols)}: {line!r}")
        model = f[at["pdbx_PDB_model_num"]] if "pdbx_PDB_model_num" in at else "1"
        first_model = first_model or model
        alt = f[at["label_alt_id"]] if "label_alt_id" in at else "."
        if model != first_model or f[at["group_PDB"]] != "ATOM" or f[at["label_atom_id"]] != "CA" or alt not in (".", "?", "A"):
            continue
        res.append(f[at["label_comp_id"]])
        chains.append(f[at.get("auth_asym_id", at.get("label_asym_id", 0))])
        pos.append(_coords([f[at[c]] for c in ("Cartn_x", "Cartn_y", "Cartn_z")], path, number))
        try:
            resseq = int(f[at["auth_seq_id"]]) if "auth_seq_id" in at else len(seq) + 1
        except ValueError:
            resseq = None
        if resseq is None or not -(2**63) <= resseq < 2**63:
            raise DataFormatError(f"{path}: line {number}: auth_seq_id {f[at['auth_seq_id']]!r} is not an int64 integer")
        seq.append(resseq)
    return _trace(res, pos, chains, seq, str(path))


def ideal_alpha_helix_ca(n: int, rise: float = 1.5, radius: float = 2.3, per_turn: float = 3.6) -> np.ndarray:
    """Cα positions (n, 3) float64 Å of an ideal α-helix along z (3.6 residues per turn, 1.5 Å rise)."""
    theta = np.arange(n) * 2 * np.pi / per_turn
    return np.stack([radius * np.cos(theta), radius * np.sin(theta), rise * np.arange(n)], 1)
