"""Planetoid citation graphs (Cora, CiteSeer, PubMed) from the original raw files.

Yang, Cohen and Salakhutdinov, "Revisiting Semi-Supervised Learning with Graph Embeddings", ICML 2016
(files ``ind.<name>.{x,y,tx,ty,allx,ally,graph,test.index}`` of kimiyoung/planetoid), with the public
split used by Kipf and Welling (ICLR 2017): train = the first ``len(y)`` nodes (20 per class), val =
the next 500, test = the 1000 nodes of ``test.index``.

The pickles are read with :func:`threefold.datasets.safe_pickle.safe_load_pickle`, which refuses any
global outside numpy / scipy.sparse / builtins, so a tampered file cannot run code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch_geometric.data import Data

from threefold.datasets.errors import ConfigError, DataFormatError, MissingFileError
from threefold.datasets.registry import register_dataset
from threefold.datasets.safe_pickle import PLANETOID_GLOBALS, safe_load_pickle

PLANETOID_NAMES: tuple[str, ...] = ("cora", "citeseer", "pubmed")
PLANETOID_KEYS: tuple[str, ...] = ("x", "y", "tx", "ty", "allx", "ally", "graph", "test.index")
NUM_VAL: int = 500  # public split: the 500 nodes after the labelled training nodes


def planetoid_raw_dir(root: str | Path, name: str) -> Path:
    """The folder holding ``ind.<name>.*``: ``root`` itself, or ``root/raw``, or ``root/<Name>/raw``."""
    root = Path(root)
    name = name.lower()
    for folder in (root, root / "raw", root / name / "raw", root / name.capitalize() / "raw", root / name.title() / "raw"):
        if (folder / f"ind.{name}.graph").is_file() or (folder / f"ind.{name}.x").is_file():
            return folder
    if not root.is_dir():
        raise MissingFileError(f"{root}: Planetoid root folder not found")
    return root / "raw" if (root / "raw").is_dir() else root


MAX_DENSE_ELEMENTS: int = 2**31  # refuse to densify more (8 GiB of float32): a forged shape, not data


def _check_shape(matrix: object, path: Path, what: str) -> tuple[int, int]:
    """Shape of a CSR / ndarray, validated before anything is densified."""
    shape = getattr(matrix, "shape", None)
    if shape is None or len(shape) != 2:
        raise DataFormatError(f"{path}: expected a 2-D {what}, got {type(matrix).__name__} with shape {shape}")
    rows, cols = int(shape[0]), int(shape[1])
    if rows < 0 or cols < 0 or rows * cols > MAX_DENSE_ELEMENTS:
        raise DataFormatError(f"{path}: {what} claims shape {shape}, more than {MAX_DENSE_ELEMENTS} dense elements")
    if hasattr(matrix, "check_format"):
        try:  # indices / indptr consistent with the claimed shape (else toarray() reads out of bounds)
            kinds = {k: getattr(getattr(matrix, k), "dtype", np.dtype(object)).kind for k in ("indptr", "indices", "data")}
            if kinds["indptr"] not in "iu" or kinds["indices"] not in "iu" or kinds["data"] not in "biuf":
                # check_format only warns about float indices, and toarray() then misreads them
                raise ValueError(f"index arrays must be integers and data numeric, got dtype kinds {kinds}")
            if matrix.indptr.size and matrix.indptr[-1] != matrix.indices.size:
                raise ValueError(f"indptr ends at {matrix.indptr[-1]} but {matrix.indices.size} entries are stored")  # scipy would drop the rest
            matrix.check_format(full_check=True)
        except (ValueError, TypeError, IndexError, AttributeError) as exc:
            raise DataFormatError(f"{path}: corrupt sparse {what} ({exc})") from exc
        if not np.isfinite(matrix.data).all():
            raise DataFormatError(f"{path}: {what} holds NaN or infinite values")
    return rows, cols


def _dense(matrix: object, path: Path, what: str) -> np.ndarray:
    """CSR (features) or ndarray (one-hot labels) -> dense 2-D ndarray."""
    if hasattr(matrix, "toarray"):
        arr = matrix.toarray()
    elif isinstance(matrix, np.ndarray):
        arr = matrix
    else:
        raise DataFormatError(f"{path}: expected {what} as scipy.sparse matrix or numpy array, got {type(matrix).__name__}")
    if arr.ndim != 2:
        raise DataFormatError(f"{path}: expected a 2-D {what}, got shape {arr.shape}")
    return np.asarray(arr)


def _edge_index_from_adjacency(graph: object, num_nodes: int, path: Path) -> torch.Tensor:
    """``{node: [neighbours]}`` -> undirected, de-duplicated ``edge_index (2, E) int64`` without self loops."""
    if not isinstance(graph, dict):
        raise DataFormatError(f"{path}: expected a dict of neighbour lists, got {type(graph).__name__}")
    try:
        counts = np.fromiter((len(v) for v in graph.values()), dtype=np.int64, count=len(graph))
        src = np.repeat(np.fromiter(graph.keys(), dtype=np.int64, count=len(graph)), counts)
        dst = np.fromiter((int(u) for v in graph.values() for u in v), dtype=np.int64, count=int(counts.sum()))
    except (TypeError, ValueError) as exc:
        raise DataFormatError(f"{path}: node ids must be integers ({exc})") from exc
    if src.size and (min(src.min(), dst.min()) < 0 or max(src.max(), dst.max()) >= num_nodes):
        raise DataFormatError(f"{path}: node ids must lie in [0, {num_nodes}); found {min(src.min(), dst.min())}..{max(src.max(), dst.max())}")
    # The lists repeat entries (Cora 10858 for 10556 distinct) and hold self loops (CiteSeer 124);
    # symmetrising is a no-op on the published files but keeps the "undirected" promise for any input.
    keep = src != dst
    row = np.concatenate([src[keep], dst[keep]])
    col = np.concatenate([dst[keep], src[keep]])
    key = np.unique(row * num_nodes + col)
    return torch.from_numpy(np.stack([key // num_nodes, key % num_nodes]))


def load_planetoid(root: str | Path, name: str) -> Data:
    """Read Planetoid ``name`` (cora | citeseer | pubmed) from its raw files under ``root``.

    Returns a ``torch_geometric.data.Data`` with
      ``x (N, F) float32`` raw bag-of-words / TF-IDF features (NOT row-normalised; pipelines do that),
      ``y (N,) int64`` class ids, ``edge_index (2, E) int64`` undirected (both directions), no
      duplicates, no self loops, ``train_mask`` / ``val_mask`` / ``test_mask (N,) bool`` (public split).
    Cora: N=2708, F=1433, 7 classes, E=10556; CiteSeer: N=3327, F=3703, 6 classes.

    CiteSeer's test index skips 15 ids (isolated nodes without features in the files); as in PyG's
    ``read_planetoid_data`` those nodes get an all-zero feature row and label 0, and belong to no mask.
    """
    name = name.lower()
    if name not in PLANETOID_NAMES:
        raise ConfigError(f"unknown Planetoid dataset {name!r}; expected one of {', '.join(PLANETOID_NAMES)}")
    folder = planetoid_raw_dir(root, name)
    paths = {key: folder / f"ind.{name}.{key}" for key in PLANETOID_KEYS}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise MissingFileError(f"Planetoid {name}: missing raw file(s) {', '.join(missing)}")

    raw = {key: safe_load_pickle(paths[key], PLANETOID_GLOBALS) for key in PLANETOID_KEYS if key not in ("graph", "test.index")}
    shapes = {k: _check_shape(raw[k], paths[k], "feature matrix" if "x" in k else "one-hot label matrix") for k in raw}
    for k in ("tx", "allx"):
        if shapes[k][1] != shapes["x"][1]:
            raise DataFormatError(f"{paths[k]}: {shapes[k][1]} feature columns, but ind.{name}.x has {shapes['x'][1]}")
    graph = safe_load_pickle(paths["graph"], PLANETOID_GLOBALS)
    try:
        test_index = np.loadtxt(paths["test.index"], dtype=np.int64, ndmin=1)
    except (ValueError, OverflowError) as exc:
        raise DataFormatError(f"{paths['test.index']}: expected one integer node id per line ({exc})") from exc
    if test_index.size == 0:
        raise DataFormatError(f"{paths['test.index']}: no test node ids")
    # the node count comes from these files; bound it by what the other files describe
    bound = max(len(graph) if isinstance(graph, dict) else 0, shapes["allx"][0] + shapes["tx"][0])
    if test_index.max() >= bound:
        raise DataFormatError(
            f"{paths['test.index']}: test id {test_index.max()} exceeds the {bound} nodes described by "
            f"ind.{name}.graph / allx / tx"
        )
    x, tx, allx = (_dense(raw[k], paths[k], "feature matrix") for k in ("x", "tx", "allx"))
    y, ty, ally = (_dense(raw[k], paths[k], "one-hot label matrix") for k in ("y", "ty", "ally"))

    for key, arr, ref in (("tx", tx, x), ("allx", allx, x)):
        if arr.shape[1] != ref.shape[1]:
            raise DataFormatError(f"{paths[key]}: {arr.shape[1]} feature columns, but ind.{name}.x has {ref.shape[1]}")
    for key, arr, ref in (("ty", ty, y), ("ally", ally, y)):
        if arr.shape[1] != ref.shape[1]:
            raise DataFormatError(f"{paths[key]}: {arr.shape[1]} classes, but ind.{name}.y has {ref.shape[1]}")
    for (kx, ax), (ky, ay) in ((("x", x), ("y", y)), (("tx", tx), ("ty", ty)), (("allx", allx), ("ally", ally))):
        if ax.shape[0] != ay.shape[0]:
            raise DataFormatError(f"{paths[ky]}: {ay.shape[0]} label rows, but {paths[kx].name} has {ax.shape[0]} feature rows")
    if test_index.shape[0] != tx.shape[0]:
        raise DataFormatError(f"{paths['test.index']}: {test_index.shape[0]} ids, but ind.{name}.tx has {tx.shape[0]} rows")
    if np.unique(test_index).size != test_index.size or test_index.min() < allx.shape[0]:
        raise DataFormatError(
            f"{paths['test.index']}: test ids must be distinct and >= {allx.shape[0]} (the rows of ind.{name}.allx)"
        )
    if y.shape[0] + NUM_VAL > allx.shape[0]:
        raise DataFormatError(f"{paths['allx']}: {allx.shape[0]} rows cannot hold {y.shape[0]} train + {NUM_VAL} val nodes")

    num_nodes = int(max(test_index.max() + 1, len(graph) if isinstance(graph, dict) else 0))
    features = np.zeros((num_nodes, x.shape[1]), dtype=np.float32)
    features[: allx.shape[0]] = allx
    features[test_index] = tx  # row i of tx belongs to node test_index[i]
    onehot = np.zeros((num_nodes, y.shape[1]), dtype=np.float32)
    onehot[: ally.shape[0]] = ally
    onehot[test_index] = ty
    labels = onehot.argmax(axis=1)

    train_mask = torch.zeros(num_nodes, dtype=torch.bool)
    train_mask[: y.shape[0]] = True
    val_mask = torch.zeros(num_nodes, dtype=torch.bool)
    val_mask[y.shape[0] : y.shape[0] + NUM_VAL] = True
    test_mask = torch.zeros(num_nodes, dtype=torch.bool)
    test_mask[torch.from_numpy(test_index)] = True

    return Data(
        x=torch.from_numpy(features),
        y=torch.from_numpy(labels.astype(np.int64)),
        edge_index=_edge_index_from_adjacency(graph, num_nodes, paths["graph"]),
        train_mask=train_mask,
        val_mask=val_mask,
        test_mask=test_mask,
        num_nodes=num_nodes,
    )


@register_dataset("planetoid", "Planetoid citation graphs Cora / CiteSeer / PubMed (raw ind.* files, public split)", modality="graph")
class Planetoid(torch.utils.data.Dataset):
    """One-graph dataset over :func:`load_planetoid`.

    ``split="public"`` keeps the public masks; ``split="full"`` (as PyG) trains on every node outside
    the validation and test sets — the protocol of the IsoC-VGAE reference's node probe.
    """

    def __init__(self, root: str | Path, split: str = "public", name: str = "cora") -> None:
        if split not in ("public", "full"):
            raise ConfigError(f"planetoid split {split!r} is not supported; expected 'public' or 'full'")
        self.name = name.lower()
        self.split = split
        self.data = load_planetoid(root, self.name)
        if split == "full":
            self.data.train_mask = ~(self.data.val_mask | self.data.test_mask)

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> Data:
        if index != 0:
            raise IndexError(f"Planetoid {self.name} holds one graph; index {index} is out of range")
        return self.data
