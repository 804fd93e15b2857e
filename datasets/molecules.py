"""Molecule and crystal readers (SDF via RDKit, XYZ / extended XYZ) and the ``sdf-molecules`` and
``xyz-molecules`` datasets.

A molecule sample is (see ``datasets/README.md``; key names as in ASE and
:mod:`threefold.datasets.molecule_samples`)::

    numbers    (N,) int64            atomic numbers, hydrogens included (never removed on reading)
    positions  (N, 3) float32, Å     Cartesian positions
    lattice    (3, 3) float32, Å     rows are the cell vectors a, b, c (crystals only)
    pbc        (3,) bool             periodic along a, b, c (crystals only)
    props      dict[str, float|str]  per-molecule properties (SDF data items, extended-XYZ key=value)
    index      int                   record number in its file, counted from 0
    name       str                   SDF title line / "" for XYZ

A record that cannot be read is never dropped silently: by default the reader raises
:class:`~threefold.datasets.errors.DataFormatError` listing every bad record index and the reason;
with ``skip_invalid=True`` it warns with that list and returns the others, each keeping its ``index``.
RDKit (extra ``mol``) is imported only inside :func:`read_sdf` and :func:`element_numbers`.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from threefold.datasets.errors import DataFormatError, MissingFileError, require
from threefold.datasets.registry import register_dataset

_SDF_SEPARATOR = re.compile(r"^\$\$\$\$[ \t\r]*(?:\n|\Z)", flags=re.M)
_V3000_COUNTS = re.compile(r"^M\s+V30\s+COUNTS\s+(\d+)\s+(\d+)", flags=re.M)
_DATA_HEADER = re.compile(r"^>.*?<([^>]*)>")


class _BadRecord(Exception):
    """One record of a multi-record file is unreadable; collected, then reported with its index."""


def _check_file(path: str | os.PathLike, suffixes: Sequence[str], what: str) -> Path:
    p = Path(path)
    if p.suffix.lower() not in suffixes:
        raise DataFormatError(f"{p}: extension {p.suffix!r} is not a {what} file; expected {', '.join(suffixes)}")
    if not p.is_file():
        raise MissingFileError(f"{p}: {what} file not found" + (" (it is a folder)" if p.is_dir() else ""))
    return p


def _report(p: Path, records: list[dict[str, Any]], failures: list[tuple[int, str]], total: int,
            skip_invalid: bool) -> list[dict[str, Any]]:
    if total == 0:
        raise DataFormatError(f"{p}: the file holds no molecule records")
    if failures:
        listing = "; ".join(f"record {i}: {why}" for i, why in failures[:20])
        more = f" (and {len(failures) - 20} more)" if len(failures) > 20 else ""
        msg = f"{p}: {len(failures)} of {total} records cannot be read — {listing}{more}"
        if not skip_invalid:
            raise DataFormatError(msg + "; pass skip_invalid=True to keep the others")
        if not records:
            raise DataFormatError(msg + "; no record is readable")
        warnings.warn(msg + "; they are skipped (skip_invalid=True)", stacklevel=3)
    return records


def _value(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def _check_positions(pos: np.ndarray, n: int) -> np.ndarray:
    if pos.shape != (n, 3):
        raise _BadRecord(f"positions have shape {pos.shape}, expected ({n}, 3)")
    if not np.isfinite(pos).all():
        raise _BadRecord("NaN/inf coordinates")
    out = pos.astype(np.float32)
    if not np.isfinite(out).all():
        raise _BadRecord("coordinates overflow float32")
    return out


# -------------------------------------------------------------------------------------------- SDF
def _sdf_record(Chem: Any, block: str, sanitize: bool) -> dict[str, Any]:
    if not block.strip():
        raise _BadRecord("empty record")
    counts = _V3000_COUNTS.search(block)
    if counts and int(counts.group(1)) + int(counts.group(2)) > block.count("\n") + 1:
        # refuse before RDKit sizes anything from the declared counts
        raise _BadRecord(f"V3000 COUNTS declares {counts.group(1)} atoms and {counts.group(2)} bonds, "
                         f"more than the record's {block.count(chr(10)) + 1} lines")
    head, sep, tail = block.partition("M  END")
    if not sep:
        raise _BadRecord("no 'M  END' line")
    try:
        mol = Chem.MolFromMolBlock(head + sep, sanitize=False, removeHs=False, strictParsing=True)
    except (ValueError, RuntimeError) as exc:
        raise _BadRecord(f"RDKit cannot parse the molfile block: {exc}") from exc
    if mol is None:
        raise _BadRecord("RDKit cannot parse the molfile block")
    if sanitize:
        try:
            Chem.SanitizeMol(mol)
        except (ValueError, RuntimeError) as exc:
            raise _BadRecord(f"RDKit sanitization failed: {exc}") from exc
    n = mol.GetNumAtoms()
    if n == 0 or mol.GetNumConformers() == 0:
        raise _BadRecord("no atoms" if n == 0 else "no coordinates")
    pos = _check_positions(np.asarray(mol.GetConformer().GetPositions(), dtype=np.float64), n)
    # one call per atom through RDKit's API, which offers no array accessor; readers run once per dataset
    z = np.fromiter((a.GetAtomicNum() for a in mol.GetAtoms()), dtype=np.int64, count=n)
    if (z == 0).any():
        raise _BadRecord(f"query/dummy atoms (atomic number 0) at atoms {np.flatnonzero(z == 0)[:10].tolist()}")
    props: dict[str, float | str] = {}
    lines = tail.split("\n")
    i = 0
    while i < len(lines):
        m = _DATA_HEADER.match(lines[i])
        i += 1
        if m is None:
            continue
        value = []
        while i < len(lines) and lines[i].strip():
            value.append(lines[i].rstrip("\r"))
            i += 1
        props[m.group(1)] = _value("\n".join(value))
    return {"numbers": z, "positions": pos, "props": props, "name": block.split("\n", 1)[0].strip()}


def read_sdf(path: str | os.PathLike, sanitize: bool = True, skip_invalid: bool = False) -> list[dict[str, Any]]:
    """Read every record of an MDL SD file (V2000 or V3000) with RDKit, keeping explicit hydrogens.

    Format: Dalby et al., "Description of several chemical structure file formats used by computer
    programs developed at Molecular Design Limited", J. Chem. Inf. Comput. Sci. 32, 1992 (CTfile).

    Records are cut at ``$$$$`` lines here, not by RDKit's supplier, so that a malformed record cannot
    swallow the next one and every record keeps its true index. ``sanitize`` runs RDKit's sanitization
    (valence, aromaticity) and counts a failure as an unreadable record. Data items ``> <key>`` become
    ``props`` (floats where they parse). Returns samples as in the module docstring, with NumPy arrays.
    """
    p = _check_file(path, (".sdf", ".sd", ".mol"), "SDF")
    Chem = require("rdkit.Chem", extra="mol")
    rdBase = require("rdkit.rdBase", extra="mol")
    text = p.read_bytes().decode("utf-8", errors="replace")
    blocks = _SDF_SEPARATOR.split(text)
    if blocks and not blocks[-1].strip():
        blocks.pop()  # the text after the last $$$$
    records, failures = [], []
    with rdBase.BlockLogs():  # RDKit's own log lines would duplicate the report below
        for index, block in enumerate(blocks):
            try:
                rec = _sdf_record(Chem, block, sanitize)
            except _BadRecord as exc:
                failures.append((index, str(exc)))
                continue
            rec["index"] = index
            records.append(rec)
    return _report(p, records, failures, len(blocks), skip_invalid)


# -------------------------------------------------------------------------------------------- XYZ
@functools.lru_cache(maxsize=1)
def _symbol_table() -> dict[str, int]:
    Chem = require("rdkit.Chem", extra="mol")
    table = Chem.GetPeriodicTable()
    return {table.GetElementSymbol(z): z for z in range(1, 119)}


def element_numbers(symbols: np.ndarray) -> np.ndarray:
    """Atomic numbers (N,) int64 of element symbols (any capitalisation) or of integer strings ("6").

    Raises :class:`DataFormatError` naming unknown symbols. Looks up each distinct symbol once (RDKit's
    periodic table), so the cost does not grow with the number of atoms beyond ``np.unique``.
    """
    table = _symbol_table()
    uniq, inverse = np.unique(np.asarray(symbols, dtype=str), return_inverse=True)
    numbers = np.empty(len(uniq), dtype=np.int64)
    for k, sym in enumerate(uniq.tolist()):
        if sym.isdigit() and 1 <= int(sym) <= 118:
            numbers[k] = int(sym)
        elif sym.capitalize() in table:
            numbers[k] = table[sym.capitalize()]
        else:
            raise DataFormatError(f"unknown element symbol {sym!r}")
    return numbers[inverse.reshape(-1)]


def _comment(line: str) -> dict[str, str]:
    """Extended-XYZ comment line: ``key=value`` pairs, values optionally quoted (ASE/libAtoms convention)."""
    if "=" not in line:
        return {}
    try:
        tokens = shlex.split(line, comments=False, posix=True)
    except ValueError as exc:
        raise _BadRecord(f"comment line is not valid key=value text ({exc})") from exc
    return dict(t.split("=", 1) for t in tokens if "=" in t)


def _columns(spec: str | None, width: int) -> list[tuple[str, str, int, int]]:
    """(name, type, first column, count) per per-atom property; without ``Properties=`` the plain XYZ layout."""
    if spec is None:
        cols = [("species", "S", 0, 1), ("pos", "R", 1, 3)]
        if width > 4:
            cols.append(("extra", "R", 4, width - 4))
        return cols
    parts = spec.split(":")
    if len(parts) % 3:
        raise _BadRecord(f"Properties={spec!r} is not name:type:count triples")
    cols, start = [], 0
    for name, kind, count in zip(parts[::3], parts[1::3], parts[2::3]):
        if kind not in ("S", "R", "I", "L") or not count.isdigit() or int(count) < 1:
            raise _BadRecord(f"Properties entry {name}:{kind}:{count} is invalid")
        cols.append((name, kind, start, int(count)))
        start += int(count)
    if start != width:
        raise _BadRecord(f"Properties declares {start} columns, the atom lines have {width}")
    names = {c[0]: c for c in cols}
    if "species" not in names or "pos" not in names or names["pos"][3] != 3 or names["species"][1] != "S":
        raise _BadRecord("Properties must include species:S:1 and pos:R:3")
    return cols


def _xyz_frame(lines: list[str], start: int, n: int) -> dict[str, Any]:
    atom_lines = lines[start + 2 : start + 2 + n]
    head = _comment(lines[start + 1])
    if n == 0:
        raise _BadRecord("no atoms")
    tokens = np.array(" ".join(atom_lines).split())
    width = len(atom_lines[0].split())
    if width < 4 or tokens.size != n * width:
        raise _BadRecord(f"atom lines are not {n} rows of equal width >= 4 (symbol x y z ...)")
    table = tokens.reshape(n, width)
    cols = _columns(head.get("Properties"), width)
    atom_props: dict[str, np.ndarray] = {}
    try:
        for name, kind, first, count in cols:
            block = table[:, first : first + count]
            if name == "species":
                z = element_numbers(block[:, 0])
            elif name == "pos":
                pos = _check_positions(block.astype(np.float64), n)
            elif kind in ("R", "I"):
                atom_props[name] = block.astype(np.float64).squeeze(1) if count == 1 else block.astype(np.float64)
            elif kind == "L":
                atom_props[name] = np.isin(block, ["T", "True", "true"])
            else:
                atom_props[name] = block
    except (ValueError, DataFormatError) as exc:
        raise _BadRecord(str(exc)) from exc
    rec: dict[str, Any] = {"numbers": z, "positions": pos, "name": ""}
    if atom_props:
        rec["atom_props"] = atom_props
    props: dict[str, float | str] = {}
    for key, value in head.items():
        if key == "Lattice":
            try:
                lat = np.array(value.split(), dtype=np.float64)
            except ValueError as exc:
                raise _BadRecord(f"Lattice={value!r} is not 9 numbers") from exc
            if lat.size != 9 or not np.isfinite(lat).all():
                raise _BadRecord(f"Lattice={value!r} is not 9 finite numbers")
            if abs(np.linalg.det(lat.reshape(3, 3))) < 1e-6:
                raise _BadRecord(f"Lattice={value!r} is singular (zero cell volume)")
            rec["lattice"] = lat.reshape(3, 3).astype(np.float32)
        elif key == "pbc":
            flags = value.split()
            if len(flags) != 3 or any(f not in ("T", "F", "True", "False") for f in flags):
                raise _BadRecord(f"pbc={value!r} is not three T/F flags")
            rec["pbc"] = np.array([f in ("T", "True") for f in flags])
        elif key != "Properties":
            props[key] = _value(value)
    if "lattice" in rec and "pbc" not in rec:
        rec["pbc"] = np.ones(3, dtype=bool)  # the extended-XYZ default when a Lattice is given
    rec["props"] = props
    return rec


def read_xyz(path: str | os.PathLike, skip_invalid: bool = False) -> list[dict[str, Any]]:
    """Read all frames of an XYZ or extended-XYZ file (ASE/libAtoms convention): a count line, a comment
    line, then one line per atom ``symbol x y z [...]`` with positions in Å.

    From an extended-XYZ comment, ``Lattice="ax ay az bx by bz cx cy cz"`` becomes ``lattice`` (rows are
    cell vectors), ``pbc="T T T"`` becomes ``pbc``, ``Properties=`` names the atom columns (extra ones go
    to ``atom_props``), and every other ``key=value`` goes to ``props``. In plain XYZ, columns after z go to
    ``atom_props["extra"]``. A count line that is not an integer, or that declares more atoms than the
    file has lines, ends the file's readable part: it raises (the frames before it are not returned alone).
    """
    p = _check_file(path, (".xyz", ".extxyz"), "XYZ")
    lines = p.read_bytes().decode("utf-8", errors="replace").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    records, failures, start, index = [], [], 0, 0
    while start < len(lines):
        count = lines[start].strip()
        if not count.isdigit():
            raise DataFormatError(f"{p}: line {start + 1} should be the atom count of frame {index}, got {count[:40]!r}")
        n = int(count)
        if start + 2 + n > len(lines):
            raise DataFormatError(
                f"{p}: frame {index} declares {n} atoms at line {start + 1}, but only {len(lines) - start - 2} lines follow"
            )
        try:
            rec = _xyz_frame(lines, start, n)
            rec["index"] = index
            records.append(rec)
        except _BadRecord as exc:
            failures.append((index, str(exc)))
        start += 2 + n
        index += 1
    return _report(p, records, failures, index, skip_invalid)


# --------------------------------------------------------------------------------------- datasets
def _to_torch(rec: dict[str, Any]) -> dict[str, Any]:
    out = dict(rec)
    for key in ("numbers", "positions", "lattice", "pbc"):
        if key in out:
            out[key] = torch.from_numpy(np.ascontiguousarray(out[key]))
    return out


class _MoleculeFile(Dataset):
    suffix = ""
    reader = staticmethod(read_sdf)

    def __init__(self, root: str | os.PathLike, split: str = "train", skip_invalid: bool = False) -> None:
        self.root, self.split = Path(root), split
        path = self.root / f"{split}{self.suffix}"
        if not path.is_file():
            raise MissingFileError(f"{path}: no file for split {split!r} (expected <root>/<split>{self.suffix})")
        self.records = [_to_torch(r) for r in self.reader(path, skip_invalid=skip_invalid)]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return dict(self.records[index])


@register_dataset("sdf-molecules", "Molecules from <root>/<split>.sdf (RDKit; hydrogens kept)", modality="molecule")
class SDFMolecules(_MoleculeFile):
    """All records of ``<root>/<split>.sdf`` as molecule samples with torch tensors (see :func:`read_sdf`)."""

    suffix = ".sdf"
    reader = staticmethod(read_sdf)


@register_dataset("xyz-molecules", "Molecules or crystals from <root>/<split>.xyz (extended XYZ)", modality="molecule")
class XYZMolecules(_MoleculeFile):
    """All frames of ``<root>/<split>.xyz`` as molecule/crystal samples with torch tensors (see :func:`read_xyz`)."""

    suffix = ".xyz"
    reader = staticmethod(read_xyz)
