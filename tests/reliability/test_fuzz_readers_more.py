"""Property-based tests (issue #10 §2) of the readers that tests/datasets/test_fuzz_readers.py does not
cover: Planetoid raw pickles, TU text files, IM-NET HDF5, QM9 XYZ, PDB / mmCIF Cα traces, CIF and
GEOM-DRUGS pickles. Each builds a valid file from the published format (never with the package's
own writer), damages it — truncation, flipped bytes, empty file, a token replaced by NaN / inf /
an enormous number / garbage, a non-UTF-8 byte, dropped or duplicated lines — and checks the contract:

- the reader returns a valid sample or raises one of threefold's errors; nothing else escapes;
- an undamaged file gives the values it was built from;
- no hang (hypothesis deadline).

Examples per test: ``THREEFOLD_FUZZ_EXAMPLES`` (default 25), derandomized so CI is reproducible;
``THREEFOLD_FUZZ_EXAMPLES=2000 pytest tests/reliability -k fuzz`` for a long run.
The minimal inputs that exposed reader bugs stay below as regression cases (test_known_reader_bugs).
"""

from __future__ import annotations

import os
import pickle
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from threefold.datasets.errors import ThreefoldError

EXAMPLES = int(os.environ.get("THREEFOLD_FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=EXAMPLES, deadline=20_000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
HUGE = 10**12

BYTE_DAMAGE = st.one_of(
    st.just(("none", 0.0, 0)),
    st.tuples(st.just("truncate"), st.floats(0.0, 1.0, exclude_max=True), st.just(0)),
    st.tuples(st.just("flip"), st.floats(0.0, 1.0, exclude_max=True), st.integers(0, 255)),
    st.just(("empty", 0.0, 0)),
)
TOKENS = ["nan", "inf", "-inf", str(HUGE), "-1", "0", "x", "", "1e309", "\xff", ",", "'", '"', "\x00"]
TEXT_DAMAGE = st.one_of(
    st.just(("none", 0.0, "")),
    st.tuples(st.sampled_from(["token", "drop_line", "dup_line", "truncate", "char"]),
              st.floats(0.0, 1.0, exclude_max=True), st.sampled_from(TOKENS)),
)


def damage_bytes(data: bytes, damage: tuple[str, float, int]) -> bytes:
    kind, where, value = damage
    pos = int(where * len(data))
    if kind == "truncate":
        return data[:pos]
    if kind == "flip" and data:
        return data[:pos] + bytes([value]) + data[pos + 1 :]
    if kind == "empty":
        return b""
    return data


def damage_text(text: str, damage: tuple[str, float, str]) -> bytes:
    """Damage at the level of lines and whitespace-separated tokens; "\\xff" becomes a raw 0xFF byte."""
    kind, where, token = damage
    lines = text.split("\n")
    i = int(where * len(lines))
    if kind == "drop_line":
        text = "\n".join(lines[:i] + lines[i + 1 :])
    elif kind == "dup_line":
        text = "\n".join(lines[: i + 1] + lines[i:])
    elif kind == "truncate":
        text = text[: int(where * len(text))]
    elif kind == "char":
        j = int(where * len(text))
        text = text[:j] + token + text[j + 1 :]
    elif kind == "token":
        words = [(ln, k) for ln, line in enumerate(lines) for k, _ in enumerate(line.split())]
        if words:
            ln, k = words[int(where * len(words))]
            parts = lines[ln].split()
            parts[k] = token
            lines[ln] = " ".join(parts)
            text = "\n".join(lines)
    return text.encode("utf-8").replace("\xff".encode(), b"\xff")


def outcome(reader: Callable[[Path], Any], files: dict[str, bytes]) -> Any:
    """Write ``files`` into a fresh folder and call ``reader(folder)``: its result, or None when it
    raised a threefold error. Any other exception propagates and fails the test."""
    with tempfile.TemporaryDirectory() as d:
        for name, data in files.items():
            (Path(d) / name).write_bytes(data)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return reader(Path(d))
        except ThreefoldError:
            return None


# ------------------------------------------------------------------------------------- Planetoid
def planetoid_files(n_train: int = 3, n_test: int = 2, feats: int = 4, classes: int = 3) -> tuple[dict[str, bytes], dict]:
    """ind.fuzz.* for Cora's layout (Yang et al. 2016): csr features x/tx/allx, one-hot y/ty/ally, the
    adjacency dict and test.index; allx covers train + 500 validation nodes, tests follow."""
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    n_all = n_train + 500
    x_all = (rng.random((n_all, feats)) < 0.3).astype(np.float32)
    x_test = (rng.random((n_test, feats)) < 0.3).astype(np.float32)
    lab_all, lab_test = rng.integers(0, classes, n_all), rng.integers(0, classes, n_test)
    onehot = lambda lab: np.eye(classes, dtype=np.int32)[lab]
    n = n_all + n_test
    graph = defaultdict(list, {i: [int((i + 1) % n), int((i * 7) % n)] for i in range(n)})
    test_index = np.arange(n_all, n)[::-1]  # the files list test ids in no particular order
    objs = {"x": sp.csr_matrix(x_all[:n_train]), "y": onehot(lab_all[:n_train]), "allx": sp.csr_matrix(x_all),
            "ally": onehot(lab_all), "tx": sp.csr_matrix(x_test), "ty": onehot(lab_test), "graph": graph}
    files = {f"ind.fuzz.{k}": pickle.dumps(v, protocol=4) for k, v in objs.items()}
    files["ind.fuzz.test.index"] = "".join(f"{i}\n" for i in test_index).encode()
    features = np.concatenate([x_all, np.zeros((n_test, feats), np.float32)])
    features[test_index] = x_test
    labels = np.concatenate([lab_all, np.zeros(n_test, np.int64)])
    labels[test_index] = lab_test
    return files, {"x": features, "y": labels, "n": n}


def _load_planetoid(folder: Path):
    from threefold.datasets import planetoid

    # the reader accepts cora|citeseer|pubmed: give the fuzz files Cora's names
    for p in folder.iterdir():
        p.rename(folder / p.name.replace("ind.fuzz.", "ind.cora."))
    return planetoid.load_planetoid(folder, "cora")


PLANETOID_KEYS = ["x", "tx", "allx", "y", "ty", "ally", "graph", "test.index"]


@FUZZ
@given(key=st.sampled_from(PLANETOID_KEYS), damage=BYTE_DAMAGE)
def test_fuzz_planetoid_pickles(key, damage):
    files, truth = planetoid_files()
    name = f"ind.fuzz.{key}"
    files[name] = damage_bytes(files[name], damage)
    g = outcome(_load_planetoid, files)
    if damage[0] == "none":
        assert g is not None
        assert np.array_equal(g.x.numpy(), truth["x"]) and np.array_equal(g.y.numpy(), truth["y"])
    if g is not None:
        n = g.num_nodes
        assert g.x.shape[0] == n and g.y.shape == (n,) and g.edge_index.min() >= 0 and g.edge_index.max() < n
        assert g.test_mask.sum() == 2 and not (g.train_mask & g.test_mask).any()
    if damage[0] in ("empty",) or (damage[0] == "truncate" and key != "test.index"):
        assert g is None, "a truncated or empty pickle was accepted"


@pytest.mark.parametrize("line", [0, 1])
@pytest.mark.parametrize("token", TOKENS + ["503.5", "504 504", "9" * 30])
def test_fuzz_planetoid_test_index(token, line):
    """Every token in either line (exhaustive: the space is small)."""
    files, _ = planetoid_files()
    ids = files["ind.fuzz.test.index"].decode().split("\n")
    ids[line] = token
    files["ind.fuzz.test.index"] = "\n".join(ids).encode("utf-8").replace("\xff".encode(), b"\xff")
    g = outcome(_load_planetoid, files)
    if g is not None:
        assert g.num_nodes < 10_000 and g.test_mask.sum() == 2


# ------------------------------------------------------------------------------------------- TU
TU = {  # three graphs: a triangle (class 1), an edge (class -1), a path of three (class 1); TU ids are 1-based
    "A": "1, 2\n2, 1\n2, 3\n3, 2\n1, 3\n3, 1\n4, 5\n5, 4\n6, 7\n7, 6\n7, 8\n8, 7\n",
    "graph_indicator": "1\n1\n1\n2\n2\n3\n3\n3\n",
    "graph_labels": "1\n-1\n1\n",
    "node_labels": "0\n1\n2\n0\n0\n1\n1\n2\n",
    "node_attributes": "0.5, 1.0\n0.1, 0.2\n0.3, 0.4\n1.0, 1.0\n2.0, 2.0\n0.0, 0.0\n-1.5, 3.0\n4.0, 4.5\n",
    "edge_labels": "0\n0\n1\n1\n0\n0\n2\n2\n0\n0\n1\n1\n",
}


@FUZZ
@given(key=st.sampled_from(sorted(TU)), damage=TEXT_DAMAGE, drop=st.sampled_from([None, "node_labels", "node_attributes", "edge_labels"]))
def test_fuzz_tu(key, damage, drop):
    from threefold.datasets.tu import load_tu

    files = {f"FUZZ_{k}.txt": v.encode() for k, v in TU.items() if k != drop}
    if f"FUZZ_{key}.txt" in files:
        files[f"FUZZ_{key}.txt"] = damage_text(TU[key], damage)
    graphs = outcome(lambda d: load_tu(d, "FUZZ"), files)
    if damage[0] == "none":
        assert graphs is not None and [g.num_nodes for g in graphs] == [3, 2, 3]
        assert [int(g.y) for g in graphs] == [1, 0, 1]
        if drop != "node_attributes":
            assert np.allclose(graphs[2].x[:, :2].numpy(), [[0.0, 0.0], [-1.5, 3.0], [4.0, 4.5]])
    if graphs is not None:
        for g in graphs:
            assert g.x.ndim == 2 and g.x.shape[0] == g.num_nodes and np.isfinite(g.x.numpy()).all()
            assert g.x.numel() <= 10_000, "a damaged label inflated the one-hot features"
            if g.edge_index.numel():
                assert g.edge_index.min() >= 0 and g.edge_index.max() < g.num_nodes


# ------------------------------------------------------------------------------------ IM-NET HDF5
def imnet_file(path: Path, forge: str | None) -> np.ndarray:
    """One shape in the layout of IM-NET's 2_gather_256vox_16_32_64.py, written with h5py directly."""
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(1)
    vox = (rng.random((1, 64, 64, 64, 1)) < 0.1).astype(np.uint8)
    with h5py.File(path, "w") as f:
        if forge == "huge":  # declared (1e6 shapes, 64^3) but no chunk written: 262 GB if read naively
            f.create_dataset("voxels", shape=(10**6, 64, 64, 64, 1), dtype=np.uint8, chunks=(1, 64, 64, 64, 1))
        elif forge == "group":
            f.create_group("voxels")
        else:
            f.create_dataset("voxels", data=vox)
        for r, n in ((16, 4096), (32, 4096), (64, 16384)):
            f.create_dataset(f"points_{r}", data=rng.integers(0, 256, (1, n, 3), dtype=np.uint8))
            f.create_dataset(f"values_{r}", data=rng.integers(0, 2, (1, n, 1), dtype=np.uint8))
    return vox


@FUZZ
@given(damage=BYTE_DAMAGE, forge=st.sampled_from([None, None, "huge", "group"]))
def test_fuzz_imnet_hdf5(damage, forge):
    from threefold.datasets.imnet_hdf5 import read_imnet_hdf5

    with tempfile.TemporaryDirectory() as d:
        vox = imnet_file(Path(d) / "a.hdf5", forge)
        data = (Path(d) / "a.hdf5").read_bytes()
    got = outcome(lambda folder: read_imnet_hdf5(folder / "a.hdf5"), {"a.hdf5": damage_bytes(data, damage)})
    if damage[0] == "none" and forge is None:
        assert got is not None and np.array_equal(got["voxels"], vox)
    if forge is not None and damage[0] != "flip":
        assert got is None
    if got is not None:
        assert got["voxels"].shape[1:] == (64, 64, 64, 1) and got["voxels"].max() <= 1


# --------------------------------------------------------------------------------------- QM9 XYZ
QM9_WATER = (
    "3\n"
    "gdb 3\t786.3 417.2 305.0 1.8 6.3 -0.27 0.07 0.34 19.0 0.021 -76.4 -76.4 -76.4 -76.4 6.0\n"
    "O\t-0.03\t0.38\t0.0\t-0.40\n"
    "H\t0.75\t-0.18\t0.0\t0.20\n"
    "H\t-0.78\t-0.19\t0.0\t0.20\n"
    "1691.1 3793.1 3914.6\n"
    "O\tO\n"
    "InChI=1S/H2O/h1H2\tInChI=1S/H2O/h1H2\n"
)


@FUZZ
@given(damage=TEXT_DAMAGE)
def test_fuzz_qm9_xyz(damage):
    from threefold.datasets.qm9 import read_qm9_xyz

    m = outcome(lambda d: read_qm9_xyz(d / "dsgdb9nsd_000003.xyz"), {"dsgdb9nsd_000003.xyz": damage_text(QM9_WATER, damage)})
    if damage[0] == "none":
        assert m is not None and m["numbers"].tolist() == [8, 1, 1] and m["props"]["U0"] == -76.4
    if m is not None:
        assert m["numbers"].shape[0] == m["positions"].shape[0] > 0 and np.isfinite(m["positions"]).all()
        assert all(np.isfinite(v) for v in m["props"].values()), "a NaN/inf property was accepted"


# --------------------------------------------------------------------------------- PDB and mmCIF
PDB = (
    "HEADER    FUZZ\n"
    "ATOM      1  N   ALA A   1      11.104   6.134  -6.504  1.00  0.00           N\n"
    "ATOM      2  CA  ALA A   1      11.639   6.071  -5.147  1.00  0.00           C\n"
    "ATOM      3  CA AGLY A   2      12.500   7.000  -4.000  0.50  0.00           C\n"
    "ATOM      4  CA BGLY A   2      12.600   7.100  -4.100  0.50  0.00           C\n"
    "ATOM      5  CA  SER B   3      14.000   8.000  -3.000  1.00  0.00           C\n"
    "HETATM    6  CA  HOH B   4      15.000   9.000  -2.000  1.00  0.00           C\n"
    "ENDMDL\n"
    "ATOM      7  CA  LYS A   5      99.000  99.000  99.000  1.00  0.00           C\n"
)
MMCIF = """data_FUZZ
loop_
_atom_site.group_PDB
_atom_site.id
_atom_site.label_atom_id
_atom_site.label_alt_id
_atom_site.label_comp_id
_atom_site.auth_asym_id
_atom_site.auth_seq_id
_atom_site.Cartn_x
_atom_site.Cartn_y
_atom_site.Cartn_z
_atom_site.pdbx_PDB_model_num
ATOM 1 N . ALA A 1 11.104 6.134 -6.504 1
ATOM 2 CA . ALA A 1 11.639 6.071 -5.147 1
ATOM 3 CA A GLY A 2 12.500 7.000 -4.000 1
ATOM 4 CA B GLY A 2 12.600 7.100 -4.100 1
ATOM 5 CA . SER B 3 14.000 8.000 -3.000 1
HETATM 6 CA . HOH B 4 15.000 9.000 -2.000 1
ATOM 7 CA . LYS A 5 99.000 99.000 99.000 2
#
"""
CA_TRUTH = np.array([[11.639, 6.071, -5.147], [12.5, 7.0, -4.0], [14.0, 8.0, -3.0]], np.float32)


def _check_trace(t: dict) -> None:
    n = len(t["residues"])
    assert n > 0 and t["positions"].shape == (n, 3) and len(t["chains"]) == n and t["resseq"].shape == (n,)
    assert np.isfinite(t["positions"]).all(), "a NaN/inf coordinate was accepted"


@FUZZ
@given(damage=TEXT_DAMAGE)
def test_fuzz_pdb(damage):
    from threefold.datasets.proteins import read_pdb_ca

    t = outcome(lambda d: read_pdb_ca(d / "p.pdb"), {"p.pdb": damage_text(PDB, damage)})
    if damage[0] == "none":
        assert t is not None and t["residues"] == ["ALA", "GLY", "SER"] and np.allclose(t["positions"], CA_TRUTH)
    if t is not None:
        _check_trace(t)


@FUZZ
@given(damage=TEXT_DAMAGE)
def test_fuzz_mmcif(damage):
    from threefold.datasets.proteins import read_mmcif_ca

    t = outcome(lambda d: read_mmcif_ca(d / "p.cif"), {"p.cif": damage_text(MMCIF, damage)})
    if damage[0] == "none":
        assert t is not None and t["residues"] == ["ALA", "GLY", "SER"] and np.allclose(t["positions"], CA_TRUTH)
    if t is not None:
        _check_trace(t)


# ------------------------------------------------------------------------------------------ CIF
CIF = """data_NaCl
_cell_length_a 5.64
_cell_length_b 5.64
_cell_length_c 5.64
_cell_angle_alpha 90
_cell_angle_beta 90
_cell_angle_gamma 90
_symmetry_space_group_name_H-M 'P 1'
loop_
_atom_site_label
_atom_site_type_symbol
_atom_site_fract_x
_atom_site_fract_y
_atom_site_fract_z
Na1 Na 0.0 0.0 0.0
Cl1 Cl 0.5 0.5 0.5
"""


@FUZZ
@given(damage=TEXT_DAMAGE)
def test_fuzz_cif(damage):
    pytest.importorskip("ase")
    from threefold.datasets.crystals import read_cif

    c = outcome(lambda d: read_cif(d / "c.cif"), {"c.cif": damage_text(CIF, damage)})
    if damage[0] == "none":
        assert c is not None and c["numbers"].tolist() == [11, 17]
        assert np.allclose(c["positions"][1], [2.82, 2.82, 2.82], atol=1e-4)
    if c is not None:
        assert len(c["numbers"]) > 0 and np.isfinite(c["positions"]).all() and np.isfinite(c["lattice"]).all()


# ------------------------------------------------------------------------------ GEOM-DRUGS pickle
@FUZZ
@given(damage=BYTE_DAMAGE, mol=st.sampled_from(["mol", "none", "int", "str", "missing"]))
def test_fuzz_geom_pickle(damage, mol):
    Chem = pytest.importorskip("rdkit.Chem")
    from rdkit.Chem import AllChem

    from threefold.datasets.geom_drugs import read_geom_pickle

    m = Chem.AddHs(Chem.MolFromSmiles("CO"))
    AllChem.EmbedMolecule(m, randomSeed=0)
    rd = {"mol": m, "none": None, "int": 3, "str": "CO"}.get(mol)
    conf = {"rd_mol": rd, "totalenergy": -1.5} if mol != "missing" else {"totalenergy": -1.5}
    data = damage_bytes(pickle.dumps({"smiles": "CO", "conformers": [conf]}, protocol=4), damage)
    out = outcome(lambda d: read_geom_pickle(d / "m.pickle"), {"m.pickle": data})
    if damage[0] == "none" and mol == "mol":
        assert out is not None and out[0]["numbers"].tolist() == [6, 8, 1, 1, 1, 1]
        assert np.allclose(out[0]["positions"], m.GetConformer().GetPositions(), atol=1e-5)
    if mol != "mol" or damage[0] in ("empty", "truncate"):
        assert out is None


# --------------------------------------------------------------------------- MSD dataset.json
MSD_JSON = """{
  "name": "BRATS", "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
  "training": [
    {"image": "./imagesTr/BRATS_001.nii.gz", "label": "./labelsTr/BRATS_001.nii.gz"},
    {"image": "./imagesTr/BRATS_002.nii.gz", "label": "./labelsTr/BRATS_002.nii.gz"}
  ]
}
"""


def _msd_cases(folder: Path):
    """The Medical Segmentation Decathlon layout (Antonelli et al. 2022): dataset.json lists
    image / label paths relative to the task folder. Only the case list is read here."""
    from threefold.datasets.brats import list_cases

    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir()
        for case in ("BRATS_001", "BRATS_002"):
            (folder / sub / f"{case}.nii.gz").write_bytes(b"")
    return list_cases(folder, "msd")


@FUZZ
@given(damage=TEXT_DAMAGE)
def test_fuzz_msd_dataset_json(damage):
    out = outcome(_msd_cases, {"dataset.json": damage_text(MSD_JSON, damage)})
    if damage[0] == "none":
        assert out is not None and [c.name for c in out] == ["BRATS_001", "BRATS_002"]
    if out is not None:
        assert all(c.images[0].name.endswith(".nii.gz") for c in out)


# ------------------------------------------------------------------------------- meshes (OFF, OBJ)
MESHES = {  # a tetrahedron, outward-facing triangles, in the OFF (Princeton) and Wavefront OBJ layouts
    "m.off": "OFF\n4 4 0\n0 0 0\n1 0 0\n0 1 0\n0 0 1\n3 0 2 1\n3 0 1 3\n3 0 3 2\n3 1 2 3\n",
    "m.obj": "v 0 0 0\nv 1 0 0\nv 0 1 0\nv 0 0 1\nf 1 3 2\nf 1 2 4\nf 1 4 3\nf 2 3 4\n",
}


@FUZZ
@given(name=st.sampled_from(sorted(MESHES)), damage=TEXT_DAMAGE)
def test_fuzz_mesh(name, damage):
    pytest.importorskip("trimesh")
    from threefold.datasets.mesh_prepare import load_mesh

    got = outcome(lambda d: load_mesh(d / name), {name: damage_text(MESHES[name], damage)})
    if damage[0] == "none":
        assert got is not None and got[0].shape == (4, 3) and got[1].shape == (4, 3)
    if got is not None:
        verts, faces = got
        assert np.isfinite(verts).all() and faces.min() >= 0 and faces.max() < len(verts)


# ------------------------------------------------------------- ShapeNet-55, ModelNet40, ScanObjectNN
def _npy_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)  # numpy's own .npy writer (NEP 1 format), not threefold's
    return buf.getvalue()


SHAPENET_CLOUD = (np.arange(24, dtype=np.float32).reshape(8, 3) / 7.0) - 1.0
NPY_FORGERIES = {  # arrays a downloaded .npy could hold instead of (N, 3) float32
    "none": SHAPENET_CLOUD,
    "nan": np.where(np.eye(8, 3, dtype=bool), np.nan, SHAPENET_CLOUD).astype(np.float32),
    "inf": np.full((8, 3), np.inf, np.float32),
    "four_columns": np.zeros((8, 4), np.float32),
    "flat": SHAPENET_CLOUD.ravel(),
    "empty": np.zeros((0, 3), np.float32),
    "complex": SHAPENET_CLOUD.astype(np.complex64),
    "strings": np.array([["a", "b", "c"]]),
    "structured": np.zeros(8, dtype=[("x", "f4"), ("y", "f4"), ("z", "f4")]),
    "float16": SHAPENET_CLOUD.astype(np.float16),
    "big_endian": SHAPENET_CLOUD.astype(">f8"),
}


@FUZZ
@given(forge=st.sampled_from(sorted(NPY_FORGERIES)), damage=BYTE_DAMAGE)
def test_fuzz_shapenet_npy(forge, damage):
    from threefold.datasets.objects import read_shapenet_npy

    data = damage_bytes(_npy_bytes(NPY_FORGERIES[forge]), damage)
    got = outcome(lambda d: read_shapenet_npy(d / "02691156-1a04e3eab45ca15dd86060f189eb133.npy"),
                  {"02691156-1a04e3eab45ca15dd86060f189eb133.npy": data})
    if damage[0] == "none" and forge in ("none", "float16", "big_endian"):
        assert got is not None and np.allclose(got, SHAPENET_CLOUD, atol=1e-3)
    if got is not None:
        assert got.dtype == np.float32 and got.ndim == 2 and got.shape[1] == 3 and got.shape[0] > 0
        assert np.isfinite(got).all()


def test_shapenet_npy_header_declaring_a_huge_array_is_refused():
    from threefold.datasets.objects import read_shapenet_npy

    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000000, 3), }"
    header += " " * (63 - (10 + len(header)) % 64) + "\n"
    raw = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + b"\x00" * 48
    assert outcome(lambda d: read_shapenet_npy(d / "x.npy"), {"x.npy": raw}) is None


MODELNET_ROWS = np.array([[0.1, -0.2, 0.3, 0.0, 0.0, 1.0], [0.4, 0.5, -0.6, 1.0, 0.0, 0.0],
                          [-0.7, 0.8, 0.9, 0.0, 1.0, 0.0]])
MODELNET_TXT = "".join(",".join(f"{v:.6f}" for v in row) + "\n" for row in MODELNET_ROWS)


def _modelnet_text_damage(text: str, damage: tuple[str, float, str]) -> bytes:
    """TEXT_DAMAGE with commas as token separators (the file's delimiter)."""
    kind, where, token = damage
    if kind != "token":
        return damage_text(text, damage)
    cells = text.replace("\n", ",\n,").split(",")
    numeric = [i for i, c in enumerate(cells) if c.strip()]
    cells[numeric[int(where * len(numeric))]] = token
    return ",".join(cells).replace(",\n,", "\n").encode("utf-8").replace("\xff".encode(), b"\xff")


@FUZZ
@given(damage=TEXT_DAMAGE)
def test_fuzz_modelnet_txt(damage):
    from threefold.datasets.objects import read_modelnet_txt

    got = outcome(lambda d: read_modelnet_txt(d / "airplane_0001.txt"),
                  {"airplane_0001.txt": _modelnet_text_damage(MODELNET_TXT, damage)})
    if damage[0] == "none":
        assert got is not None and np.allclose(got, MODELNET_ROWS, atol=1e-6)
    if got is not None:
        assert got.dtype == np.float32 and got.ndim == 2 and got.shape[1] == 6 and got.shape[0] > 0
        assert np.isfinite(got).all()


@FUZZ
@given(damage=TEXT_DAMAGE, which=st.sampled_from(["modelnet40_shape_names.txt", "modelnet40_train.txt"]))
def test_fuzz_modelnet_lists(damage, which):
    from threefold.datasets.objects import ModelNet40

    files = {"modelnet40_shape_names.txt": "airplane\nbathtub\n", "modelnet40_train.txt": "airplane_0001\nbathtub_0001\n",
             "modelnet40_test.txt": "airplane_0002\n"}
    payload = {k: v.encode() for k, v in files.items()}
    payload[which] = damage_text(files[which], damage)

    def read(d: Path):
        for stem in ("airplane_0001", "bathtub_0001", "airplane_0002"):
            (d / stem.rsplit("_", 1)[0]).mkdir(exist_ok=True)
            (d / stem.rsplit("_", 1)[0] / f"{stem}.txt").write_text(MODELNET_TXT * 2)
        ds = ModelNet40(d, "train", num_points=4)
        return [ds[i] for i in range(len(ds))]

    got = outcome(read, payload)
    if damage[0] == "none":
        assert got is not None and [int(s["category"]) for s in got] == [0, 1]
    if got is not None:
        assert all(torch.isfinite(s["coord"]).all() and s["coord"].shape == (4, 3) for s in got)


def _h5_bytes(forge: str) -> bytes:
    """A ScanObjectNN file as h5py writes it (datasets data (M, N, 3) float32, label (M,), mask (M, N))."""
    import h5py

    rng = np.random.default_rng(1)
    data = rng.normal(size=(3, 16, 3)).astype(np.float32)
    label = np.array([0, 14, 7], np.int64)
    mask = (rng.random((3, 16)) < 0.5).astype(np.int64)
    if forge == "nan":
        data[1, 2, 0] = np.nan
    elif forge == "label_15":
        label[1] = 15
    elif forge == "label_negative":
        label[0] = -1
    elif forge == "label_float":
        label = label.astype(np.float32)
    elif forge == "label_short":
        label = label[:2]
    elif forge == "mask_shape":
        mask = mask[:, :8]
    elif forge == "data_2d":
        data = data[:, :, 0]
    with tempfile.TemporaryDirectory() as d:
        with h5py.File(Path(d) / "f.h5", "w") as f:
            if forge == "data_group":
                f.create_group("data")
            elif forge == "huge":
                f.create_dataset("data", shape=(10**7, 2048, 3), dtype="f4")  # declared, never written
            else:
                f["data"] = data
            if forge != "no_label":
                f["label"] = label
            f["mask"] = mask
        return (Path(d) / "f.h5").read_bytes()


H5_FORGERIES = ["none", "nan", "label_15", "label_negative", "label_float", "label_short", "mask_shape", "data_2d",
                "data_group", "no_label", "huge"]


@FUZZ
@given(forge=st.sampled_from(H5_FORGERIES), damage=BYTE_DAMAGE)
def test_fuzz_scanobjectnn_h5(forge, damage):
    from threefold.datasets.objects import ScanObjectNN

    def read(d: Path):
        (d / "main_split").mkdir()
        (d / "f.h5").rename(d / "main_split" / "test_objectdataset_augmentedrot_scale75.h5")
        ds = ScanObjectNN(d, "test", "pb_t50_rs", num_points=16)
        return [ds[i] for i in range(len(ds))]

    got = outcome(read, {"f.h5": damage_bytes(_h5_bytes(forge), damage)})
    if damage[0] == "none" and forge == "none":
        assert got is not None and [int(s["category"]) for s in got] == [0, 14, 7]
    if got is not None:
        assert all(torch.isfinite(s["coord"]).all() and 0 <= int(s["category"]) < 15 for s in got)


# ------------------------------------------------------------------ QM9 SDF + CSV, per-atom CSV
QM9_SDF = """gdb_1
     RDKit          3D

  5  4  0  0  0  0  0  0  0  0999 V2000
   -0.0127    1.0858    0.0080 C   0  0  0  0  0  0  0  0  0  0  0  0
    0.0022   -0.0060    0.0020 H   0  0  0  0  0  0  0  0  0  0  0  0
    1.0117    1.4638    0.0003 H   0  0  0  0  0  0  0  0  0  0  0  0
   -0.5408    1.4475   -0.8766 H   0  0  0  0  0  0  0  0  0  0  0  0
   -0.5238    1.4379    0.9064 H   0  0  0  0  0  0  0  0  0  0  0  0
  1  2  1  0
  1  3  1  0
  1  4  1  0
  1  5  1  0
M  END
$$$$
"""
QM9_SDF_CSV = "mol_id,A,B,C,mu,alpha,homo,lumo,gap,r2,zpve,u0\ngdb_1,157.7118,157.70997,157.70699,0.0,13.21,-0.3877,0.1171,0.5048,35.3641,0.044749,-40.47893\n"


@FUZZ
@given(damage=TEXT_DAMAGE, target=st.sampled_from(["sdf", "csv"]))
def test_fuzz_qm9_sdf_csv(damage, target):
    from threefold.datasets.qm9 import read_qm9_sdf_csv

    files = {"gdb9.sdf": QM9_SDF.encode(), "gdb9.sdf.csv": QM9_SDF_CSV.encode()}
    files["gdb9.sdf" if target == "sdf" else "gdb9.sdf.csv"] = damage_text(QM9_SDF if target == "sdf" else QM9_SDF_CSV, damage)
    got = outcome(lambda d: read_qm9_sdf_csv(d / "gdb9.sdf"), files)
    if damage[0] == "none":
        assert got is not None and got[0]["numbers"].tolist() == [6, 1, 1, 1, 1] and got[0]["props"]["u0"] == -40.47893
    for m in got or []:
        assert m["numbers"].shape[0] == m["positions"].shape[0] > 0 and np.isfinite(m["positions"]).all()
        assert all(np.isfinite(v) for v in m["props"].values()), "a NaN/inf property was accepted"


QM9_STRUCTURES = ("molecule_name,atom_index,atom,x,y,z\n"
                  "dsgdb9nsd_000001,0,C,-0.0127,1.0858,0.008\n"
                  "dsgdb9nsd_000001,1,H,0.0022,-0.006,0.002\n"
                  "dsgdb9nsd_000002,0,N,-0.0404,1.0241,0.0626\n"
                  "dsgdb9nsd_000001,2,H,1.0117,1.4638,0.0003\n")


@FUZZ
@given(damage=TEXT_DAMAGE)
def test_fuzz_qm9_structures_csv(damage):
    from threefold.datasets.qm9 import read_qm9_structures_csv

    text = QM9_STRUCTURES if damage[0] != "token" else QM9_STRUCTURES.replace(",", " ")
    data = damage_text(text, damage)
    if damage[0] == "token":
        data = data.replace(b" ", b",")
    got = outcome(lambda d: read_qm9_structures_csv(d / "structures.csv"), {"structures.csv": data})
    if damage[0] == "none":
        assert got is not None and [m["numbers"].tolist() for m in got] == [[6, 1, 1], [7]]
        assert np.allclose(got[0]["positions"][2], [1.0117, 1.4638, 0.0003])
    for m in got or []:
        assert m["numbers"].shape[0] == m["positions"].shape[0] > 0 and np.isfinite(m["positions"]).all()


# ------------------------------------------------------------------- SemanticKITTI .bin and .label
# The published format (Behley et al., ICCV 2019; the KITTI devkit): a scan is little-endian float32
# records x, y, z, remission (16 bytes a point, no header, so the point count comes from the size); a
# label file is one little-endian uint32 per point, semantic id in the low 16 bits, instance in the high 16.
KITTI_POINTS = np.array([[1.5, -2.0, 0.25, 0.1], [10.0, 3.0, -1.5, 0.9], [-4.0, 0.5, 2.0, 0.0],
                         [0.0, 0.0, -1.7, 1.0], [30.25, -12.5, 0.75, 0.5]], np.float32)
# raw semantic id -> threefold class, from the official learning_map (learning id - 1; 0 -> -1):
# 0 unlabeled, 1 outlier, 10 car, 40 road, 70 vegetation, 99 other-object, 252 moving-car, 81 traffic-sign
KITTI_RAW = np.array([10, 40, 0, 252, 70], np.uint32)
KITTI_CLASSES = np.array([0, 8, -1, 0, 14])
KITTI_MORE = {1: -1, 99: -1, 81: 18, 11: 1, 254: 5}
KITTI_SCAN_FORGERIES = ["none", "nan", "inf", "remission_nan", "float64", "three_columns"]


def _kitti_scan_bytes(forge: str) -> bytes:
    pts = KITTI_POINTS.copy()
    if forge == "nan":
        pts[2, 1] = np.nan
    elif forge == "inf":
        pts[4, 0] = -np.inf
    elif forge == "remission_nan":
        pts[1, 3] = np.nan
    elif forge == "float64":  # a scan saved as float64: 32 bytes a point, a multiple of 16
        return pts.astype("<f8").tobytes()
    elif forge == "three_columns":  # x, y, z only: 60 bytes, not a multiple of 16
        return pts[:, :3].astype("<f4").tobytes()
    return pts.astype("<f4").tobytes()


@FUZZ
@given(forge=st.sampled_from(KITTI_SCAN_FORGERIES), damage=BYTE_DAMAGE)
def test_fuzz_semantickitti_scan(forge, damage):
    from threefold.datasets.semantickitti import read_scan

    data = damage_bytes(_kitti_scan_bytes(forge), damage)
    got = outcome(lambda d: read_scan(d / "000000.bin"), {"000000.bin": data})
    if damage[0] == "none" and forge == "none":
        assert got is not None
        assert np.array_equal(got["coord"], KITTI_POINTS[:, :3]) and np.array_equal(got["remission"], KITTI_POINTS[:, 3])
    if len(data) % 16 or not data or (damage[0] == "none" and forge in ("nan", "inf", "remission_nan")):
        assert got is None, "an empty scan, a partial record or a NaN/inf value was accepted"
    if got is not None:
        n = len(data) // 16  # the file's size decides the count: a whole-record truncation is a smaller scan
        assert got["coord"].dtype == np.float32 and got["coord"].shape == (n, 3) and got["remission"].shape == (n,)
        assert np.isfinite(got["coord"]).all() and np.isfinite(got["remission"]).all()


@FUZZ
@given(damage=BYTE_DAMAGE, instance=st.integers(0, 0xFFFF), extra=st.sampled_from([None, *sorted(KITTI_MORE), 2, 9, 300, 0xFFFF]))
def test_fuzz_semantickitti_labels(damage, instance, extra):
    from threefold.datasets.semantickitti import read_labels

    raw = KITTI_RAW.copy()
    truth = KITTI_CLASSES.copy()
    if extra is not None:
        raw[1] = extra
        truth[1] = KITTI_MORE.get(extra, -99)  # -99: not an official id, must be refused
    words = (raw | np.uint32(instance << 16)).astype("<u4")
    data = damage_bytes(words.tobytes(), damage)
    got = outcome(lambda d: read_labels(d / "000000.label", len(raw)), {"000000.label": data})
    if damage[0] == "none":
        if (truth == -99).any():
            assert got is None, f"raw id {extra} is not in the official learning map but was accepted"
        else:
            assert got is not None and np.array_equal(got, truth), "instance bits leaked into the class"
    if len(data) != 4 * len(raw):
        assert got is None, "a label file whose count differs from the scan's was accepted"
    if got is not None:
        assert got.dtype == np.int64 and got.shape == (len(raw),) and got.min() >= -1 and got.max() <= 18


def test_semantickitti_dataset_label_count_mismatch(tmp_path):
    """A scan and a label file of different lengths, read through the dataset: refused, naming the label file."""
    from threefold.datasets.errors import DataFormatError
    from threefold.datasets.semantickitti import SemanticKITTI

    seq = tmp_path / "sequences" / "08"
    (seq / "velodyne").mkdir(parents=True)
    (seq / "labels").mkdir()
    (seq / "velodyne" / "000000.bin").write_bytes(KITTI_POINTS.tobytes())
    (seq / "labels" / "000000.label").write_bytes(KITTI_RAW[:4].astype("<u4").tobytes())
    with pytest.raises(DataFormatError, match="000000.label"):
        SemanticKITTI(tmp_path, "val")[0]


# ----------------------------------------------------------------- HCP: FSL bvals / bvecs, mean b0
# FSL's formats (FDT user guide): bvals, whitespace-separated b-values in s/mm^2, one per volume; bvecs,
# 3 rows of N whitespace-separated direction components. The DWI is a 4-D NIfTI (i, j, k, volume),
# written here with nibabel directly.
HCP_BVALS = np.array([1000.0, 5.0, 2000.0, 0.0, 995.0, 10.0])  # b0 volumes: 1, 3, 5
HCP_BVALS_TXT = " ".join(f"{b:g}" for b in HCP_BVALS) + "\n"
HCP_BVECS = np.array([[1.0, 0.0, 0.0, 0.0, 0.6, 0.0], [0.0, 0.0, 1.0, 0.0, 0.8, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
HCP_BVECS_TXT = "\n".join(" ".join(f"{x:g}" for x in row) for row in HCP_BVECS) + "\n"
HCP_AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])  # RAS+ already: canonical reorientation is the identity


@FUZZ
@given(damage=TEXT_DAMAGE)
def test_fuzz_hcp_bvals(damage):
    from threefold.datasets.hcp import read_bvals

    got = outcome(lambda d: read_bvals(d / "bvals"), {"bvals": damage_text(HCP_BVALS_TXT, damage)})
    if damage[0] == "none":
        assert got is not None and np.array_equal(got, HCP_BVALS)
    if damage[0] == "token" and damage[2] in ("nan", "inf", "-inf", "-1", "1e309", "x", "\xff", ",", "'", '"', "\x00"):
        assert got is None, f"b-value {damage[2]!r} was accepted"
    if got is not None:
        assert got.dtype == np.float64 and got.ndim == 1 and got.size > 0 and np.isfinite(got).all() and (got >= 0).all()


@FUZZ
@given(damage=TEXT_DAMAGE, transposed=st.booleans())
def test_fuzz_hcp_bvecs(damage, transposed):
    from threefold.datasets.hcp import read_bvecs

    text = HCP_BVECS_TXT if not transposed else "\n".join(" ".join(f"{x:g}" for x in r) for r in HCP_BVECS.T) + "\n"
    data = damage_text(text, damage)
    got = outcome(lambda d: read_bvecs(d / "bvecs", 6), {"bvecs": data})
    if damage[0] == "none":
        assert got is not None and np.array_equal(got, HCP_BVECS.T)
    rows = [line for line in data.split(b"\n") if line.strip()]
    if len(rows) != (6 if transposed else 3) or (damage[0] == "token" and damage[2] in ("nan", "inf", "-inf", "1e309", "x", "")):
        assert got is None, "a bvecs file of the wrong shape or with a non-finite value was accepted"
    if got is not None:
        assert got.shape == (6, 3) and np.isfinite(got).all()


def _dwi_bytes(forge: str, gz: bool) -> tuple[bytes, np.ndarray]:
    """A (6, 5, 4, 6) float32 DWI as nibabel writes it, and the mean of its b0 volumes (1, 3, 5)."""
    nib = pytest.importorskip("nibabel")
    rng = np.random.default_rng(3)
    dwi = rng.random((6, 5, 4, 6)).astype(np.float32) * 100
    affine = HCP_AFFINE.copy()
    if forge == "nan":
        dwi[2, 1, 0, 3] = np.nan
    elif forge == "nan_in_dwi_volume":  # a diffusion-weighted (not b0) volume: never read, never averaged
        dwi[2, 1, 0, 2] = np.nan
    elif forge == "3d":
        dwi = dwi[..., 1]
    elif forge == "5_volumes":
        dwi = dwi[..., :5]
    elif forge == "nan_affine":
        affine[0, 3] = np.nan
    elif forge == "singular_affine":
        affine[2, 2] = 0.0
    elif forge == "complex":
        dwi = dwi.astype(np.complex64)
    elif forge == "int16":
        dwi = np.round(dwi).astype(np.int16)
    img = nib.Nifti1Image(dwi, None)  # qform unset: nibabel cannot decompose a NaN or singular affine into one
    img.set_sform(affine, code=1)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / ("dwi.nii.gz" if gz else "dwi.nii")
        nib.save(img, path)
        data = path.read_bytes()
    mean = dwi[..., [1, 3, 5]].real.astype(np.float64).mean(axis=-1) if dwi.shape[3:] == (6,) else None
    return data, mean


DWI_FORGERIES = ["none", "none", "nan", "nan_in_dwi_volume", "3d", "5_volumes", "nan_affine", "singular_affine",
                 "complex", "int16"]


@FUZZ
@given(forge=st.sampled_from(DWI_FORGERIES), gz=st.booleans(), dwi_damage=BYTE_DAMAGE, bvals_damage=TEXT_DAMAGE)
def test_fuzz_hcp_mean_b0(forge, gz, dwi_damage, bvals_damage):
    from threefold.datasets.hcp import read_mean_b0

    data, mean = _dwi_bytes(forge, gz)
    name = "dwi.nii.gz" if gz else "dwi.nii"
    files = {name: damage_bytes(data, dwi_damage), "bvals": damage_text(HCP_BVALS_TXT, bvals_damage),
             "bvecs": HCP_BVECS_TXT.encode()}
    got = outcome(lambda d: read_mean_b0(d / name, d / "bvals", bvecs_path=d / "bvecs"), files)
    clean = dwi_damage[0] == "none" and bvals_damage[0] == "none"
    if clean and forge in ("none", "nan_in_dwi_volume", "int16"):
        assert got is not None and got["b0_indices"].tolist() == [1, 3, 5]
        assert np.allclose(got["image"][0].numpy(), mean, rtol=1e-6) and np.allclose(got["affine"].numpy(), HCP_AFFINE)
    if clean and forge in ("nan", "3d", "5_volumes", "nan_affine", "singular_affine", "complex"):
        assert got is None, f"a DWI forged as {forge!r} was accepted"
    if dwi_damage[0] in ("empty", "truncate") and not gz and forge != "3d":
        assert got is None, "a truncated DWI was accepted"
    if got is not None:
        img = got["image"]
        assert img.dtype == torch.float32 and img.ndim == 4 and img.shape[0] == 1 and torch.isfinite(img).all()
        assert torch.isfinite(got["affine"]).all() and abs(torch.linalg.det(got["affine"][:3, :3])) > 1e-9
        assert got["b0_indices"].numel() > 0


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("forge", ["3d", "5_volumes", "nan", "nan_affine", "singular_affine", "complex"])
def test_hcp_dwi_forgeries_refused(forge, gz):
    """Every DWI forgery, clean otherwise, in both containers (the fuzz test above samples them)."""
    from threefold.datasets.hcp import read_mean_b0

    name = "dwi.nii.gz" if gz else "dwi.nii"
    files = {name: _dwi_bytes(forge, gz)[0], "bvals": HCP_BVALS_TXT.encode()}
    assert outcome(lambda d: read_mean_b0(d / name, d / "bvals"), files) is None


@pytest.mark.parametrize(("bvals", "bvecs"), [
    ("nan 5 2000 0 995 10", None), ("1000 5 2000 -1 995 10", None), ("1000 5 2000 0 995", None),
    ("1000 5 2000 0 995 10 5", None), ("1000 5 2000 0 995 \xff", None), ("", None), (" \n\n", None),
    ("1000 5 2000 0 995 1e309", None), (None, "1 0 0 0 0.6 0\n0 0 1 0 0.8 0\n"), (None, "1 0\n0 0\n0 1\n"),
    (None, "1 0 0 0 0.6 0\n0 0 1 0 0.8\n0 0 0 0 0 0\n"), (None, ""), (None, "\xff"),
])
def test_hcp_bad_bvals_or_bvecs_for_a_dwi(bvals, bvecs):
    """Each named case through ``read_mean_b0``: NaN / negative / inf b-values, a count other than the
    DWI's 4th dimension (6), non-UTF-8, empty; bvecs of the wrong shape, ragged, empty, non-UTF-8."""
    from threefold.datasets.hcp import read_mean_b0

    data, _ = _dwi_bytes("none", gz=False)
    enc = lambda t: t.encode("utf-8").replace("\xff".encode(), b"\xff")
    files = {"dwi.nii": data, "bvals": enc(bvals if bvals is not None else HCP_BVALS_TXT),
             "bvecs": enc(bvecs if bvecs is not None else HCP_BVECS_TXT)}
    assert outcome(lambda d: read_mean_b0(d / "dwi.nii", d / "bvals", bvecs_path=d / "bvecs"), files) is None


# ------------------------------------------------------------------------------- HCP pairs file
PAIRS_TXT = ("# subject, moving + dwi + bvals, moving + 3-D fixed\n"
             "s0\n"
             "s1/t1.nii.gz s1/dwi.nii.gz s1/bvals\n"
             "s2/t1.nii.gz s2/b0.nii.gz  # a comment\n")
PAIRS_TOKENS = TOKENS + ["..", "../outside/t1.nii.gz", "s1/../../outside/t1.nii.gz", "/etc/passwd", "s1/nope.nii.gz",
                         "s*", "~/t1.nii.gz", "C:\\t1.nii.gz"]


def _pairs(folder: Path) -> list[dict]:
    """The layout a pairs file points into: subject s0 in the HCP layout, s1 / s2 as loose files, and a
    file beside the root (``../outside``) that no line may reach. Files are empty: listing pairs reads none."""
    from threefold.datasets.hcp import HCPRegistration

    root = folder / "root"
    for rel in ("s0/T1w/T1w_acpc_dc_restore_brain.nii.gz", "s0/T1w/Diffusion/data.nii.gz", "s0/T1w/Diffusion/bvals",
                "s1/t1.nii.gz", "s1/dwi.nii.gz", "s1/bvals", "s2/t1.nii.gz", "s2/b0.nii.gz"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")
    (folder / "outside").mkdir()
    (folder / "outside" / "t1.nii.gz").write_bytes(b"")
    (folder / "pairs.txt").rename(root / "pairs.txt")
    pairs = HCPRegistration(root, size=32, split=None, pairs_file="pairs.txt").pairs
    for pair in pairs:  # checked here, while the folder exists
        for key, path in pair.items():
            if key != "subject":
                assert path.is_file() and ".." not in path.parts and "outside" not in path.parts, \
                    f"a pairs-file path left the root: {path}"
    return pairs


@FUZZ
@given(damage=st.one_of(TEXT_DAMAGE, st.tuples(st.sampled_from(["token", "char"]), st.floats(0.0, 1.0, exclude_max=True),
                                                 st.sampled_from(PAIRS_TOKENS))))
def test_fuzz_hcp_pairs_file(damage):
    got = outcome(_pairs, {"pairs.txt": damage_text(PAIRS_TXT, damage)})
    if damage[0] == "none":
        assert got is not None and [p["subject"] for p in got] == ["s0", "0003-t1", "0004-t1"]
        assert got[1]["bvals"].name == "bvals" and got[2]["fixed"].name == "b0.nii.gz"


@pytest.mark.parametrize("line", ["../outside/t1.nii.gz s2/b0.nii.gz", "s2/t1.nii.gz ../outside/t1.nii.gz",
                                  "s1/../../outside/t1.nii.gz s2/b0.nii.gz", "OUTSIDE s2/b0.nii.gz", "..", "../outside",
                                  "s2/t1.nii.gz s2/missing.nii.gz", "s0 s1 s2 s3", "\xff", "s2/t1.nii.gz s2/b0.nii.gz \xff"])
def test_hcp_pairs_file_bad_lines(line):
    """Each line alone is refused with a threefold error: paths leaving the root (``..``, absolute), a
    missing file, too many fields, a non-UTF-8 byte."""
    def read(folder: Path):
        text = line.replace("OUTSIDE", str(folder / "outside" / "t1.nii.gz"))
        (folder / "pairs.txt").write_bytes(text.encode("utf-8").replace("\xff".encode(), b"\xff"))
        return _pairs(folder)

    assert outcome(read, {"pairs.txt": b""}) is None


# ------------------------------------------------------------------------- known bugs, minimal inputs
def _planetoid_bad_csr_in_child() -> None:
    """A csr feature matrix whose column index lies far outside its shape, loaded in a child process
    (the bug corrupts the heap, so it must not run inside the test process)."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import pickle, sys, tempfile
        from pathlib import Path
        import importlib.util
        spec = importlib.util.spec_from_file_location("fz", {str(Path(__file__))!r})
        fz = importlib.util.module_from_spec(spec); spec.loader.exec_module(fz)
        files, _ = fz.planetoid_files()
        m = pickle.loads(files["ind.fuzz.x"])
        m.indices[0] = 10**7
        files["ind.fuzz.x"] = pickle.dumps(m, protocol=4)
        print("refused" if fz.outcome(fz._load_planetoid, files) is None else "accepted")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0 and out.stdout.strip() == "refused", (out.returncode, out.stdout, out.stderr[-2000:])


def _pickle_in_child(data: bytes) -> None:
    """``safe_load_pickle`` of ``data`` in a child process (a damaged numpy dtype state segfaults numpy)."""
    import subprocess
    import sys

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "p.pkl").write_bytes(data)
        code = ("import sys; from threefold.datasets.errors import ThreefoldError\n"
                "from threefold.datasets.safe_pickle import safe_load_pickle\n"
                "try:\n    safe_load_pickle(sys.argv[1])\nexcept ThreefoldError:\n    print('refused')\nelse:\n    print('accepted')")
        out = subprocess.run([sys.executable, "-c", code, str(Path(d) / "p.pkl")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "refused", (out.returncode, out.stdout, out.stderr[-2000:])


def _planetoid_huge_test_id() -> None:
    files, _ = planetoid_files()
    files["ind.fuzz.test.index"] = f"503\n{HUGE}\n".encode()
    assert outcome(_load_planetoid, files) is None


def _imnet_group() -> None:
    from threefold.datasets.imnet_hdf5 import read_imnet_hdf5

    with tempfile.TemporaryDirectory() as d:
        imnet_file(Path(d) / "a.hdf5", "group")
        assert outcome(lambda folder: read_imnet_hdf5(folder / "a.hdf5"), {"a.hdf5": (Path(d) / "a.hdf5").read_bytes()}) is None


def _qm9_nan() -> None:
    from threefold.datasets.qm9 import read_qm9_xyz

    text = QM9_WATER.replace("0.38", "nan", 1)
    assert outcome(lambda d: read_qm9_xyz(d / "m.xyz"), {"m.xyz": text.encode()}) is None


def _mmcif(old: str, new: str) -> Callable[[], None]:
    def check() -> None:
        from threefold.datasets.proteins import read_mmcif_ca

        assert outcome(lambda d: read_mmcif_ca(d / "p.cif"), {"p.cif": MMCIF.replace(old, new, 1).encode()}) is None
    return check


def _geom_not_a_mol() -> None:
    pytest.importorskip("rdkit")
    from threefold.datasets.geom_drugs import read_geom_pickle

    data = pickle.dumps({"smiles": "CO", "conformers": [{"rd_mol": 3}]}, protocol=4)
    assert outcome(lambda d: read_geom_pickle(d / "m.pickle"), {"m.pickle": data}) is None


def _text_reader(kind: str, text: str) -> Callable[[], None]:
    def check() -> None:
        from threefold.datasets.proteins import read_pdb_ca
        from threefold.datasets.qm9 import read_qm9_xyz

        readers = {"pdb": read_pdb_ca, "qm9": read_qm9_xyz}
        if kind == "cif":
            pytest.importorskip("ase")
            from threefold.datasets.crystals import read_cif

            readers["cif"] = read_cif
        data = text.encode("utf-8").replace("\xff".encode(), b"\xff")  # "\xff" -> one raw, non-UTF-8 byte
        assert outcome(lambda d: readers[kind](d / "f.txt"), {"f.txt": data}) is None
    return check


def _tu_empty_indicator() -> None:
    from threefold.datasets.tu import load_tu

    files = {"G_A.txt": b"1, 2\n", "G_graph_indicator.txt": b"", "G_graph_labels.txt": b"1\n"}
    assert outcome(lambda d: load_tu(d, "G"), files) is None


def _msd(text: str) -> Callable[[], None]:
    def check() -> None:
        with tempfile.TemporaryDirectory() as outside:
            (Path(outside) / "secret.nii.gz").write_bytes(b"")
            body = text.replace("OUTSIDE", outside).replace("UP", "../" + Path(outside).name)
            assert outcome(_msd_cases, {"dataset.json": body.encode()}) is None
    return check


def _mesh(name: str, old: str, new: str) -> Callable[[], None]:
    def check() -> None:
        pytest.importorskip("trimesh")
        from threefold.datasets.mesh_prepare import load_mesh

        assert outcome(lambda d: load_mesh(d / name), {name: MESHES[name].replace(old, new, 1).encode()}) is None
    return check


def _hcp_dwi(forge: str) -> Callable[[], None]:
    def check() -> None:
        from threefold.datasets.hcp import read_mean_b0

        data, _ = _dwi_bytes(forge, gz=False)
        files = {"dwi.nii": data, "bvals": HCP_BVALS_TXT.encode()}
        assert outcome(lambda d: read_mean_b0(d / "dwi.nii", d / "bvals"), files) is None
    return check


def _hcp_bvecs_nan() -> None:
    from threefold.datasets.hcp import read_bvecs

    assert outcome(lambda d: read_bvecs(d / "bvecs", 6), {"bvecs": HCP_BVECS_TXT.replace("1", "nan", 1).encode()}) is None


KNOWN_BUGS = {
    "planetoid-csr-indices": (_planetoid_bad_csr_in_child, "csr with an out-of-range column index: heap "
                              "corruption in scipy toarray() (validate with check_format(full_check=True) first)"),
    # the BUILD state of a pickled int32 dtype with a subarray entry 20046 (one byte N -> M): numpy's
    # dtype.__setstate__ segfaults on it
    "pickle-dtype-state": (lambda: _pickle_in_child(pickle.dumps(np.eye(3, dtype=np.int32), protocol=4)
                                                    .replace(b"\x8c\x01<\x94NNN", b"\x8c\x01<\x94MNN", 1)),
                           "numpy dtype.__setstate__ segfaults on a damaged state"),
    "pickle-append-to-tuple": (lambda: _pickle_in_child(b"\x80\x02)K\x01a."), "AttributeError escapes"),
    "planetoid-huge-test-id": (_planetoid_huge_test_id, "test.index id 10**12: MemoryError escapes"),
    "imnet-group": (_imnet_group, "'voxels' is an HDF5 group: TypeError escapes"),
    "qm9-nan": (_qm9_nan, "NaN coordinate accepted"),
    "mmcif-nan": (_mmcif("6.071", "nan"), "NaN coordinate accepted"),
    "mmcif-not-a-number": (_mmcif("6.071", "6.0x1"), "ValueError from float() escapes"),
    "mmcif-quote": (_mmcif("ATOM 2 CA", "ATOM 2 'CA"), "ValueError from shlex (unbalanced quote) escapes"),
    "geom-not-a-mol": (_geom_not_a_mol, "rd_mol = 3: AttributeError escapes"),
    "pdb-nan": (_text_reader("pdb", PDB.replace("   6.071", "     nan")), "NaN coordinate accepted"),
    "pdb-not-utf8": (_text_reader("pdb", PDB + "\xff\n"), "UnicodeDecodeError escapes"),
    "qm9-not-utf8": (_text_reader("qm9", QM9_WATER + "\xff"), "UnicodeDecodeError escapes"),
    "qm9-nan-property": (_text_reader("qm9", QM9_WATER.replace("786.3", "nan")), "NaN property accepted"),
    "qm9-bad-index": (_text_reader("qm9", QM9_WATER.replace("gdb 3", "gdb x")), "ValueError from int() escapes"),
    "cif-not-utf8": (_text_reader("cif", CIF + "\xff"), "UnicodeDecodeError escapes"),
    "tu-empty-indicator": (_tu_empty_indicator, "empty graph_indicator: ValueError from min() escapes"),
    "msd-not-json": (_msd("{"), "JSONDecodeError escapes"),
    "msd-entry-without-image": (_msd('{"training": [{"label": "labelsTr/BRATS_001.nii.gz"}]}'), "KeyError escapes"),
    "msd-entry-not-a-dict": (_msd('{"training": ["x"]}'), "TypeError escapes"),
    "msd-top-level-list": (_msd("[]"), "AttributeError escapes"),
    "msd-absolute-path": (_msd('{"training": [{"image": "OUTSIDE/secret.nii.gz", "label": "OUTSIDE/secret.nii.gz"}]}'),
                          "an absolute image path outside the task folder is followed"),
    "msd-dotdot-path": (_msd('{"training": [{"image": "UP/secret.nii.gz", "label": "UP/secret.nii.gz"}]}'),
                        "a ../ image path outside the task folder is followed"),
    "mesh-off-nan-vertex": (_mesh("m.off", "1 0 0\n", "nan 0 0\n"),
                            "a NaN vertex is dropped with its 3 faces: silent partial mesh (1 of 4 triangles)"),
    "mesh-off-bad-index": (_mesh("m.off", "3 0 2 1", "3 0 2 99"), "ValueError from trimesh escapes"),
    "mesh-off-huge-count": (_mesh("m.off", "4 4 0", f"{HUGE} 4 0"), "ValueError from trimesh escapes"),
    "mesh-obj-bad-index": (_mesh("m.obj", "f 1 3 2", "f 1 3 99"), "IndexError from trimesh escapes"),
    "hcp-dwi-nan-affine": (_hcp_dwi("nan_affine"), "a NaN sform accepted: a mean b0 with a NaN affine"),
    "hcp-dwi-singular-affine": (_hcp_dwi("singular_affine"), "HeaderDataError from as_closest_canonical escapes"),
    "hcp-dwi-complex": (_hcp_dwi("complex"), "complex voxels accepted, the imaginary part silently dropped"),
    "hcp-bvecs-nan": (_hcp_bvecs_nan, "NaN gradient direction accepted"),
}


@pytest.mark.parametrize("bug", sorted(KNOWN_BUGS))
def test_known_reader_bugs(bug):
    """Minimal inputs the fuzz tests above found mishandled (all fixed since); each must be refused with a threefold error."""
    KNOWN_BUGS[bug][0]()
