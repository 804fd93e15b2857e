"""TU raw reader: real MUTAG / PROTEINS / IMDB-BINARY against PyG's read_tu_data, fixtures from the spec."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from threefold.datasets.errors import ConfigError, DataFormatError, MissingFileError
from threefold.datasets.registry import get_dataset
from threefold.datasets.tu import load_tu


def _sorted_edges(ei: torch.Tensor) -> np.ndarray:
    e = ei.numpy()
    return e[:, np.lexsort((e[1], e[0]))]


@pytest.mark.parametrize("name,graphs,nodes,edges,feat", [("MUTAG", 188, 3371, 7442, 7), ("PROTEINS", 1113, 43471, 162088, 4)])
def test_against_pyg_reader(test_data, name, graphs, nodes, edges, feat):
    from torch_geometric.io import read_tu_data

    ds = load_tu(test_data / "tu", name)
    assert len(ds) == graphs
    assert sum(g.num_nodes for g in ds) == nodes and sum(g.edge_index.shape[1] for g in ds) == edges
    assert ds[0].x.shape[1] == feat and ds[0].x.dtype == torch.float32

    ref, slices, _ = read_tu_data(str(test_data / "tu" / name), name)  # PyG's own reading of the same files
    assert torch.equal(torch.cat([g.x for g in ds]), ref.x)
    assert torch.equal(torch.cat([g.y for g in ds]), ref.y)
    for i in (0, 1, graphs // 2, graphs - 1):
        lo, hi = int(slices["edge_index"][i]), int(slices["edge_index"][i + 1])
        np.testing.assert_array_equal(_sorted_edges(ds[i].edge_index), _sorted_edges(ref.edge_index[:, lo:hi]))


def test_mutag_hand_facts(test_data):
    ds = load_tu(test_data / "tu", "MUTAG")
    raw = np.loadtxt(test_data / "tu" / "MUTAG" / "MUTAG_graph_labels.txt", dtype=int)
    np.testing.assert_array_equal(torch.cat([g.y for g in ds]).numpy(), (raw == 1).astype(int))  # {-1,1} -> {0,1}
    assert ds[0].num_nodes == 17  # first graph: 17 lines of graph id 1
    assert all(g.x.sum(1).eq(1).all() for g in ds[:10])  # one-hot atom types
    assert ds[0].edge_label.shape[0] == ds[0].edge_index.shape[1]


def test_imdb_degree_features(test_data):
    ds = load_tu(test_data / "tu", "IMDB-BINARY")
    g = ds[3]
    assert g.x_source == "one_hot(degree)"
    deg = torch.bincount(g.edge_index[0], minlength=g.num_nodes)
    assert torch.equal(g.x.argmax(1), deg)


def test_registry(test_data):
    ds = get_dataset("tu").cls(test_data / "tu", split="all", name="PTC_MR")
    assert len(ds) == 344 and ds.num_classes == 2 and ds.num_features == 18
    with pytest.raises(ConfigError):
        get_dataset("tu").cls(test_data / "tu", split="train", name="PTC_MR")


def _write(folder, name="TOY", a="1, 2\n2, 1\n3, 4\n4, 3\n4, 5\n5, 4\n", ind="1\n1\n2\n2\n2\n", gl="3\n7\n", nl="0\n1\n1\n2\n0\n"):
    folder.mkdir(exist_ok=True)
    (folder / f"{name}_A.txt").write_text(a)
    (folder / f"{name}_graph_indicator.txt").write_text(ind)
    (folder / f"{name}_graph_labels.txt").write_text(gl)
    if nl is not None:
        (folder / f"{name}_node_labels.txt").write_text(nl)


def test_spec_fixture(tmp_path):
    _write(tmp_path / "TOY")
    ds = load_tu(tmp_path, "TOY")
    assert [g.num_nodes for g in ds] == [2, 3]
    assert [int(g.y) for g in ds] == [0, 1]
    np.testing.assert_array_equal(_sorted_edges(ds[1].edge_index), [[0, 1, 1, 2], [1, 0, 2, 1]])
    np.testing.assert_array_equal(ds[1].x.numpy(), np.eye(3)[[1, 2, 0]])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"a": "1, 2\n2, 3\n"}, "two different graphs"),
        ({"a": "1, 9\n"}, r"1\.\.5"),
        ({"ind": "1\n2\n1\n2\n2\n"}, "non-decreasing"),
        ({"gl": "3\n"}, "graph ids must span"),
        ({"nl": "0\n1\n"}, "node_labels.txt: 2 rows, expected 5"),
        ({"a": "1; 2\n"}, "comma-separated"),
    ],
)
def test_bad_inputs(tmp_path, kwargs, match):
    _write(tmp_path / "TOY", **kwargs)
    with pytest.raises(DataFormatError, match=match):
        load_tu(tmp_path, "TOY")


def test_missing_files(tmp_path):
    with pytest.raises(MissingFileError, match="TOY_A.txt"):
        load_tu(tmp_path, "TOY")
    _write(tmp_path / "TOY")
    (tmp_path / "TOY" / "TOY_graph_labels.txt").unlink()
    with pytest.raises(MissingFileError, match="TOY_graph_labels.txt"):
        load_tu(tmp_path, "TOY")


def test_forged_sizes_refused(tmp_path):
    _write(tmp_path / "TOY", nl="0\n1\n1\n2\n8000\n")  # one id of 8000: a 5 × 8001 one-hot is not a label set
    with pytest.raises(DataFormatError, match="node label ids reach 8000"):
        load_tu(tmp_path, "TOY")
    _write(tmp_path / "TOY", ind="", nl="0\n1\n1\n2\n0\n")
    with pytest.raises(DataFormatError, match="graph_indicator"):
        load_tu(tmp_path, "TOY")
