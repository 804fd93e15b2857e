"""Seeded evaluation splits for graph self-supervision (issue #9).

- :func:`link_split`: edge split for link prediction, 85 / 5 / 10 of the undirected edges with as many
  sampled non-edges for validation and test (the protocol of Kipf & Welling's VGAE, NeurIPS-W 2016,
  and of IsoC-VGAE, arXiv 2312.05519).
- :func:`graph_class_split`: stratified 50 / 20 / 30 train / val / test split of graphs (IsoC-VGAE).
- :func:`graph_kfold`: stratified k-fold cross-validation (10 folds, as graph-classification papers report).

All functions are deterministic for a given ``seed`` (a ``numpy.random.Generator`` seed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from threefold.datasets.errors import ConfigError, DataFormatError


@dataclass(frozen=True)
class LinkSplit:
    """``train_edge_index (2, 2·E_train)`` both directions, for message passing and as positives;
    ``val_pos / val_neg / test_pos / test_neg (2, k)`` one direction each, ``int64``."""

    train_edge_index: torch.Tensor
    val_pos: torch.Tensor
    val_neg: torch.Tensor
    test_pos: torch.Tensor
    test_neg: torch.Tensor


def _undirected_pairs(edge_index: torch.Tensor, num_nodes: int) -> np.ndarray:
    e = edge_index.detach().cpu().numpy()
    if e.ndim != 2 or e.shape[0] != 2:
        raise DataFormatError(f"edge_index: expected shape (2, E), got {tuple(e.shape)}")
    if e.size and (e.min() < 0 or e.max() >= num_nodes):
        raise DataFormatError(f"edge_index: node ids must lie in [0, {num_nodes})")
    lo, hi = np.minimum(e[0], e[1]), np.maximum(e[0], e[1])
    keep = lo != hi
    key = np.unique(lo[keep] * num_nodes + hi[keep])
    return np.stack([key // num_nodes, key % num_nodes])


def sample_non_edges(
    edge_index: torch.Tensor, num_nodes: int, count: int, rng: np.random.Generator, exclude: np.ndarray | None = None
) -> np.ndarray:
    """``count`` distinct unordered node pairs ``(2, count)`` (u < v) that are not edges of ``edge_index``
    and not in ``exclude`` (keys ``u·N + v``); vectorised rejection sampling."""
    pairs = _undirected_pairs(edge_index, num_nodes)
    forbidden = np.concatenate([pairs[0] * num_nodes + pairs[1], exclude if exclude is not None else np.empty(0, np.int64)])
    capacity = num_nodes * (num_nodes - 1) // 2 - np.unique(forbidden).size
    if count > capacity:
        raise ConfigError(f"cannot sample {count} non-edges: the graph has only {capacity} free node pairs")
    chosen = np.empty(0, dtype=np.int64)
    while chosen.size < count:
        need = count - chosen.size
        u = rng.integers(0, num_nodes, 2 * need + 16)
        v = rng.integers(0, num_nodes, 2 * need + 16)
        lo, hi = np.minimum(u, v), np.maximum(u, v)
        key = (lo * num_nodes + hi)[lo != hi]
        key = key[~np.isin(key, forbidden)]
        # keep first occurrences in sampling order, so the result does not depend on sorting
        _, first = np.unique(key, return_index=True)
        key = key[np.sort(first)]
        key = key[~np.isin(key, chosen)]
        chosen = np.concatenate([chosen, key[:need]])
    return np.stack([chosen // num_nodes, chosen % num_nodes])


def link_split(edge_index: torch.Tensor, num_nodes: int, val: float = 0.05, test: float = 0.10, seed: int = 0) -> LinkSplit:
    """Split the undirected edges of ``edge_index (2, E) int64`` into train / val / test (85 / 5 / 10).

    Validation and test get as many negatives as positives, drawn among pairs that are not edges of
    the *full* graph (so a held-out positive is never used as a negative) and disjoint between val
    and test. ``int(round(fraction · E_undirected))`` edges go to each held-out set.
    """
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise ConfigError(f"link_split: val={val} and test={test} must be fractions with val + test < 1")
    rng = np.random.default_rng(seed)
    pairs = _undirected_pairs(edge_index, num_nodes)
    m = pairs.shape[1]
    n_val, n_test = int(round(val * m)), int(round(test * m))
    perm = rng.permutation(m)
    test_pos = pairs[:, perm[:n_test]]
    val_pos = pairs[:, perm[n_test : n_test + n_val]]
    train = pairs[:, perm[n_test + n_val :]]
    neg = sample_non_edges(edge_index, num_nodes, n_val + n_test, rng)
    as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).long()  # noqa: E731
    return LinkSplit(
        train_edge_index=as_t(np.concatenate([train, train[::-1]], axis=1)),
        val_pos=as_t(val_pos),
        val_neg=as_t(neg[:, :n_val]),
        test_pos=as_t(test_pos),
        test_neg=as_t(neg[:, n_val:]),
    )


def graph_class_split(
    labels: np.ndarray | torch.Tensor, fractions: tuple[float, float, float] = (0.5, 0.2, 0.3), seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified train / val / test graph indices (``int64``), 50 / 20 / 30 by default (IsoC-VGAE)."""
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels).reshape(-1)
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-9 or min(fractions) <= 0:
        raise ConfigError(f"graph_class_split: fractions {fractions} must be three positive numbers summing to 1")
    idx = np.arange(labels.size)
    train, rest = train_test_split(idx, train_size=fractions[0], stratify=labels, random_state=seed)
    val, test = train_test_split(
        rest, train_size=fractions[1] / (fractions[1] + fractions[2]), stratify=labels[rest], random_state=seed
    )
    return np.sort(train), np.sort(val), np.sort(test)


def graph_kfold(labels: np.ndarray | torch.Tensor, folds: int = 10, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified ``folds``-fold (train, test) graph indices; every graph is tested exactly once."""
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(labels).reshape(-1)
    if folds < 2:
        raise ConfigError(f"graph_kfold: folds={folds} must be at least 2")
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [(train, test) for train, test in skf.split(np.zeros(labels.size), labels)]
