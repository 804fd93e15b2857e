"""SBM generator: determinism, edge densities close to p_in / p_out, features informative."""

from __future__ import annotations

import numpy as np
import torch

from threefold.datasets.sbm import sbm_graph_dataset, stochastic_block_model


def test_sbm_densities_and_determinism():
    sizes = (200, 150)
    g = stochastic_block_model(block_sizes=sizes, p_in=0.05, p_out=0.005, seed=4)
    assert torch.equal(g.edge_index, stochastic_block_model(block_sizes=sizes, p_in=0.05, p_out=0.005, seed=4).edge_index)
    e = g.edge_index.numpy()
    assert not (e[0] == e[1]).any()
    same = g.y[e[0]] == g.y[e[1]]
    within_pairs = 200 * 199 / 2 + 150 * 149 / 2
    across_pairs = 200 * 150
    # binomial: 3-sigma bounds around the expected counts
    exp_in, exp_out = 0.05 * within_pairs, 0.005 * across_pairs
    assert abs(int(same.sum()) / 2 - exp_in) < 3 * np.sqrt(exp_in)
    assert abs(int((~same).sum()) / 2 - exp_out) < 3 * np.sqrt(exp_out)
    assert (g.x >= 0).all()
    masks = g.train_mask.int() + g.val_mask.int() + g.test_mask.int()
    assert (masks == 1).all() and int(g.train_mask.sum()) == 20


def test_features_carry_label():
    from sklearn.linear_model import LogisticRegression

    g = stochastic_block_model(seed=0)
    clf = LogisticRegression(max_iter=500).fit(g.x[g.train_mask].numpy(), g.y[g.train_mask].numpy())
    assert clf.score(g.x[g.test_mask].numpy(), g.y[g.test_mask].numpy()) > 0.8


def test_graph_dataset_labels():
    ds = sbm_graph_dataset(num_graphs=6, nodes_per_block=5)
    assert [int(g.y) for g in ds] == [0, 1, 0, 1, 0, 1]
    assert [g.num_nodes for g in ds[:2]] == [10, 15]
