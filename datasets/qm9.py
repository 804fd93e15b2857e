"""QM9 readers (Ramakrishnan et al., Sci. Data 1, 140022, 2014): the original extended-XYZ files
``dsgdb9nsd_NNNNNN.xyz``, the SDF + CSV form (``gdb9.sdf`` + ``gdb9.sdf.csv``, MoleculeNet) and
the CSV form with coordinates (``structures.csv``: one row per atom, columns ``molecule_name,
atom_index, atom, x, y, z``, as distributed with the CHAMPS scalar-coupling data derived from QM9).

Original per-molecule file (the paper's Table 2)::

    line 1           n_a, number of atoms
    line 2           "gdb" tag, index, then 15 properties: A B C (GHz), mu (D), alpha (bohr^3),
                     homo lumo gap (Ha), r2 (bohr^2), zpve U0 U H G (Ha), Cv (cal/mol K)
    lines 3..n_a+2   element, x, y, z (Å), Mulliken partial charge (e)
    line n_a+3       harmonic frequencies (cm^-1)
    line n_a+4       SMILES from GDB-17 and from the relaxed geometry
    line n_a+5       InChI, likewise

Numbers may use Mathematica's exponent ``*^`` (``1.2*^-6``), read here as ``e``. Samples follow the
molecule convention: ``numbers`` (N,) int64, ``positions`` (N, 3) float32 Å, ``props`` (dict of
float, in the units above), ``smiles``, ``name``. No RDKit needed for the XYZ form.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from threefold.datasets.errors import ConfigError, DataFormatError, MissingFileError
from threefold.datasets.registry import register_dataset

QM9_PROPERTIES: tuple[str, ...] = ("A", "B", "C", "mu", "alpha", "homo", "lumo", "gap", "r2", "zpve", "U0", "U", "H",
                                   "G", "Cv")  # fmt: skip

_SYMBOLS = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}


def _float(text: str, path: Path, line: int) -> float:
    """A finite number: every QM9 coordinate and property is a measured or computed finite value, so
    NaN / inf (or an overflowing literal such as 1e309) marks a damaged file."""
    try:
        value = float(text.replace("*^", "e"))
    except ValueError as exc:
        raise DataFormatError(f"{path}: line {line}: {text!r} is not a number") from exc
    if not np.isfinite(value):
        raise DataFormatError(f"{path}: line {line}: {text!r} is not a finite number")
    return value


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataFormatError(f"{path}: byte {exc.start} is not UTF-8 text (QM9 files are ASCII)") from exc


def read_qm9_xyz(path: Path) -> dict[str, Any]:
    """One ``dsgdb9nsd_*.xyz`` file -> molecule sample (see module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: no such QM9 file")
    lines = _read_text(path).splitlines()
    try:
        n = int(lines[0].strip())
    except (IndexError, ValueError) as exc:
        raise DataFormatError(f"{path}: line 1 must hold the number of atoms") from exc
    if n < 1 or len(lines) < n + 5:
        raise DataFormatError(f"{path}: {len(lines)} lines, expected n_a + 5 = {n + 5} for n_a = {n}")
    head = lines[1].split()
    if len(head) != 2 + len(QM9_PROPERTIES) or head[0] != "gdb":
        raise DataFormatError(f"{path}: line 2 must be 'gdb <index>' and {len(QM9_PROPERTIES)} properties")
    try:
        index = int(head[1])
    except ValueError as exc:
        raise DataFormatError(f"{path}: line 2: molecule index {head[1]!r} is not an integer") from exc
    props = {k: _float(v, path, 2) for k, v in zip(QM9_PROPERTIES, head[2:])}
    numbers, positions = [], []
    for i in range(n):
        parts = lines[2 + i].split()
        if len(parts) != 5:
            raise DataFormatError(f"{path}: line {3 + i}: expected element x y z charge, got {lines[2 + i]!r}")
        if parts[0] not in _SYMBOLS:
            raise DataFormatError(f"{path}: line {3 + i}: element {parts[0]!r} is not one of QM9's H C N O F")
        numbers.append(_SYMBOLS[parts[0]])
        positions.append([_float(v, path, 3 + i) for v in parts[1:4]])
    xyz = np.array(positions, np.float32)
    if not np.isfinite(xyz).all():
        raise DataFormatError(f"{path}: a coordinate overflows float32 (|x| > 3.4e38 Å)")
    smiles = lines[n + 3].split()
    return {
        "numbers": np.array(numbers, np.int64),
        "positions": xyz,
        "props": props,
        "smiles": smiles[-1] if smiles else "",
        "name": f"gdb_{index}",
    }


def read_qm9_folder(root: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """All ``dsgdb9nsd_*.xyz`` files of ``root`` in index order (at most ``limit``)."""
    root = Path(root)
    files = sorted(root.glob("dsgdb9nsd_*.xyz"))
    if not files:
        raise MissingFileError(f"{root}: no dsgdb9nsd_*.xyz files (the original QM9 layout)")
    return [read_qm9_xyz(p) for p in files[:limit]]


def _csv_rows(path: Path, need: set[str]) -> list[dict[str, str]]:
    """Rows of a comma-separated file with a header that holds ``need``; a row with a missing or an
    extra cell is refused (``csv`` would fill the gap with None or a list)."""
    text = _read_text(path)
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if reader.fieldnames is None or not need <= set(reader.fieldnames):
            raise DataFormatError(f"{path}: columns {reader.fieldnames}; expected {sorted(need)}")
        rows = list(reader)
    except csv.Error as exc:
        raise DataFormatError(f"{path}: not a readable CSV file ({exc})") from exc
    for i, r in enumerate(rows):
        if None in r or None in r.values():
            raise DataFormatError(f"{path}: line {i + 2}: {len(r) - (None in r)} cells where the header has "
                                  f"{len(reader.fieldnames)}")
    return rows


def read_qm9_sdf_csv(sdf: Path, csv_path: Path | None = None) -> list[dict[str, Any]]:
    """The SDF + CSV form: molecules from ``gdb9.sdf`` (RDKit) with properties from ``gdb9.sdf.csv``
    joined on the record title (``gdb_N``, column ``mol_id``). Every SDF record must have a row, and
    every property must be a finite number."""
    from threefold.datasets.molecules import read_sdf

    sdf = Path(sdf)
    csv_path = Path(csv_path) if csv_path is not None else sdf.with_name(sdf.name + ".csv")
    if not csv_path.is_file():
        raise MissingFileError(f"{csv_path}: the property CSV of {sdf.name} is missing")
    rows = {}
    for i, r in enumerate(_csv_rows(csv_path, {"mol_id"})):
        if r["mol_id"] in rows:
            raise DataFormatError(f"{csv_path}: line {i + 2}: mol_id {r['mol_id']!r} appears twice")
        rows[r["mol_id"]] = {k: _float(v, csv_path, i + 2) for k, v in r.items() if k != "mol_id"}
    mols = read_sdf(sdf, sanitize=False)
    for m in mols:
        row = rows.get(m["name"])
        if row is None:
            raise DataFormatError(f"{csv_path}: no row with mol_id {m['name']!r} (record {m['index']} of {sdf.name})")
        m["props"] = {**m.get("props", {}), **row}
    return mols


def read_qm9_structures_csv(path: Path) -> list[dict[str, Any]]:
    """The per-atom CSV form -> molecule samples in order of first appearance; within a molecule the
    atoms are ordered by ``atom_index``, which must run 0..n-1 without gaps or repeats."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: QM9 structures CSV not found")
    groups: dict[str, list[tuple[int, str, list[float]]]] = {}
    for i, r in enumerate(_csv_rows(path, {"molecule_name", "atom_index", "atom", "x", "y", "z"})):
        line = i + 2
        try:
            index = int(r["atom_index"])
        except ValueError as exc:
            raise DataFormatError(f"{path}: line {line}: atom_index {r['atom_index']!r} is not an integer") from exc
        if r["atom"] not in _SYMBOLS:
            raise DataFormatError(f"{path}: line {line}: element {r['atom']!r} is not one of QM9's H C N O F")
        groups.setdefault(r["molecule_name"], []).append((index, r["atom"], [_float(r[k], path, line) for k in "xyz"]))
    out = []
    for name, atoms in groups.items():
        atoms.sort(key=lambda a: a[0])
        if [a[0] for a in atoms] != list(range(len(atoms))):
            raise DataFormatError(f"{path}: molecule {name!r} has atom_index values that do not run 0..{len(atoms) - 1}")
        xyz = np.array([a[2] for a in atoms], np.float32)
        if not np.isfinite(xyz).all():
            raise DataFormatError(f"{path}: molecule {name!r}: a coordinate overflows float32 (|x| > 3.4e38 Å)")
        out.append({"numbers": np.array([_SYMBOLS[a[1]] for a in atoms], np.int64), "positions": xyz,
                    "props": {}, "smiles": "", "name": name})
    return out


@register_dataset("qm9", "QM9 molecules from a folder of dsgdb9nsd_*.xyz (seeded 80/10/10 split)", modality="molecule")
class QM9(Dataset):
    """QM9 as a torch dataset: ``QM9(root, split="train"|"val"|"test"|"all", seed=0)``.

    Splits are a seeded 80/10/10 permutation of the files in index order
    (:func:`threefold.datasets.splits.split_indices`); samples carry torch tensors
    (``numbers`` int64, ``positions`` float32 Å) and ``props`` as floats.
    """

    SPLITS = ("train", "val", "test")

    def __init__(self, root: Path, split: str = "train", seed: int = 0) -> None:
        from threefold.datasets.splits import split_indices

        files = sorted(Path(root).glob("dsgdb9nsd_*.xyz"))
        if not files:
            raise MissingFileError(f"{root}: no dsgdb9nsd_*.xyz files (the original QM9 layout)")
        if split == "all":
            self.files = files
        elif split in self.SPLITS:
            part = split_indices(len(files), (0.8, 0.1, 0.1), seed)[self.SPLITS.index(split)]
            self.files = [files[i] for i in np.sort(part)]
        else:
            raise ConfigError(f"QM9 split {split!r}: expected one of train, val, test, all")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = read_qm9_xyz(self.files[index])
        rec["numbers"] = torch.from_numpy(rec["numbers"])
        rec["positions"] = torch.from_numpy(rec["positions"])
        return rec
