"""Crystal readers and writer: CIF files and the MP-20 CSV (a ``cif`` column), through ASE.

ASE (extra ``mol``) parses the CIF, applies the symmetry operations and returns the full cell; it is
imported inside the functions. pymatgen is not needed. A crystal sample::

    numbers    (N,) int64          atomic numbers
    positions  (N, 3) float32, Å   Cartesian positions
    frac       (N, 3) float64      fractional coordinates, wrapped into [0, 1)
    lattice    (3, 3) float32, Å   rows are the cell vectors a, b, c
    props      dict                other CSV columns (MP-20), as text or float
    name       str                 file name / material_id
"""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path
from typing import Any

import numpy as np

from threefold.datasets.errors import DataFormatError, MissingFileError, require


def _sample(atoms: Any, name: str) -> dict[str, Any]:
    lattice = np.asarray(atoms.cell.array, np.float64)
    if not (np.isfinite(lattice).all() and np.isfinite(atoms.get_positions()).all()):
        raise DataFormatError(f"{name}: a cell parameter or atom coordinate is not a finite number")
    if abs(np.linalg.det(lattice)) < 1e-6:
        raise DataFormatError(f"{name}: the cell is singular (volume {np.linalg.det(lattice):.3g} Å^3)")
    if len(atoms) == 0:
        raise DataFormatError(f"{name}: the structure has no atoms")
    frac = (np.asarray(atoms.get_positions()) @ np.linalg.inv(lattice)) % 1.0
    return {
        "numbers": np.asarray(atoms.numbers, np.int64),
        "positions": np.asarray(atoms.get_positions(), np.float32),
        "frac": frac,
        "lattice": lattice.astype(np.float32),
        "props": {},
        "name": name,
    }


def _read_cif_text(text: str, name: str) -> dict[str, Any]:
    ase_io = require("ase.io", extra="mol")
    try:
        atoms = ase_io.read(io.StringIO(text), format="cif")
    except Exception as exc:  # ASE raises many kinds for a malformed CIF; report them as one
        raise DataFormatError(f"{name}: not a readable CIF ({type(exc).__name__}: {exc})") from exc
    return _sample(atoms, name)


def read_cif(path: Path) -> dict[str, Any]:
    """One CIF file (first data block) -> crystal sample."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: CIF file not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataFormatError(f"{path}: byte {exc.start} is not UTF-8 text (CIF 1.1 is ASCII, CIF 2.0 UTF-8)") from exc
    return _read_cif_text(text, str(path))


def read_mp20_csv(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """The MP-20 CSV of CDVAE / Uni-3DAR (``material_id``, ``cif``, properties) -> crystal samples."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: MP-20 CSV not found")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # a CIF cell is longer than csv's 128 KiB default
    with path.open(newline="", encoding="utf-8") as f:
        try:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "cif" not in reader.fieldnames:
                raise DataFormatError(f"{path}: no 'cif' column (columns: {reader.fieldnames})")
            out = []
            for i, row in enumerate(reader):
                if limit is not None and i >= limit:
                    break
                name = row.get("material_id") or f"{path.name} row {i}"
                s = _read_cif_text(row["cif"] or "", f"{path.name} row {i} ({name})")
                s["props"] = {k: _maybe_float(v) for k, v in row.items() if k not in ("cif", "", None)}
                s["name"] = name
                out.append(s)
        except UnicodeDecodeError as exc:
            raise DataFormatError(f"{path}: byte {exc.start} of a block is not UTF-8 text") from exc
        except csv.Error as exc:
            raise DataFormatError(f"{path}: not a readable CSV ({exc})") from exc
    return out


def _maybe_float(v: str) -> float | str:
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def write_cif(sample: dict[str, Any], path: Path) -> Path:
    """Write a crystal sample (numbers, positions Å, lattice Å) as a P1 CIF with ASE."""
    ase = require("ase", extra="mol")
    import ase.io

    atoms = ase.Atoms(numbers=sample["numbers"], positions=sample["positions"], cell=sample["lattice"], pbc=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ase.io.write(path, atoms, format="cif")
    return path
