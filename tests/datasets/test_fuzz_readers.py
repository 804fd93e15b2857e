"""Property-based tests of every reader (issue #10 §2): files built here from the published formats,
then truncated, corrupted, given NaN/inf, wrong dtypes, empty or with enormous declared sizes.

The contract: a reader returns a valid sample or raises one of threefold's own errors — nothing
else escapes, nothing hangs (hypothesis deadline), and a damaged file never yields a silent partial
result. Where the format makes the right answer knowable (an undamaged file, a truncation, an
inflated count), the test also checks which of the two must happen. Examples per test:
``THREEFOLD_FUZZ_EXAMPLES`` (default 25, derandomized so CI is reproducible).
"""

from __future__ import annotations

import gzip
import io
import os
import struct
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from threefold.datasets.errors import ThreefoldError
from threefold.datasets.pointclouds import read_bin, read_npy, read_pcd, read_ply, read_txt

EXAMPLES = int(os.environ.get("THREEFOLD_FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=EXAMPLES, deadline=10_000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
HUGE = 10**12

# damage applied to a valid file: (kind, position as a fraction of the length, byte value)
DAMAGE = st.one_of(
    st.just(("none", 0.0, 0)),
    st.tuples(st.just("truncate"), st.floats(0.0, 1.0, exclude_max=True), st.just(0)),
    st.tuples(st.just("flip"), st.floats(0.0, 1.0, exclude_max=True), st.integers(0, 255)),
    st.just(("empty", 0.0, 0)),
)


def _damage(data: bytes, damage: tuple[str, float, int]) -> bytes:
    kind, where, value = damage
    pos = int(where * len(data))
    if kind == "truncate":
        return data[:pos]
    if kind == "flip" and data:
        return data[:pos] + bytes([value]) + data[pos + 1 :]
    if kind == "empty":
        return b""
    return data


def _outcome(reader: Callable[[Path], Any], name: str, data: bytes) -> Any:
    """The reader's result, or None when it raised a threefold error; any other exception fails."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_bytes(data)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return reader(path)
        except ThreefoldError:
            return None


def _check_points(s: dict[str, torch.Tensor]) -> int:
    coord, feat = s["coord"], s["feat"]
    assert coord.dtype == torch.float32 and coord.ndim == 2 and coord.shape[1] == 3 and coord.shape[0] > 0
    assert feat.dtype == torch.float32 and feat.ndim == 2 and feat.shape[0] == coord.shape[0]
    assert torch.isfinite(coord).all() and torch.isfinite(feat).all()
    if "label_raw" in s:
        assert s["label_raw"].dtype == torch.int64 and s["label_raw"].shape == (coord.shape[0],)
    return coord.shape[0]


def _representable(values: np.ndarray) -> bool:
    with np.errstate(all="ignore"):
        v = values.astype(np.float64)
        return bool(np.isfinite(v).all() and np.isfinite(v.astype(np.float32)).all())


# --------------------------------------------------------------------------------------------- .bin
@FUZZ
@given(raw=st.one_of(
    st.binary(max_size=200),
    hnp.arrays(np.dtype("<f4"), st.tuples(st.integers(0, 8), st.just(4))).map(lambda a: a.tobytes()),
))
def test_bin(raw):
    s = _outcome(read_bin, "scan.bin", raw)
    values = np.frombuffer(raw[: len(raw) // 4 * 4], dtype="<f4")
    if len(raw) and len(raw) % 16 == 0 and np.isfinite(values).all():
        assert s is not None and np.array_equal(s["coord"].numpy(), values.reshape(-1, 4)[:, :3])
    else:
        assert s is None


# --------------------------------------------------------------------------------------------- .npy
NPY_DTYPES = st.sampled_from(["<f4", ">f8", "<i2", "u1", "?", "<c8", "<f2"]).map(np.dtype)


@FUZZ
@given(arr=hnp.arrays(NPY_DTYPES, hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=6)),
       damage=DAMAGE, forge=st.booleans())
def test_npy(arr, damage, forge):
    buf = io.BytesIO()
    np.save(buf, arr)
    data = buf.getvalue()
    if forge:  # a valid header (numpy's own writer) declaring an enormous array over the same data
        head = io.BytesIO()
        np.lib.format.write_array_header_1_0(head, {"descr": np.lib.format.dtype_to_descr(arr.dtype),
                                                    "fortran_order": False, "shape": (HUGE, 4)})
        data = head.getvalue() + arr.tobytes()
    data = _damage(data, damage)
    s = _outcome(read_npy, "a.npy", data)
    if s is not None:
        _check_points(s)
    if forge or damage[0] in ("truncate", "empty"):
        assert s is None
    elif damage[0] == "none":
        ok = arr.ndim == 2 and arr.shape[0] > 0 and arr.shape[1] >= 3 and arr.dtype.kind in "fiu" and _representable(arr)
        assert (s is not None) == ok
        if ok:
            assert np.array_equal(s["coord"].numpy(), arr[:, :3].astype(np.float32))


# --------------------------------------------------------------------------------------------- .txt
@FUZZ
@given(arr=hnp.arrays(np.float64, st.tuples(st.integers(0, 6), st.integers(1, 5))), sep=st.sampled_from([" ", ","]),
       damage=DAMAGE)
def test_txt(arr, sep, damage):
    text = "".join(sep.join(repr(float(v)) for v in row) + "\n" for row in arr)
    s = _outcome(read_txt, "t.txt", _damage(text.encode(), damage))
    if s is not None:
        _check_points(s)
    if damage[0] == "none":
        assert (s is not None) == (arr.shape[0] > 0 and arr.shape[1] >= 3 and _representable(arr))


# --------------------------------------------------------------------------------------------- .ply
PLY_TYPES = {"float": "f4", "double": "f8", "uchar": "u1", "short": "i2", "int": "i4", "uint": "u4"}


@st.composite
def ply_files(draw) -> tuple[bytes, int, np.ndarray, str]:
    fmt = draw(st.sampled_from(["ascii", "binary_little_endian", "binary_big_endian"]))
    n = draw(st.integers(0, 8))
    coord_type = draw(st.sampled_from(["float", "double"]))
    extra = draw(st.lists(st.sampled_from(["intensity", "red", "label", "nx"]), unique=True, max_size=3))
    props = [(a, coord_type) for a in "xyz"] + [(e, draw(st.sampled_from(sorted(PLY_TYPES)))) for e in extra]
    endian = ">" if fmt == "binary_big_endian" else "<"
    dtype = np.dtype([(name, endian + PLY_TYPES[t]) for name, t in props])
    table = draw(hnp.arrays(dtype, (n,)))
    faces = draw(st.lists(st.sampled_from([3, 4]), max_size=3)) if n >= 3 else []  # triangles and quads
    head = ["ply", f"format {fmt} 1.0", f"element vertex {n}"] + [f"property {t} {name}" for name, t in props]
    if faces:
        head += [f"element face {len(faces)}", "property list uchar int vertex_indices"]
    body: bytes
    if fmt == "ascii":
        rows = [" ".join(repr(float(v)) if dtype[k].kind == "f" else str(int(v)) for k, v in enumerate(r)) for r in table.tolist()]
        body = "".join(r + "\n" for r in rows).encode() + "".join(f"{k} " + " 0" * k + "\n" for k in faces).encode()
    else:
        body = table.tobytes() + b"".join(struct.pack(f"{endian}B{k}i", k, *range(k)) for k in faces)
    data = ("\n".join(head + ["end_header"]) + "\n").encode() + body
    values = np.stack([table[name].astype(np.float64) for name, _ in props], axis=1) if n else np.zeros((0, len(props)))
    return data, n, values, fmt


@FUZZ
@given(ply=ply_files(), damage=DAMAGE, count=st.sampled_from([None, -1, 1, HUGE]))
def test_ply(ply, damage, count):
    data, n, values, fmt = ply
    if count is not None:
        new = HUGE if count == HUGE else max(n + count, 0)
        data = data.replace(f"element vertex {n}\n".encode(), f"element vertex {new}\n".encode(), 1)
        count = None if new == n else new
    damaged = _damage(data, damage)
    s = _outcome(read_ply, "p.ply", damaged)
    if s is not None:
        _check_points(s)
    if count is not None and damage[0] != "flip":  # a flip could restore the count
        assert s is None, "an inflated/deflated vertex count was accepted"
    if damage[0] in ("truncate", "empty") and len(damaged) < len(data):
        if fmt == "ascii" and s is not None:
            assert _check_points(s) == n  # cut inside the last number: same count, never fewer points
        else:
            assert s is None
    if damage[0] == "none" and count is None:
        assert (s is not None) == (n > 0 and _representable(values))
        if s is not None:
            assert np.allclose(s["coord"].numpy(), values[:, :3].astype(np.float32), rtol=1e-6, equal_nan=False)


# --------------------------------------------------------------------------------------------- .pcd
PCD_TYPES = {("F", 4): "f4", ("F", 8): "f8", ("U", 1): "u1", ("I", 2): "i2", ("U", 4): "u4"}


@st.composite
def pcd_files(draw) -> tuple[bytes, int, np.ndarray, str]:
    mode = draw(st.sampled_from(["ascii", "binary", "binary_compressed"]))
    n = draw(st.integers(0, 8))
    if mode == "binary_compressed":  # what open3d decodes: float32 fields of one value
        fields = [("x", ("F", 4), 1), ("y", ("F", 4), 1), ("z", ("F", 4), 1)]
        fields += [("intensity", ("F", 4), 1)] if draw(st.booleans()) else []
    else:
        ct = draw(st.sampled_from([("F", 4), ("F", 8)]))
        fields = [(a, ct, 1) for a in "xyz"]
        fields += [(name, draw(st.sampled_from(sorted(PCD_TYPES))), draw(st.integers(1, 2)))
                   for name in draw(st.lists(st.sampled_from(["intensity", "label", "desc"]), unique=True, max_size=2))]
    dtype = np.dtype([(name, "<" + PCD_TYPES[t], (c,) if c > 1 else ()) for name, t, c in fields])
    table = draw(hnp.arrays(dtype, (n,)))
    head = (f"VERSION 0.7\nFIELDS {' '.join(f[0] for f in fields)}\nSIZE {' '.join(str(f[1][1]) for f in fields)}\n"
            f"TYPE {' '.join(f[1][0] for f in fields)}\nCOUNT {' '.join(str(f[2]) for f in fields)}\nWIDTH {n}\nHEIGHT 1\n"
            f"VIEWPOINT 0 0 0 1 0 0 0\nPOINTS {n}\nDATA {mode}\n").encode()
    values = (np.concatenate([np.asarray(table[f], dtype=np.float64).reshape(n, -1) for f, _, _ in fields], axis=1)
              if n else np.zeros((0, 3)))
    if mode == "ascii":
        body = "".join(" ".join(repr(float(v)) if dtype.fields[f][0].base.kind == "f" else str(int(v))
                                for f, _, _ in fields for v in np.atleast_1d(np.asarray(row[f])).tolist()) + "\n"
                       for row in table).encode()
    elif mode == "binary":
        body = table.tobytes()
    else:
        # PCL's layout: field-major (all x, then all y, ...), then LZF; literal runs (control byte
        # = run length - 1, at most 32 bytes) are valid LZF by the format's definition
        soa = b"".join(np.ascontiguousarray(table[name]).tobytes() for name, _, _ in fields)
        lzf = b"".join(bytes([len(soa[i : i + 32]) - 1]) + soa[i : i + 32] for i in range(0, len(soa), 32))
        body = struct.pack("<II", len(lzf), len(soa)) + lzf
    return head + body, n, values, mode


@FUZZ
@given(pcd=pcd_files(), damage=DAMAGE, count=st.sampled_from([None, -1, 1, HUGE]))
def test_pcd(pcd, damage, count):
    data, n, values, mode = pcd
    if mode == "binary_compressed":
        pytest.importorskip("open3d")
    if count is not None:
        new = HUGE if count == HUGE else max(n + count, 0)
        data = data.replace(f"WIDTH {n}\n".encode(), f"WIDTH {new}\n".encode(), 1)
        data = data.replace(f"POINTS {n}\n".encode(), f"POINTS {new}\n".encode(), 1)
        count = None if new == n else new
    damaged = _damage(data, damage)
    s = _outcome(read_pcd, "c.pcd", damaged)
    if s is not None:
        _check_points(s)
    if count is not None and damage[0] != "flip":  # a flip could restore the count
        assert s is None, "an inflated/deflated POINTS was accepted"
    if damage[0] in ("truncate", "empty") and len(damaged) < len(data):
        if mode == "ascii" and s is not None:
            assert _check_points(s) == n
        else:
            assert s is None
    if damage[0] == "none" and count is None:
        assert (s is not None) == (n > 0 and _representable(values))
        if s is not None:
            assert np.allclose(s["coord"].numpy(), values[:, :3].astype(np.float32), rtol=1e-6)


# ------------------------------------------------------------------------------------------- NIfTI
@FUZZ
@given(arr=hnp.arrays(st.sampled_from([np.dtype("<f4"), np.dtype("<i2"), np.dtype("u1")]),
                      hnp.array_shapes(min_dims=2, max_dims=5, min_side=1, max_side=4)),
       gz=st.booleans(), damage=DAMAGE, huge=st.booleans())
def test_nifti(arr, gz, damage, huge):
    nib = pytest.importorskip("nibabel")
    from threefold.datasets.volumes import read_nifti

    raw = nib.Nifti1Image(arr, np.diag([1.5, 2.0, 2.5, 1.0])).to_bytes()
    if huge:  # dim[0..7] are int16 at byte 40 of the NIfTI-1 header
        raw = raw[:40] + struct.pack("<8h", 3, 32767, 32767, 32767, 1, 1, 1, 1) + raw[56:]
    data = _damage(gzip.compress(raw, mtime=0) if gz else raw, damage)
    s = _outcome(read_nifti, "v.nii.gz" if gz else "v.nii", data)
    if s is not None:
        image = s["image"]
        assert image.ndim == 4 and image.dtype == torch.float32 and torch.isfinite(image).all()
        assert s["affine"].shape == (4, 4) and torch.isfinite(s["affine"]).all() and (s["spacing"] > 0).all()
    if (huge and damage[0] != "flip") or damage[0] == "empty":
        assert s is None
    if damage[0] == "truncate" and s is not None:
        # only a gzip trailer can be lost without losing voxels; the voxels must then be complete
        assert gz and image.numel() == arr.size
    if damage[0] == "none" and not huge:
        assert (s is not None) == (arr.ndim in (3, 4) and _representable(arr))


# ------------------------------------------------------------------------------------- molecules
SDF = """water
  fuzz

  3  2  0  0  0  0  0  0  0  0999 V2000
    0.0000    0.0000    0.1173 O   0  0  0  0  0  0  0  0  0  0  0  0
    0.0000    0.7572   -0.4692 H   0  0  0  0  0  0  0  0  0  0  0  0
    0.0000   -0.7572   -0.4692 H   0  0  0  0  0  0  0  0  0  0  0  0
  1  2  1  0
  1  3  1  0
M  END
> <energy>
-76.4

$$$$
hydrogen cyanide
  fuzz

  0  0  0     0  0            999 V3000
M  V30 BEGIN CTAB
M  V30 COUNTS 3 2 0 0 0
M  V30 BEGIN ATOM
M  V30 1 H -1.0660 0.0 0.0 0
M  V30 2 C 0.0 0.0 0.0 0
M  V30 3 N 1.1560 0.0 0.0 0
M  V30 END ATOM
M  V30 BEGIN BOND
M  V30 1 1 1 2
M  V30 2 3 2 3
M  V30 END BOND
M  V30 END CTAB
M  END
$$$$
"""
XYZ = '3\nenergy=-1.5 Lattice="4 0 0 0 4 0 0 0 4"\nO 0.0 0.0 0.1173\nH 0.0 0.7572 -0.4692\nH 0.0 -0.7572 -0.4692\n2\n\nC 0 0 0\nO 0 0 1.128\n'
TEXT_DAMAGE = st.tuples(st.sampled_from(["drop_line", "dup_line", "char", "truncate", "count"]),
                        st.floats(0.0, 1.0, exclude_max=True),
                        st.sampled_from(list("0123456789 .-nN$>M\nXx\x00é") + ["nan", "inf", "999999999"]))


def _damage_text(text: str, damage: tuple[str, float, str]) -> str:
    kind, where, token = damage
    lines = text.split("\n")
    i = int(where * len(lines))
    if kind == "drop_line":
        return "\n".join(lines[:i] + lines[i + 1 :])
    if kind == "dup_line":
        return "\n".join(lines[: i + 1] + lines[i:])
    if kind == "char":
        j = int(where * len(text))
        return text[:j] + token + text[j + 1 :]
    if kind == "count":  # an enormous declared size in the count fields
        return text.replace("COUNTS 3 2", f"COUNTS {HUGE} 2").replace("\n2\n", f"\n{HUGE}\n").replace("  3  2  0", "999999 0")
    return text[: int(where * len(text))]


def _check_molecules(records: list[dict[str, Any]]) -> None:
    assert [r["index"] for r in records] == sorted({r["index"] for r in records})
    for r in records:
        z, pos = r["numbers"], r["positions"]
        assert z.dtype == np.int64 and z.ndim == 1 and len(z) > 0 and (z >= 1).all() and (z <= 118).all()
        assert pos.dtype == np.float32 and pos.shape == (len(z), 3) and np.isfinite(pos).all()
        if "lattice" in r:
            assert r["lattice"].shape == (3, 3) and np.isfinite(r["lattice"]).all()


@FUZZ
@given(damage=TEXT_DAMAGE, skip=st.booleans())
def test_sdf(damage, skip):
    pytest.importorskip("rdkit")
    from threefold.datasets.molecules import read_sdf

    out = _outcome(lambda p: read_sdf(p, skip_invalid=skip), "m.sdf", _damage_text(SDF, damage).encode("utf-8"))
    if out is not None:
        _check_molecules(out)
    if damage[0] == "count":
        assert out is None or all(r["index"] != 1 for r in out)  # the V3000 record must be refused


@FUZZ
@given(damage=TEXT_DAMAGE, skip=st.booleans())
def test_xyz(damage, skip):
    pytest.importorskip("rdkit")
    from threefold.datasets.molecules import read_xyz

    out = _outcome(lambda p: read_xyz(p, skip_invalid=skip), "m.xyz", _damage_text(XYZ, damage).encode("utf-8"))
    if out is not None:
        _check_molecules(out)
    if damage[0] == "count":
        assert out is None
