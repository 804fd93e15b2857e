"""Deterministic stochastic-block-model graphs with features and labels (the embedded default sample
of the graph pipelines, so ``threefold run planetoid-* `` works without data).

Holland, Laskey and Leinhardt, "Stochastic blockmodels: First steps", Social Networks 1983: node
pairs inside a block are joined with probability ``p_in``, across blocks with ``p_out``. Features are
the block's random mean direction plus isotropic Gaussian noise, so both structure and attributes
carry the label. The sampler draws per block pair, never an N×N matrix.
"""

from __future__ import annotations

import numpy as np
import torch
from torch_geometric.data import Data

from threefold.datasets.errors import ConfigError


def stochastic_block_model(
    block_sizes: tuple[int, ...] = (60, 60, 60),
    p_in: float = 0.1,
    p_out: float = 0.01,
    feature_dim: int = 32,
    feature_noise: float = 1.0,
    train_per_class: int = 10,
    num_val: int = 30,
    seed: int = 0,
) -> Data:
    """A planetoid-shaped SBM graph.

    Returns ``Data`` with ``x (N, feature_dim) float32`` (non-negative, so row normalisation is
    meaningful), ``y (N,) int64`` block ids, ``edge_index (2, E) int64`` undirected without self loops,
    and ``train_mask`` (first ``train_per_class`` nodes of each block) / ``val_mask`` (``num_val``
    random others) / ``test_mask`` (the rest), all ``(N,) bool``.
    """
    sizes = np.asarray(block_sizes, dtype=np.int64)
    if sizes.ndim != 1 or sizes.size < 2 or (sizes <= train_per_class).any():
        raise ConfigError(f"block_sizes {block_sizes}: need >= 2 blocks, each larger than train_per_class={train_per_class}")
    if not (0 <= p_out <= 1 and 0 <= p_in <= 1):
        raise ConfigError(f"p_in={p_in}, p_out={p_out} must be probabilities")
    rng = np.random.default_rng(seed)
    start = np.concatenate([[0], np.cumsum(sizes)])
    n = int(start[-1])
    y = np.repeat(np.arange(sizes.size), sizes)

    rows, cols = [], []
    for a in range(sizes.size):  # loop over block pairs (few), sampling inside is vectorised
        for b in range(a, sizes.size):
            if a == b:
                iu, ju = np.triu_indices(int(sizes[a]), k=1)
                pick = rng.random(iu.size) < p_in
                rows.append(iu[pick] + start[a])
                cols.append(ju[pick] + start[a])
            else:
                total = int(sizes[a] * sizes[b])
                k = rng.binomial(total, p_out)
                flat = rng.choice(total, size=k, replace=False)
                rows.append(flat // sizes[b] + start[a])
                cols.append(flat % sizes[b] + start[b])
    r, c = np.concatenate(rows), np.concatenate(cols)
    edge_index = torch.from_numpy(np.stack([np.concatenate([r, c]), np.concatenate([c, r])]).astype(np.int64))

    means = rng.random((sizes.size, feature_dim)) * 2.0
    x = np.abs(means[y] + feature_noise * rng.standard_normal((n, feature_dim))).astype(np.float32)

    train = np.concatenate([np.arange(start[i], start[i] + train_per_class) for i in range(sizes.size)])
    rest = np.setdiff1d(np.arange(n), train)
    val = rng.choice(rest, size=min(num_val, rest.size - 1), replace=False)
    masks = {k: torch.zeros(n, dtype=torch.bool) for k in ("train_mask", "val_mask", "test_mask")}
    masks["train_mask"][train] = True
    masks["val_mask"][val] = True
    masks["test_mask"][np.setdiff1d(rest, val)] = True
    return Data(x=torch.from_numpy(x), y=torch.from_numpy(y), edge_index=edge_index, num_nodes=n, **masks)


def sbm_graph_dataset(
    num_graphs: int = 60, nodes_per_block: int = 8, num_classes: int = 2, feature_dim: int = 8, seed: int = 0
) -> list[Data]:
    """Small graph-classification set: class ``c`` graphs have ``c + 2`` blocks (denser community
    structure for higher classes); each graph is one :func:`stochastic_block_model` draw."""
    graphs = []
    rng = np.random.default_rng(seed)
    for i in range(num_graphs):
        label = i % num_classes
        g = stochastic_block_model(
            block_sizes=(nodes_per_block,) * (label + 2), p_in=0.6, p_out=0.05, feature_dim=feature_dim,
            train_per_class=1, num_val=1, seed=int(rng.integers(0, 2**31 - 1)),
        )
        graphs.append(Data(x=g.x, edge_index=g.edge_index, y=torch.tensor([label]), num_nodes=g.num_nodes))
    return graphs
