"""Link and graph-classification splits: proportions, disjointness, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from threefold.datasets.errors import ConfigError
from threefold.datasets.graph_splits import graph_class_split, graph_kfold, link_split, sample_non_edges
from threefold.datasets.sbm import stochastic_block_model


def _keys(e: torch.Tensor, n: int) -> set[int]:
    lo, hi = torch.minimum(e[0], e[1]), torch.maximum(e[0], e[1])
    return set((lo * n + hi).tolist())


def test_link_split_partition_and_negatives():
    g = stochastic_block_model(seed=1)
    n = g.num_nodes
    s = link_split(g.edge_index, n, seed=3)
    all_pos = _keys(g.edge_index, n)
    m = len(all_pos)
    train = _keys(s.train_edge_index, n)
    val, test = _keys(s.val_pos, n), _keys(s.test_pos, n)
    assert len(val) == round(0.05 * m) and len(test) == round(0.10 * m)
    assert train | val | test == all_pos and not (train & val) and not (train & test) and not (val & test)
    assert s.train_edge_index.shape[1] == 2 * len(train)  # both directions
    vneg, tneg = _keys(s.val_neg, n), _keys(s.test_neg, n)
    assert len(vneg) == len(val) and len(tneg) == len(test) and not (vneg & tneg)
    assert not ((vneg | tneg) & all_pos)
    assert (s.val_neg[0] != s.val_neg[1]).all()


def test_link_split_deterministic():
    g = stochastic_block_model(seed=1)
    a, b, c = (link_split(g.edge_index, g.num_nodes, seed=s) for s in (5, 5, 6))
    assert torch.equal(a.test_pos, b.test_pos) and torch.equal(a.test_neg, b.test_neg)
    assert not torch.equal(a.test_pos, c.test_pos)


def test_non_edges_on_nearly_complete_graph():
    n = 6
    iu = torch.triu_indices(n, n, 1)
    full = torch.cat([iu, iu.flip(0)], 1)
    keep = ~((full[0] == 0) & (full[1] == 5)) & ~((full[0] == 5) & (full[1] == 0))
    neg = sample_non_edges(full[:, keep], n, 1, np.random.default_rng(0))
    assert neg.tolist() == [[0], [5]]
    with pytest.raises(ConfigError):
        sample_non_edges(full[:, keep], n, 2, np.random.default_rng(0))


def test_graph_class_split():
    labels = np.array([0] * 60 + [1] * 40)
    tr, va, te = graph_class_split(labels, seed=0)
    assert (len(tr), len(va), len(te)) == (50, 20, 30)
    assert len(set(tr) | set(va) | set(te)) == 100
    assert labels[tr].mean() == pytest.approx(0.4, abs=0.03)  # stratified
    tr2, _, te2 = graph_class_split(labels, seed=0)
    assert np.array_equal(tr, tr2) and np.array_equal(te, te2)
    with pytest.raises(ConfigError):
        graph_class_split(labels, fractions=(0.5, 0.5, 0.5))


def test_kfold_covers_each_graph_once():
    labels = np.array([0, 1] * 25)
    folds = graph_kfold(labels, folds=10, seed=2)
    tested = np.concatenate([te for _, te in folds])
    assert sorted(tested.tolist()) == list(range(50))
    for tr, te in folds:
        assert not set(tr) & set(te) and len(te) == 5
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, graph_kfold(labels, folds=10, seed=2)))
