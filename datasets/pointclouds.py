"""Point-cloud readers (.bin, .ply, .pcd, .npy, .txt), label mapping and the ``pointcloud-folder`` dataset.

Every reader returns one sample in the threefold point convention (see ``datasets/README.md``)::

    coord (N, 3) float32, metres    feat (N, C) float32, the file's other per-point fields in file order
    label (N,)   int64, classes 0..C-1, ignore index -1 (only where a label source is given)

Validation happens before any allocation that the file's own size does not bound: a header that
declares more points than the file can hold is refused from the header alone. Non-finite
coordinates or features, truncated or oversized files, wrong extensions and empty clouds raise
:class:`~threefold.datasets.errors.DataFormatError` naming the file and the problem.

PLY and uncompressed PCD are parsed here with NumPy rather than with open3d: open3d's readers keep
only positions, colours and normals (losing intensity and label fields) and return an empty or
partial cloud with a log warning when a file is truncated, where threefold must raise. open3d
(extra ``lidar``) is used for ``DATA binary_compressed`` PCD only, whose LZF decoding it provides,
and only after the header has been checked against the file size here.
"""

from __future__ import annotations

import io
import math
import os
import tokenize
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from threefold.datasets.errors import DataFormatError, MissingFileError, UnsafePickleError, require
from threefold.datasets.registry import register_dataset
from threefold.datasets.splits import item_generator

POINT_SUFFIXES: tuple[str, ...] = (".bin", ".ply", ".pcd", ".npy", ".txt")
LABEL_SUFFIXES: tuple[str, ...] = (".label", ".npy", ".txt")
IGNORE_INDEX = -1
_MAX_HEADER_BYTES = 1 << 16  # a PLY/PCD header larger than this is not a header


def _check_file(path: str | os.PathLike, suffixes: Sequence[str], what: str) -> Path:
    p = Path(path)
    if p.suffix.lower() not in suffixes:
        raise DataFormatError(f"{p}: extension {p.suffix!r} is not a {what} file; expected one of {', '.join(suffixes)}")
    if not p.is_file():
        raise MissingFileError(f"{p}: {what} file not found" + (" (it is a folder)" if p.is_dir() else ""))
    return p


def _sample(path: Path, columns: Mapping[str, np.ndarray], label_field: str | None) -> dict[str, torch.Tensor]:
    """Build a sample from named per-point columns, each (N,) or (N, k), checking finiteness."""
    for axis in ("x", "y", "z"):
        if axis not in columns:
            raise DataFormatError(f"{path}: no {axis!r} field; fields are {', '.join(columns)}")
    n = columns["x"].shape[0]
    if n == 0:
        raise DataFormatError(f"{path}: the file holds no points")
    coord64 = np.stack([columns[a].astype(np.float64, copy=False) for a in ("x", "y", "z")], axis=1)
    bad = ~np.isfinite(coord64).all(axis=1)
    if bad.any():
        raise DataFormatError(
            f"{path}: {int(bad.sum())} of {n} points have NaN/inf coordinates (first at point {int(np.argmax(bad))})"
        )
    coord = coord64.astype(np.float32)
    if not np.isfinite(coord).all():
        raise DataFormatError(f"{path}: coordinates overflow float32 (|value| > 3.4e38 m)")
    out: dict[str, torch.Tensor] = {"coord": torch.from_numpy(coord)}
    if label_field is not None:
        if label_field not in columns:
            raise DataFormatError(f"{path}: no label field {label_field!r}; fields are {', '.join(columns)}")
        raw = columns[label_field]
        if raw.ndim != 1:
            raise DataFormatError(f"{path}: label field {label_field!r} has {raw.shape[1]} values per point, expected 1")
        out["label_raw"] = torch.from_numpy(_as_integer_labels(raw, f"{path}: field {label_field!r}"))
    feats = [
        c.reshape(n, -1).astype(np.float64, copy=False) for k, c in columns.items() if k not in ("x", "y", "z", label_field)
    ]
    feat = np.concatenate(feats, axis=1) if feats else np.zeros((n, 0), dtype=np.float64)
    if not np.isfinite(feat).all():
        rows, cols = np.nonzero(~np.isfinite(feat))
        raise DataFormatError(f"{path}: {rows.size} NaN/inf feature values (first at point {rows[0]}, feature column {cols[0]})")
    feat32 = feat.astype(np.float32)
    if not np.isfinite(feat32).all():
        raise DataFormatError(f"{path}: feature values overflow float32")
    out["feat"] = torch.from_numpy(feat32)
    return out


def _as_integer_labels(raw: np.ndarray, where: str) -> np.ndarray:
    if raw.dtype.kind in "iu":
        if raw.dtype == np.uint64 and raw.size and int(raw.max()) > np.iinfo(np.int64).max:
            raise DataFormatError(f"{where}: label ids exceed int64")
        return raw.astype(np.int64)
    if raw.dtype.kind == "f":
        if not np.isfinite(raw).all() or np.any(raw != np.round(raw)) or np.any(np.abs(raw) > 2**53):
            raise DataFormatError(f"{where}: labels must be integers, found non-integer or non-finite values")
        return raw.astype(np.int64)
    raise DataFormatError(f"{where}: labels must be integers, got dtype {raw.dtype}")


# --------------------------------------------------------------------------------------------- .bin
def read_bin(path: str | os.PathLike, num_features: int = 4) -> dict[str, torch.Tensor]:
    """Read a KITTI/SemanticKITTI Velodyne scan: little-endian float32 records ``x, y, z, remission[, ...]``.

    ``num_features`` is the record width (4 for KITTI, 5 for nuScenes). Returns ``coord`` (N, 3) float32
    metres and ``feat`` (N, num_features - 3) float32 (remission in [0, 1] for KITTI). A size that is
    not a multiple of ``4 * num_features`` bytes raises :class:`DataFormatError`.
    """
    p = _check_file(path, (".bin",), "point-cloud")
    if num_features < 3:
        raise DataFormatError(f"{p}: num_features={num_features}, a record needs at least x, y, z")
    size = p.stat().st_size
    record = 4 * num_features
    if size % record:
        raise DataFormatError(
            f"{p}: size {size} bytes is not a multiple of {record} (float32 x, y, z + {num_features - 3} features)"
        )
    data = np.fromfile(p, dtype="<f4").reshape(-1, num_features)
    cols = {"x": data[:, 0], "y": data[:, 1], "z": data[:, 2], "feat": data[:, 3:]}
    return _sample(p, cols, None)


# --------------------------------------------------------------------------------------------- .npy
def read_npy_array(p: Path, allowed_kinds: str, ndims: tuple[int, ...]) -> np.ndarray:
    """Load a .npy after checking its header against the file size, so a forged shape never allocates.
    ``allowed_kinds``: NumPy dtype kinds accepted (``"fiu"``); ``ndims``: accepted numbers of dimensions.
    Object arrays raise :class:`UnsafePickleError`, anything else malformed :class:`DataFormatError`."""
    size = p.stat().st_size
    try:
        with open(p, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            if major == 1:
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif major == 2:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise DataFormatError(f"{p}: .npy format version {major} is not supported (expected 1 or 2)")
            offset = f.tell()
    except DataFormatError:
        raise
    except (ValueError, EOFError, OSError, SyntaxError, TypeError, RecursionError, MemoryError, KeyError,
            IndexError, tokenize.TokenError) as exc:  # what NumPy's header parser lets escape on a damaged header
        raise DataFormatError(f"{p}: not a valid .npy header ({exc})") from exc
    if dtype.hasobject:
        raise UnsafePickleError(f"{p}: .npy holds Python objects (dtype {dtype}); refused, pickles are never loaded")
    if dtype.kind not in allowed_kinds or dtype.fields is not None:
        raise DataFormatError(f"{p}: .npy dtype {dtype} is not supported; expected a plain numeric array")
    if len(shape) not in ndims or any(d < 0 for d in shape):
        raise DataFormatError(f"{p}: .npy array has shape {shape}, expected {' or '.join(f'{d}-D' for d in ndims)}")
    nbytes = math.prod(shape) * dtype.itemsize
    if offset + nbytes != size:
        raise DataFormatError(
            f"{p}: header declares shape {shape} {dtype} = {nbytes} data bytes, but the file holds {size - offset}"
        )
    data = np.fromfile(p, dtype=dtype, count=math.prod(shape), offset=offset)
    return data.reshape(shape, order="F" if fortran else "C")


def read_npy(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read an (N, 3 + C) numeric ``.npy`` array: columns x, y, z in metres, then C features."""
    p = _check_file(path, (".npy",), "point-cloud")
    data = read_npy_array(p, "fiu", (2,))
    if data.shape[1] < 3:
        raise DataFormatError(f"{p}: array has shape {data.shape}, expected (N, 3 + C) with x, y, z first")
    return _sample(p, {"x": data[:, 0], "y": data[:, 1], "z": data[:, 2], "feat": data[:, 3:]}, None)


# --------------------------------------------------------------------------------------------- .txt
def _loadtxt(p: Path, stream: io.TextIOBase | Path, dtype: type, max_rows: int | None = None, skiprows: int = 0,
             delimiter: str | None = None) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            # an empty table warns; callers turn it into a "no points" error
            warnings.simplefilter("ignore", UserWarning)
            return np.loadtxt(stream, dtype=dtype, ndmin=2, max_rows=max_rows, skiprows=skiprows, delimiter=delimiter,
                              comments="#", encoding="ascii")
    except (ValueError, OverflowError, UnicodeDecodeError) as exc:
        raise DataFormatError(f"{p}: malformed text data ({exc})") from exc


def read_txt(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read an (N, 3 + C) whitespace- or comma-separated text table (ModelNet, S3DIS style): x, y, z, features."""
    p = _check_file(path, (".txt",), "point-cloud")
    with open(p, "rb") as f:
        head = f.read(4096)
    if not head.strip():
        raise DataFormatError(f"{p}: the file holds no points (empty)")
    delimiter = "," if b"," in head.split(b"\n", 1)[0] else None
    data = _loadtxt(p, p, np.float64, delimiter=delimiter)
    if data.shape[1] < 3:
        raise DataFormatError(f"{p}: table has {data.shape[1]} columns, expected x, y, z and optional features")
    return _sample(p, {"x": data[:, 0], "y": data[:, 1], "z": data[:, 2], "feat": data[:, 3:]}, None)


# ----------------------------------------------------------------------------------------- headers
def _read_header(p: Path, end_marker: Callable[[str], bool], fmt: str) -> tuple[list[str], int]:
    """Text header lines up to and including the line for which ``end_marker`` is true, and the data offset."""
    with open(p, "rb") as f:
        head = f.read(_MAX_HEADER_BYTES)
    lines, pos = [], 0
    while True:
        nl = head.find(b"\n", pos)
        if nl < 0:
            raise DataFormatError(f"{p}: {fmt} header is truncated or longer than {_MAX_HEADER_BYTES} bytes")
        try:
            line = head[pos:nl].decode("ascii").strip()
        except UnicodeDecodeError as exc:
            raise DataFormatError(f"{p}: {fmt} header line {len(lines) + 1} is not ASCII") from exc
        lines.append(line)
        pos = nl + 1
        if end_marker(line):
            return lines, pos


def _int(p: Path, token: str, field: str, minimum: int = 0) -> int:
    try:
        value = int(token)
    except ValueError as exc:
        raise DataFormatError(f"{p}: header field {field} = {token!r}, expected an integer") from exc
    if value < minimum:
        raise DataFormatError(f"{p}: header field {field} = {value}, expected >= {minimum}")
    return value


def _ascii_body(p: Path, offset: int, lines: int, what: str) -> str:
    """The data section of an ASCII PLY/PCD, checked to hold exactly the declared number of lines.

    Counting lines (not parsed rows) catches a count that is too small as well as too large: a
    deflated vertex count would otherwise let face lines be parsed as extra vertices, or silently
    leave points unread.
    """
    with open(p, "rb") as f:
        f.seek(offset)
        data = f.read()
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as exc:
        raise DataFormatError(f"{p}: ASCII data section holds non-ASCII bytes (at byte {offset + exc.start})") from exc
    found = text.rstrip().count("\n") + 1 if text.strip() else 0
    if found != lines:
        raise DataFormatError(f"{p}: header declares {lines} {what}, the data section has {found} lines")
    return text


def _check_data_size(p: Path, offset: int, nbytes: int, what: str) -> None:
    available = p.stat().st_size - offset
    if nbytes != available:
        problem = "truncated" if available < nbytes else "has trailing bytes"
        raise DataFormatError(f"{p}: header declares {what} = {nbytes} data bytes, but the file holds {available} ({problem})")


# --------------------------------------------------------------------------------------------- .ply
_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
    "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}


def read_ply(path: str | os.PathLike, label_field: str | None = None) -> dict[str, torch.Tensor]:
    """Read the ``vertex`` element of a PLY file (Turk 1994; ascii, binary_little_endian, binary_big_endian).

    ``coord`` is (x, y, z); ``feat`` holds the vertex's other scalar properties in file order (e.g.
    intensity, red, green, blue, nx, ny, nz) as float32. With ``label_field`` that property becomes
    ``label_raw`` (N,) int64 instead of a feature. Other elements (faces, edges) are not returned, but
    they are accounted for: the data must hold exactly the declared number of every element, so a
    wrong vertex count cannot pass by borrowing face bytes or lines.
    """
    p = _check_file(path, (".ply",), "point-cloud")
    lines, offset = _read_header(p, lambda s: s == "end_header", "PLY")
    if lines[0] != "ply":
        raise DataFormatError(f"{p}: not a PLY file (first line {lines[0][:40]!r}, expected 'ply')")
    fmt = None
    # (element name, count, [(property name, value type, list-count type or None)])
    elements: list[tuple[str, int, list[tuple[str, str, str | None]]]] = []
    for i, line in enumerate(lines[1:-1], start=2):
        tok = line.split()
        if not tok or tok[0] in ("comment", "obj_info"):
            continue
        if tok[0] == "format" and len(tok) == 3:
            fmt = tok[1]
        elif tok[0] == "element" and len(tok) == 3:
            elements.append((tok[1], _int(p, tok[2], f"element {tok[1]}"), []))
        elif tok[0] == "property" and elements and len(tok) == 3 and tok[1] in _PLY_TYPES:
            elements[-1][2].append((tok[2], _PLY_TYPES[tok[1]], None))
        elif tok[0] == "property" and elements and len(tok) == 5 and tok[1] == "list":
            if tok[2] not in _PLY_TYPES or tok[3] not in _PLY_TYPES:
                raise DataFormatError(f"{p}: header line {i}: unknown list property types {tok[2]!r}, {tok[3]!r}")
            elements[-1][2].append((tok[4], _PLY_TYPES[tok[3]], _PLY_TYPES[tok[2]]))
        else:
            raise DataFormatError(f"{p}: header line {i} is not valid PLY: {line[:60]!r}")
    if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
        raise DataFormatError(f"{p}: PLY format {fmt!r}, expected ascii, binary_little_endian or binary_big_endian")
    names = [e[0] for e in elements]
    if "vertex" not in names:
        raise DataFormatError(f"{p}: PLY has no 'vertex' element (elements: {', '.join(names) or 'none'})")
    v = names.index("vertex")
    _, count, props = elements[v]
    if count == 0:
        raise DataFormatError(f"{p}: the file holds no points (element vertex 0)")
    if any(is_list for _, _, is_list in props):
        raise DataFormatError(f"{p}: PLY vertex element has a list property; expected scalar properties only")
    prop_names = [n for n, _, _ in props]
    if len(set(prop_names)) != len(prop_names):
        raise DataFormatError(f"{p}: PLY vertex element repeats a property name: {prop_names}")

    if fmt == "ascii":
        text = _ascii_body(p, offset, sum(e[1] for e in elements), "lines (one per element of " + ", ".join(names) + ")")
        table = _loadtxt(p, io.StringIO(text), np.float64, max_rows=count, skiprows=sum(e[1] for e in elements[:v]))
        if table.shape != (count, len(props)):
            raise DataFormatError(
                f"{p}: header declares {count} vertices with {len(props)} properties, found a {table.shape[0]} x {table.shape[1]} table"
            )
        columns = {n: table[:, j] for j, n in enumerate(prop_names)}
    else:
        endian = "<" if fmt == "binary_little_endian" else ">"
        dtype = np.dtype([(n, endian + t) for n, t, _ in props])
        start = _ply_binary_layout(p, offset, elements, v, endian)
        data = np.fromfile(p, dtype=dtype, count=count, offset=start)
        columns = {n: data[n] for n in prop_names}
    return _sample(p, columns, label_field)


def _ply_binary_layout(p: Path, offset: int, elements: list[tuple[str, int, list[tuple[str, str, str | None]]]],
                       v: int, endian: str) -> int:
    """Byte offset of the vertex data, after checking that the elements fill the file exactly.

    Every element is accounted for, faces included: a wrong vertex count would otherwise shift the
    vertex block into the face data unnoticed. Elements with list properties are sized from their
    count fields — all at once when every record has the first record's length (triangle meshes),
    record by record only for mixed polygon sizes; the walk advances at least one byte per record, so
    it ends within the file's size.
    """
    size = p.stat().st_size
    raw: bytes | None = None
    pos, start = offset, offset
    for i, (name, n, eprops) in enumerate(elements):
        if i == v:
            start = pos
        if not any(ct for _, _, ct in eprops):
            pos += n * sum(np.dtype(t).itemsize for _, t, _ in eprops)
        else:
            if raw is None:
                raw = p.read_bytes()
            pos = _ply_list_element_end(p, raw, pos, name, n, eprops, endian)
        if pos > size:
            raise DataFormatError(f"{p}: header declares more data than the file holds (truncated in element {name!r})")
    if pos != size:
        raise DataFormatError(f"{p}: header accounts for {pos - offset} data bytes, the file holds {size - offset} (trailing bytes)")
    return start


def _ply_list_element_end(p: Path, raw: bytes, pos: int, name: str, n: int,
                          eprops: list[tuple[str, str, str | None]], endian: str) -> int:
    def read_count(at: int, ct: str) -> int:
        if at + np.dtype(ct).itemsize > len(raw):
            raise DataFormatError(f"{p}: element {name!r} is truncated")
        k = int(np.frombuffer(raw, dtype=endian + ct, count=1, offset=at)[0])
        if k < 0:
            raise DataFormatError(f"{p}: element {name!r} has a negative list length {k}")
        return k

    lists = [(j, ct) for j, (_, _, ct) in enumerate(eprops) if ct]
    if n == 0:
        return pos
    if len(lists) == 1:
        j, ct = lists[0]
        before = sum(np.dtype(t).itemsize for _, t, _ in eprops[:j])
        k = read_count(pos + before, ct)
        record = sum(np.dtype(t).itemsize for _, t, c in eprops if not c) + np.dtype(ct).itemsize + k * np.dtype(eprops[j][1]).itemsize
        if pos + n * record <= len(raw):
            counts = np.ndarray((n,), dtype=endian + ct, buffer=raw, offset=pos + before, strides=(record,))
            if bool((counts == k).all()):
                return pos + n * record
    for _ in range(n):  # mixed list lengths: walk record by record
        for _, t, ct in eprops:
            pos += np.dtype(ct).itemsize + read_count(pos, ct) * np.dtype(t).itemsize if ct else np.dtype(t).itemsize
        if pos > len(raw):
            raise DataFormatError(f"{p}: element {name!r} is truncated")
    return pos


# --------------------------------------------------------------------------------------------- .pcd
_PCD_TYPES = {("F", 4): "f4", ("F", 8): "f8", ("I", 1): "i1", ("I", 2): "i2", ("I", 4): "i4", ("I", 8): "i8",
              ("U", 1): "u1", ("U", 2): "u2", ("U", 4): "u4", ("U", 8): "u8"}


def read_pcd(path: str | os.PathLike, label_field: str | None = None) -> dict[str, torch.Tensor]:
    """Read a PCL point-cloud file (PCD v0.7; DATA ascii, binary or binary_compressed).

    ``coord`` is (x, y, z); ``feat`` holds the other fields in file order (a field with COUNT k gives
    k columns; PCL's ``_`` padding fields are skipped). With ``label_field`` that field becomes
    ``label_raw`` (N,) int64. Organised clouds (HEIGHT > 1) are flattened row by row; their NaN
    invalid points raise, like any non-finite coordinate. ``binary_compressed`` needs open3d.
    """
    p = _check_file(path, (".pcd",), "point-cloud")
    lines, offset = _read_header(p, lambda s: s.startswith("DATA"), "PCD")
    head: dict[str, list[str]] = {}
    for line in lines:
        tok = line.split()
        if tok and not tok[0].startswith("#"):
            head[tok[0].upper()] = tok[1:]
    for key in ("FIELDS", "SIZE", "TYPE", "WIDTH", "HEIGHT", "DATA"):
        if not head.get(key):
            raise DataFormatError(f"{p}: PCD header has no {key} line")
    fields = head["FIELDS"]
    sizes = [_int(p, t, "SIZE", 1) for t in head["SIZE"]]
    types = head["TYPE"]
    counts = [_int(p, t, "COUNT", 1) for t in head.get("COUNT", ["1"] * len(fields))]
    if not len(fields) == len(sizes) == len(types) == len(counts):
        raise DataFormatError(
            f"{p}: PCD header has {len(fields)} FIELDS but {len(sizes)} SIZE, {len(types)} TYPE, {len(counts)} COUNT entries"
        )
    width, height = _int(p, head["WIDTH"][0], "WIDTH"), _int(p, head["HEIGHT"][0], "HEIGHT")
    n = _int(p, head["POINTS"][0], "POINTS") if head.get("POINTS") else width * height
    if n != width * height:
        raise DataFormatError(f"{p}: POINTS {n} differs from WIDTH x HEIGHT = {width} x {height}")
    if n == 0:
        raise DataFormatError(f"{p}: the file holds no points (POINTS 0)")
    dt = []
    for f, s, t, c in zip(fields, sizes, types, counts):
        if (t, s) not in _PCD_TYPES:
            raise DataFormatError(f"{p}: field {f!r} has TYPE {t} SIZE {s}; expected F 4/8, I or U 1/2/4/8")
        dt.append((f, _PCD_TYPES[(t, s)], c))
    real = [f for f, _, _ in dt if f != "_"]
    if len(set(real)) != len(real):
        raise DataFormatError(f"{p}: PCD FIELDS repeat a name: {fields}")
    mode = head["DATA"][0].lower()

    if mode == "ascii":
        table = _loadtxt(p, io.StringIO(_ascii_body(p, offset, n, "point lines")), np.float64, max_rows=n)
        width_cols = sum(c for _, _, c in dt)
        if table.shape != (n, width_cols):
            raise DataFormatError(
                f"{p}: header declares {n} points of {width_cols} values, found a {table.shape[0]} x {table.shape[1]} table"
            )
        columns, j = {}, 0
        for f, _, c in dt:
            if f != "_":
                columns[f] = table[:, j] if c == 1 else table[:, j : j + c]
            j += c
    elif mode == "binary":
        dtype = np.dtype([(f if f != "_" else f"_pad{i}", "<" + t, (c,) if c > 1 else ()) for i, (f, t, c) in enumerate(dt)])
        _check_data_size(p, offset, n * dtype.itemsize, f"{n} points x {dtype.itemsize} bytes")
        data = np.fromfile(p, dtype=dtype, count=n, offset=offset)
        columns = {f: data[f] for f in real}
    elif mode == "binary_compressed":
        columns = _read_pcd_compressed(p, offset, n, dt)
    else:
        raise DataFormatError(f"{p}: PCD DATA {mode!r}, expected ascii, binary or binary_compressed")
    return _sample(p, columns, label_field)


def _read_pcd_compressed(p: Path, offset: int, n: int, dt: list[tuple[str, str, int]]) -> dict[str, np.ndarray]:
    point_bytes = sum(np.dtype(t).itemsize * c for _, t, c in dt)
    with open(p, "rb") as f:
        f.seek(offset)
        sizes = f.read(8)
    if len(sizes) != 8:
        raise DataFormatError(f"{p}: binary_compressed data has no size words (truncated)")
    compressed, uncompressed = np.frombuffer(sizes, dtype="<u4").tolist()
    _check_data_size(p, offset + 8, compressed, "a compressed block")
    if uncompressed != n * point_bytes:
        raise DataFormatError(
            f"{p}: compressed block unpacks to {uncompressed} bytes, but {n} points x {point_bytes} bytes are declared"
        )
    # an LZF back-reference (3 bytes) expands to at most 264 bytes, so no valid block grows beyond 88x
    if uncompressed > 88 * compressed:
        raise DataFormatError(f"{p}: a {compressed}-byte LZF block cannot unpack to the declared {uncompressed} bytes")
    o3d = require("open3d", extra="lidar")
    cloud = o3d.t.io.read_point_cloud(str(p))
    attrs = {k: cloud.point[k].numpy() for k in cloud.point}
    got = attrs.get("positions", np.zeros((0, 3))).shape[0]
    if got != n:
        raise DataFormatError(f"{p}: open3d decoded {got} of the {n} declared points (corrupt compressed block)")
    # open3d renames PCL's standard fields; others keep their names
    alias = {"normal_x": ("normals", 0), "normal_y": ("normals", 1), "normal_z": ("normals", 2)}
    columns: dict[str, np.ndarray] = {}
    for f, _, c in dt:
        if f == "_":
            continue
        if f in ("x", "y", "z"):
            columns[f] = attrs["positions"][:, "xyz".index(f)]
        elif f in alias and alias[f][0] in attrs:
            columns[f] = attrs[alias[f][0]][:, alias[f][1]]
        elif f in attrs:
            columns[f] = attrs[f].reshape(n, -1)[:, 0] if c == 1 else attrs[f].reshape(n, -1)
        else:
            raise DataFormatError(f"{p}: field {f!r} of a binary_compressed PCD is not decoded by open3d")
    return columns


# ------------------------------------------------------------------------------------- dispatcher
_READERS: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
    ".bin": read_bin, ".ply": read_ply, ".pcd": read_pcd, ".npy": read_npy, ".txt": read_txt,
}


def read_points(path: str | os.PathLike, label_field: str | None = None) -> dict[str, torch.Tensor]:
    """Read any supported point-cloud file by extension (.bin, .ply, .pcd, .npy, .txt); see the readers."""
    p = _check_file(path, POINT_SUFFIXES, "point-cloud")
    suffix = p.suffix.lower()
    if label_field is not None and suffix not in (".ply", ".pcd"):
        raise DataFormatError(f"{p}: label_field={label_field!r} is only meaningful for .ply and .pcd files")
    return _READERS[suffix](p, label_field=label_field) if label_field else _READERS[suffix](p)


# ------------------------------------------------------------------------------------------ labels
def read_point_labels(path: str | os.PathLike, num_points: int) -> dict[str, torch.Tensor]:
    """Read per-point raw labels for a cloud of ``num_points`` points.

    ``.label`` is SemanticKITTI's uint32 per point, semantic id in the low 16 bits and instance id in
    the high 16 (Behley et al., ICCV 2019): returns ``label_raw`` and ``instance`` (N,) int64. ``.npy`` and
    ``.txt`` hold one integer per point: returns ``label_raw``. A count other than ``num_points`` raises.
    """
    p = _check_file(path, LABEL_SUFFIXES, "label")
    suffix = p.suffix.lower()
    if suffix == ".label":
        size = p.stat().st_size
        if size != 4 * num_points:
            raise DataFormatError(
                f"{p}: {size} bytes = {size / 4:g} uint32 labels, but the point cloud has {num_points} points"
            )
        raw = np.fromfile(p, dtype="<u4").astype(np.int64)
        return {"label_raw": torch.from_numpy(raw & 0xFFFF), "instance": torch.from_numpy(raw >> 16)}
    if suffix == ".npy":
        arr = read_npy_array(p, "fiu", (1, 2))
    else:
        arr = _loadtxt(p, p, np.float64) if p.stat().st_size else np.zeros((0, 1))
    if arr.ndim == 2 and arr.shape[1] != 1:
        raise DataFormatError(f"{p}: labels have shape {arr.shape}, expected (N,) or (N, 1)")
    arr = arr.reshape(-1)
    if arr.shape[0] != num_points:
        raise DataFormatError(f"{p}: {arr.shape[0]} labels, but the point cloud has {num_points} points")
    return {"label_raw": torch.from_numpy(_as_integer_labels(arr, str(p)))}


class LabelMap:
    """Maps raw dataset label ids to training classes 0..C-1 with ignore index -1, and back.

    ``learning_map`` gives the class of every raw id that may occur (a class of -1 means ignored);
    a raw id missing from it raises on :meth:`encode`, so no label is silently re-purposed.
    ``inverse`` gives the raw id to write for each class (defaults to the smallest raw id of that
    class); ``ignore_raw`` is written for -1 (defaults to the smallest raw id mapped to -1).
    """

    def __init__(self, learning_map: Mapping[int, int], inverse: Mapping[int, int] | None = None,
                 ignore_raw: int | None = None) -> None:
        if not learning_map:
            raise DataFormatError("LabelMap: learning_map is empty")
        keys = np.array(sorted(int(k) for k in learning_map), dtype=np.int64)
        vals = np.array([int(learning_map[k]) for k in sorted(learning_map, key=int)], dtype=np.int64)
        classes = sorted(set(vals.tolist()) - {IGNORE_INDEX})
        if any(c < IGNORE_INDEX for c in classes) or classes != list(range(len(classes))):
            raise DataFormatError(f"LabelMap: classes must be 0..C-1 (and -1 for ignore), got {classes}")
        self._keys, self._vals = keys, vals
        self.num_classes = len(classes)
        inv = dict(inverse) if inverse is not None else {}
        for k, v in zip(keys.tolist(), vals.tolist()):
            if v != IGNORE_INDEX:
                inv.setdefault(v, k)
        missing = [c for c in classes if c not in inv]
        if missing:
            raise DataFormatError(f"LabelMap: inverse map has no raw id for classes {missing}")
        ignored = keys[vals == IGNORE_INDEX]
        self.ignore_raw = ignore_raw if ignore_raw is not None else (int(ignored.min()) if ignored.size else None)
        self._inverse = np.array([inv[c] for c in range(self.num_classes)], dtype=np.int64)

    @classmethod
    def from_learning_map(cls, learning_map: Mapping[int, int], ignore: Sequence[int] = (),
                          inverse: Mapping[int, int] | None = None) -> "LabelMap":
        """From a map raw id → class id in any numbering (SemanticKITTI's ``learning_map``), where the
        class ids in ``ignore`` become -1 and the others are renumbered 0..C-1 in ascending order.
        ``inverse`` (class id → raw id, SemanticKITTI's ``learning_map_inv``) uses the original numbering."""
        kept = sorted(set(int(v) for v in learning_map.values()) - set(int(i) for i in ignore))
        renumber = {c: i for i, c in enumerate(kept)}
        mapped = {int(k): renumber.get(int(v), IGNORE_INDEX) for k, v in learning_map.items()}
        inv = {renumber[int(c)]: int(r) for c, r in inverse.items() if int(c) in renumber} if inverse else None
        return cls(mapped, inverse=inv)

    def encode(self, raw: torch.Tensor, where: str = "labels") -> torch.Tensor:
        """Raw ids (N,) → classes (N,) int64 in 0..C-1 or -1, on ``raw``'s device."""
        r = raw.detach().cpu().numpy().astype(np.int64, copy=False)
        idx = np.clip(np.searchsorted(self._keys, r), 0, self._keys.size - 1)
        unknown = self._keys[idx] != r
        if unknown.any():
            ids = np.unique(r[unknown])
            raise DataFormatError(f"{where}: raw label ids {ids[:10].tolist()} are not in the learning map")
        return torch.from_numpy(self._vals[idx]).to(raw.device)

    def decode(self, label: torch.Tensor) -> torch.Tensor:
        """Classes (N,) in 0..C-1 or -1 → raw ids (N,) int64, for writing predictions in the dataset's ids."""
        lab = label.detach().cpu().numpy().astype(np.int64, copy=False)
        bad = (lab < IGNORE_INDEX) | (lab >= self.num_classes)
        if bad.any():
            raise DataFormatError(f"labels: values {np.unique(lab[bad])[:10].tolist()} outside 0..{self.num_classes - 1} and -1")
        if (lab == IGNORE_INDEX).any() and self.ignore_raw is None:
            raise DataFormatError("labels: contain the ignore index -1 but the map has no raw id for it")
        # the appended entry is table[-1], so class -1 indexes the raw id of "ignored"
        table = np.append(self._inverse, self.ignore_raw if self.ignore_raw is not None else 0)
        return torch.from_numpy(table[lab]).to(label.device)


# ------------------------------------------------------------------------------------------ dataset
@register_dataset("pointcloud-folder", "Point clouds (.bin/.ply/.pcd/.npy/.txt) under <root>/<split>/points, "
                  "optional labels under <root>/<split>/labels", modality="points")
class PointCloudFolder(Dataset):
    """Generic point-cloud folder: ``<root>/<split>/points/<name>.<ext>`` and, optionally,
    ``<root>/<split>/labels/<name>.label|.npy|.txt`` (one label per point).

    Each item is a sample ``{"coord", "feat"[, "label"], "name"}`` (see the module docstring); raw label
    ids are mapped with ``label_map`` (a :class:`LabelMap` or a dict raw → class, -1 = ignore) or, without
    one, must already be classes in ``-1 .. num_classes-1``. ``transform(sample, generator)`` is applied
    with a ``torch.Generator`` seeded from ``(seed, epoch, index)``, so augmentation is reproducible in any
    DataLoader worker; call :meth:`set_epoch` each epoch for fresh draws.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", label_map: LabelMap | Mapping[int, int] | None = None,
                 num_classes: int | None = None, require_labels: bool = False,
                 transform: Callable[[dict[str, Any], torch.Generator], dict[str, Any]] | None = None,
                 seed: int = 0, bin_features: int = 4) -> None:
        self.root, self.split = Path(root), split
        folder = self.root / split / "points"
        if not folder.is_dir():
            raise MissingFileError(f"{folder}: no points folder for split {split!r} (expected <root>/<split>/points)")
        self.files = sorted(f for f in folder.iterdir() if f.suffix.lower() in POINT_SUFFIXES)
        if not self.files:
            raise MissingFileError(f"{folder}: no point-cloud files ({', '.join(POINT_SUFFIXES)})")
        dup = sorted(s for s, c in Counter(f.stem for f in self.files).items() if c > 1)
        if dup:
            raise DataFormatError(f"{folder}: several files share the names {dup[:5]} (different extensions)")
        self.label_dir = self.root / split / "labels"
        if require_labels and not self.label_dir.is_dir():
            raise MissingFileError(f"{self.label_dir}: labels required but the folder is absent")
        self.label_map = LabelMap(label_map) if isinstance(label_map, Mapping) else label_map
        self.num_classes = self.label_map.num_classes if self.label_map is not None else num_classes
        self.transform, self.seed, self.epoch, self.bin_features = transform, seed, 0, bin_features

    def __len__(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _label_file(self, stem: str) -> Path:
        for suffix in LABEL_SUFFIXES:
            f = self.label_dir / f"{stem}{suffix}"
            if f.is_file():
                return f
        raise MissingFileError(f"{self.label_dir}: no label file for {stem!r} (expected {stem}.label, .npy or .txt)")

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.files[index]
        sample: dict[str, Any] = (
            read_bin(path, self.bin_features) if path.suffix.lower() == ".bin" else read_points(path)
        )
        if self.label_dir.is_dir():
            lf = self._label_file(path.stem)
            raw = read_point_labels(lf, sample["coord"].shape[0])["label_raw"]
            if self.label_map is not None:
                sample["label"] = self.label_map.encode(raw, where=str(lf))
            else:
                upper = self.num_classes if self.num_classes is not None else np.iinfo(np.int64).max
                bad = (raw < IGNORE_INDEX) | (raw >= upper)
                if bool(bad.any()):
                    raise DataFormatError(
                        f"{lf}: labels {torch.unique(raw[bad])[:10].tolist()} are not classes in -1..{upper - 1}; give a label_map"
                    )
                sample["label"] = raw
        sample["name"] = path.stem
        if self.transform is not None:
            sample = self.transform(sample, item_generator(self.seed, self.epoch, index))
        return sample
