"""Planetoid raw reader: real Cora / CiteSeer against PyG's own raw processing, and bad inputs."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from threefold.datasets.errors import ConfigError, DataFormatError, MissingFileError, UnsafePickleError
from threefold.datasets.planetoid import load_planetoid
from threefold.datasets.registry import get_dataset

# the plain-pickle references below import the deprecated scipy.sparse.csr alias
pytestmark = pytest.mark.filterwarnings("ignore:Please import `csr_matrix`:DeprecationWarning")


def _raw(test_data):
    return test_data / "planetoid" / "raw"


def _check_undirected_simple(edge_index: torch.Tensor, num_nodes: int) -> None:
    e = edge_index.numpy()
    assert not (e[0] == e[1]).any(), "self loop"
    pairs = set(zip(e[0].tolist(), e[1].tolist()))
    assert len(pairs) == e.shape[1], "duplicate edge"
    assert all((b, a) in pairs for a, b in pairs), "missing reverse edge"
    assert e.min() >= 0 and e.max() < num_nodes


@pytest.mark.parametrize(
    "name,nodes,feats,classes,edges,ntrain",
    [("cora", 2708, 1433, 7, 10556, 140), ("citeseer", 3327, 3703, 6, 9104, 120)],
)
def test_counts_and_pyg_reference(test_data, name, nodes, feats, classes, edges, ntrain):
    from torch_geometric.io.planetoid import read_planetoid_data
    from torch_geometric.utils import to_undirected

    data = load_planetoid(test_data / "planetoid", name)  # parent of raw/
    assert data.num_nodes == nodes and data.x.shape == (nodes, feats) and data.x.dtype == torch.float32
    assert int(data.y.max()) + 1 == classes and data.y.dtype == torch.int64
    assert data.edge_index.shape == (2, edges)
    assert (int(data.train_mask.sum()), int(data.val_mask.sum()), int(data.test_mask.sum())) == (ntrain, 500, 1000)
    assert not (data.train_mask & data.val_mask).any() and not (data.val_mask & data.test_mask).any()
    # public split: 20 labelled nodes per class
    assert torch.bincount(data.y[data.train_mask], minlength=classes).tolist() == [20] * classes
    _check_undirected_simple(data.edge_index, nodes)
    # bag-of-words counts, not row-normalised
    assert set(torch.unique(data.x).tolist()) == {0.0, 1.0}
    assert data.x.sum(1).max() > 1

    ref = read_planetoid_data(str(_raw(test_data)), name)  # PyG's own processing of the same files
    assert torch.equal(data.x, ref.x) and torch.equal(data.y, ref.y)
    for mask in ("train_mask", "val_mask", "test_mask"):
        assert torch.equal(data[mask], ref[mask])
    assert torch.equal(data.edge_index, to_undirected(ref.edge_index, num_nodes=nodes))


def test_citeseer_isolated_test_gap_is_zero_rows(test_data):
    data = load_planetoid(_raw(test_data), "citeseer")  # the folder itself
    test_ids = np.loadtxt(_raw(test_data) / "ind.citeseer.test.index", dtype=np.int64)
    gap = sorted(set(range(2312, 3327)) - set(test_ids.tolist()))
    assert len(gap) == 15
    assert data.x[gap].abs().sum() == 0 and (data.y[gap] == 0).all()
    any_mask = data.train_mask | data.val_mask | data.test_mask
    assert not any_mask[gap].any()


def test_tx_rows_go_to_test_index_order(test_data):
    raw = _raw(test_data)
    with (raw / "ind.cora.tx").open("rb") as f:
        tx = pickle.load(f, encoding="latin1").toarray()  # trusted test data
    test_ids = np.loadtxt(raw / "ind.cora.test.index", dtype=np.int64)
    data = load_planetoid(raw, "cora")
    np.testing.assert_array_equal(data.x.numpy()[test_ids[:5]], tx[:5])


def test_pubmed_missing_allx_is_named(test_data):
    with pytest.raises(MissingFileError) as err:
        load_planetoid(test_data / "planetoid", "pubmed")
    assert "ind.pubmed.allx" in str(err.value)
    assert "ind.pubmed.ally" not in str(err.value)


def test_registry_and_full_split(test_data):
    entry = get_dataset("planetoid")
    assert entry.modality == "graph"
    public = entry.cls(test_data / "planetoid", split="public", name="Cora")
    full = entry.cls(test_data / "planetoid", split="full", name="cora")
    assert len(public) == 1 and int(public[0].train_mask.sum()) == 140
    assert int(full[0].train_mask.sum()) == 2708 - 1500
    with pytest.raises(ConfigError):
        entry.cls(test_data / "planetoid", split="random", name="cora")
    with pytest.raises(ConfigError):
        load_planetoid(test_data / "planetoid", "nell")


def _write_tiny(folder, name="toy", ntrain=2, nval=500, ntest=3, feats=4, classes=2):
    """A minimal Planetoid set written from the format description (Python-2 style protocol 2)."""
    rng = np.random.default_rng(0)
    nall = ntrain + nval
    n = nall + ntest
    allx = sp.csr_matrix(rng.integers(0, 2, (nall, feats)).astype(np.float32))
    ally = np.eye(classes, dtype=np.int32)[rng.integers(0, classes, nall)]
    tx = sp.csr_matrix(rng.integers(0, 2, (ntest, feats)).astype(np.float32))
    ty = np.eye(classes, dtype=np.int32)[rng.integers(0, classes, ntest)]
    graph = {i: [(i + 1) % n] for i in range(n)}
    items = {"x": allx[:ntrain], "y": ally[:ntrain], "allx": allx, "ally": ally, "tx": tx, "ty": ty, "graph": graph}
    for key, obj in items.items():
        (folder / f"ind.{name}.{key}").write_bytes(pickle.dumps(obj, protocol=4))
    test_ids = np.arange(nall, n)[::-1]
    (folder / f"ind.{name}.test.index").write_text("\n".join(map(str, test_ids)) + "\n")
    return items, test_ids


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    monkeypatch.setattr("threefold.datasets.planetoid.PLANETOID_NAMES", ("toy",))
    items, test_ids = _write_tiny(tmp_path)
    return tmp_path, items, test_ids


def test_tiny_written_from_spec(tiny):
    folder, items, test_ids = tiny
    data = load_planetoid(folder, "toy")
    n = data.num_nodes
    assert n == 505
    np.testing.assert_array_equal(data.x.numpy()[test_ids], items["tx"].toarray())
    np.testing.assert_array_equal(data.y.numpy()[test_ids], items["ty"].argmax(1))
    np.testing.assert_array_equal(data.x.numpy()[:502], items["allx"].toarray())
    # ring graph: each node has exactly 2 neighbours after symmetrising
    assert torch.equal(torch.bincount(data.edge_index[0], minlength=n), torch.full((n,), 2))


def test_bad_width_names_file(tiny):
    folder, items, _ = tiny
    (folder / "ind.toy.tx").write_bytes(pickle.dumps(sp.csr_matrix(np.zeros((3, 5), np.float32)), protocol=4))
    with pytest.raises(DataFormatError, match=r"ind\.toy\.tx.*5 feature columns"):
        load_planetoid(folder, "toy")


def test_bad_test_index_count(tiny):
    folder, *_ = tiny
    (folder / "ind.toy.test.index").write_text("502\n503\n")
    with pytest.raises(DataFormatError, match=r"ind\.toy\.test\.index"):
        load_planetoid(folder, "toy")


def test_graph_out_of_range(tiny):
    folder, *_ = tiny
    (folder / "ind.toy.graph").write_bytes(pickle.dumps({0: [9999]}, protocol=4))
    with pytest.raises(DataFormatError, match=r"ind\.toy\.graph.*\[0, 505\)"):
        load_planetoid(folder, "toy")


def test_tampered_graph_refused(tiny, tmp_path):
    folder, *_ = tiny
    marker = tmp_path / "ran"
    (folder / "ind.toy.graph").write_bytes(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    with pytest.raises(UnsafePickleError, match=r"ind\.toy\.graph"):
        load_planetoid(folder, "toy")
    assert not marker.exists()


def test_all_missing_files_listed(tiny):
    folder, *_ = tiny
    (folder / "ind.toy.ty").unlink()
    (folder / "ind.toy.graph").unlink()
    with pytest.raises(MissingFileError) as err:
        load_planetoid(folder, "toy")
    assert "ind.toy.ty" in str(err.value) and "ind.toy.graph" in str(err.value)
    shutil.rmtree(folder)
    with pytest.raises(MissingFileError):
        load_planetoid(folder, "toy")


def test_forged_test_id_and_csr_refused(tiny):
    folder, items, _ = tiny
    (folder / "ind.toy.test.index").write_text("502\n503\n5000000\n")
    with pytest.raises(DataFormatError, match=r"test id 5000000 exceeds the 505 nodes"):
        load_planetoid(folder, "toy")
    _write_tiny(folder)
    forged = sp.csr_matrix(np.eye(2, 4, dtype=np.float32))
    forged._shape = (2, 400_000_000)  # a tiny matrix that claims 400 M columns
    (folder / "ind.toy.x").write_bytes(pickle.dumps(forged, protocol=4))
    with pytest.raises(DataFormatError, match=r"ind\.toy\.x"):
        load_planetoid(folder, "toy")
    bad = sp.csr_matrix(np.eye(2, 4, dtype=np.float32))
    bad.indices[0] = 99  # column index outside the shape: toarray() would write out of bounds
    (folder / "ind.toy.x").write_bytes(pickle.dumps(bad, protocol=4))
    with pytest.raises(DataFormatError, match=r"ind\.toy\.x"):
        load_planetoid(folder, "toy")
