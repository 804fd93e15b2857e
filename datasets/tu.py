"""TU Dortmund graph-classification datasets from their raw text format (no download).

Morris et al., "TUDataset: A collection of benchmark datasets for learning with graphs", ICML-W 2020.
Files of dataset ``NAME`` in ``root`` (or ``root/NAME``, ``root/NAME/raw``):

- ``NAME_A.txt``: one directed edge per line, ``row, col``, 1-based global node ids (stored symmetrically);
- ``NAME_graph_indicator.txt``: the 1-based graph id of each node, one per line, non-decreasing;
- ``NAME_graph_labels.txt``: one integer class per graph;
- optional ``NAME_node_labels.txt`` (one integer per node), ``NAME_node_attributes.txt`` (comma
  separated floats per node), ``NAME_edge_labels.txt`` (one integer per line of ``_A.txt``).

Node features follow PyG's ``read_tu_data``: ``[node_attributes, one_hot(node_labels - min)]``.
Datasets without either (IMDB-BINARY) get the one-hot node degree (PyG's ``OneHotDegree`` with
``max_degree`` = the largest degree in the file), and the returned graphs say so in ``x_source``.
Graph labels ``{-1, 1}`` or ``{1, 2}`` map to ``0..C-1`` in sorted order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch_geometric.data import Data

from threefold.datasets.errors import ConfigError, DataFormatError, MissingFileError
from threefold.datasets.registry import register_dataset


def tu_raw_dir(root: str | Path, name: str) -> Path:
    """The folder that holds ``NAME_A.txt``: ``root``, ``root/NAME`` or ``root/NAME/raw``."""
    root = Path(root)
    for folder in (root, root / name, root / name / "raw", root / "raw"):
        if (folder / f"{name}_A.txt").is_file():
            return folder
    raise MissingFileError(f"{root}: no {name}_A.txt in it, in {name}/ or in {name}/raw/ (TU raw layout expected)")


def _read_ints(path: Path, columns: int | None = None) -> np.ndarray:
    try:
        arr = np.loadtxt(path, dtype=np.int64, delimiter=",", ndmin=2)
    except ValueError as exc:
        raise DataFormatError(f"{path}: expected comma-separated integers ({exc})") from exc
    if columns is not None and arr.shape[1] != columns:
        raise DataFormatError(f"{path}: expected {columns} column(s) per line, got {arr.shape[1]}")
    return arr


def _read_floats(path: Path) -> np.ndarray:
    try:
        arr = np.loadtxt(path, dtype=np.float32, delimiter=",", ndmin=2)
    except ValueError as exc:
        raise DataFormatError(f"{path}: expected comma-separated floats ({exc})") from exc
    if not np.isfinite(arr).all():
        raise DataFormatError(f"{path}: contains NaN or infinite attributes")
    return arr


MAX_ONE_HOT_ELEMENTS: int = 2**28  # 1 GiB of float32


def _one_hot(values: np.ndarray, path: Path, what: str) -> np.ndarray:
    """One-hot ``(n, max+1) float32`` of non-negative ints, refused when the ids are so sparse or
    large that the matrix is a forged size rather than a label set."""
    width = int(values.max()) + 1 if values.size else 0
    distinct = int(np.unique(values).size)
    if width > 2 * distinct + 64 or values.size * width > MAX_ONE_HOT_ELEMENTS:
        raise DataFormatError(
            f"{path}: {what} ids reach {width - 1} with only {distinct} distinct values; expected consecutive "
            f"small integers (a one-hot of {values.size} × {width} would be built)"
        )
    out = np.zeros((values.size, width), dtype=np.float32)
    out[np.arange(values.size), values] = 1.0
    return out


def load_tu(root: str | Path, name: str) -> list[Data]:
    """Read TU dataset ``name`` into a list of graphs.

    Each graph: ``x (n, F) float32``, ``edge_index (2, e) int64`` local 0-based ids, ``y (1,) int64``,
    ``edge_label (e,) int64`` when ``NAME_edge_labels.txt`` exists, ``x_source`` (str).
    Raises :class:`MissingFileError` naming an absent required file, :class:`DataFormatError` on
    inconsistent lengths, out-of-range ids or edges that cross graphs.
    """
    folder = tu_raw_dir(root, name)
    path = {k: folder / f"{name}_{k}.txt" for k in ("A", "graph_indicator", "graph_labels", "node_labels", "node_attributes", "edge_labels")}
    for key in ("A", "graph_indicator", "graph_labels"):
        if not path[key].is_file():
            raise MissingFileError(f"TU {name}: required file {path[key]} not found")

    edges = _read_ints(path["A"], 2) - 1
    indicator = _read_ints(path["graph_indicator"], 1)[:, 0] - 1
    graph_labels = _read_ints(path["graph_labels"], 1)[:, 0]
    num_nodes, num_graphs = indicator.shape[0], graph_labels.shape[0]
    if num_nodes == 0 or num_graphs == 0:
        raise DataFormatError(f"{path['graph_indicator']}: {num_nodes} nodes and {num_graphs} graph labels; expected at least one of each")
    if indicator.min() != 0 or indicator.max() != num_graphs - 1:
        raise DataFormatError(
            f"{path['graph_indicator']}: graph ids must span 1..{num_graphs} (lines of {path['graph_labels'].name}), "
            f"found {indicator.min() + 1}..{indicator.max() + 1}"
        )
    if (np.diff(indicator) < 0).any():
        raise DataFormatError(f"{path['graph_indicator']}: graph ids must be non-decreasing (nodes grouped by graph)")
    if edges.size and (edges.min() < 0 or edges.max() >= num_nodes):
        raise DataFormatError(f"{path['A']}: node ids must lie in 1..{num_nodes}, found {edges.min() + 1}..{edges.max() + 1}")
    if (indicator[edges[:, 0]] != indicator[edges[:, 1]]).any():
        line = int(np.flatnonzero(indicator[edges[:, 0]] != indicator[edges[:, 1]])[0]) + 1
        raise DataFormatError(f"{path['A']}: line {line} joins nodes of two different graphs")

    features, source = [], []
    if path["node_attributes"].is_file():
        attrs = _read_floats(path["node_attributes"])
        if attrs.shape[0] != num_nodes:
            raise DataFormatError(f"{path['node_attributes']}: {attrs.shape[0]} rows, expected {num_nodes} (one per node)")
        features.append(attrs)
        source.append("node_attributes")
    if path["node_labels"].is_file():
        node_labels = _read_ints(path["node_labels"])
        if node_labels.shape[0] != num_nodes:
            raise DataFormatError(f"{path['node_labels']}: {node_labels.shape[0]} rows, expected {num_nodes} (one per node)")
        node_labels = node_labels - node_labels.min(axis=0)
        for col in node_labels.T:
            features.append(_one_hot(col, path["node_labels"], "node label"))
        source.append("one_hot(node_labels)")
    if not features:
        degree = np.bincount(edges[:, 0], minlength=num_nodes)
        width = int(degree.max()) + 1
        if num_nodes * width > MAX_ONE_HOT_ELEMENTS:
            raise DataFormatError(f"{path['A']}: one-hot degree features would be {num_nodes} × {width}; too large")
        one_hot = np.zeros((num_nodes, width), np.float32)  # not np.eye(width): duplicate edges make width >> num_nodes
        one_hot[np.arange(num_nodes), degree] = 1.0
        features.append(one_hot)
        source.append("one_hot(degree)")
    x = np.concatenate(features, axis=1)

    edge_label = None
    if path["edge_labels"].is_file():
        edge_label = _read_ints(path["edge_labels"])[:, 0]
        if edge_label.shape[0] != edges.shape[0]:
            raise DataFormatError(f"{path['edge_labels']}: {edge_label.shape[0]} rows, expected {edges.shape[0]} (one per line of {path['A'].name})")

    _, y = np.unique(graph_labels, return_inverse=True)
    node_start = np.searchsorted(indicator, np.arange(num_graphs + 1))
    order = np.argsort(indicator[edges[:, 0]], kind="stable")
    edges = edges[order]
    if edge_label is not None:
        edge_label = edge_label[order]
    edge_start = np.searchsorted(indicator[edges[:, 0]], np.arange(num_graphs + 1))
    x_source = " + ".join(source)

    graphs = []
    for g in range(num_graphs):  # one Data per graph; the work inside is vectorised
        lo, hi = edge_start[g], edge_start[g + 1]
        data = Data(
            x=torch.from_numpy(x[node_start[g] : node_start[g + 1]]),
            edge_index=torch.from_numpy((edges[lo:hi] - node_start[g]).T.copy()),
            y=torch.tensor([y[g]], dtype=torch.int64),
            num_nodes=int(node_start[g + 1] - node_start[g]),
        )
        if edge_label is not None:
            data.edge_label = torch.from_numpy(edge_label[lo:hi].copy())
        data.x_source = x_source
        graphs.append(data)
    return graphs


@register_dataset("tu", "TU Dortmund graph-classification datasets (raw NAME_*.txt files)", modality="graph")
class TUDataset(torch.utils.data.Dataset):
    """List-of-graphs dataset over :func:`load_tu`; ``split`` is ``"all"`` (splits come from
    :mod:`threefold.datasets.graph_splits`)."""

    def __init__(self, root: str | Path, split: str = "all", name: str = "MUTAG") -> None:
        if split != "all":
            raise ConfigError(f"tu split {split!r} is not supported; use split='all' and datasets.graph_splits")
        self.name = name
        self.graphs = load_tu(root, name)

    @property
    def num_classes(self) -> int:
        return int(max(int(g.y) for g in self.graphs)) + 1

    @property
    def num_features(self) -> int:
        return int(self.graphs[0].x.shape[1])

    def __len__(self) -> int:
        return len(self.graphs)

    def __getitem__(self, index: int) -> Data:
        return self.graphs[index]
