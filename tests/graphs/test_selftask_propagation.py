"""Label propagation (analytic harmonic solution), logistic regression (scikit-learn), ICA fixed
point, and the neighbour label distribution (brute force)."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
import torch

from threefold.graphs.probes import LogisticRegression
from threefold.graphs.selftask.propagation import (
    ica,
    label_propagation,
    neighbour_label_distribution,
    two_hop_structure,
)


def _ei(g: nx.Graph) -> torch.Tensor:
    e = torch.tensor(list(g.edges())).t()
    return torch.cat([e, e.flip(0)], 1)


def test_label_propagation_path_is_linear():
    n = 9
    labels = torch.zeros(n, dtype=torch.long)
    labels[-1] = 1
    labelled = torch.zeros(n, dtype=torch.bool)
    labelled[[0, n - 1]] = True
    probs = label_propagation(_ei(nx.path_graph(n)), n, labels, labelled, 2, max_iter=20000, tol=1e-9)
    # harmonic function on a path with ends clamped to 0 and 1: linear interpolation
    np.testing.assert_allclose(probs[:, 1].numpy(), np.arange(n) / (n - 1), atol=1e-4)


def test_label_propagation_unlabelled_component_uniform():
    g = nx.path_graph(4)
    g.add_edge(4, 5)
    labels = torch.tensor([0, 0, 0, 1, 0, 0])
    labelled = torch.tensor([True, False, False, True, False, False])
    probs = label_propagation(_ei(g), 6, labels, labelled, 3)
    np.testing.assert_allclose(probs[4:].numpy(), np.full((2, 3), 1 / 3), atol=1e-6)
    np.testing.assert_allclose(probs.sum(1).numpy(), 1.0, atol=1e-6)


def test_logistic_regression_matches_sklearn():
    from sklearn.linear_model import LogisticRegression as SkLR

    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 5)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] + rng.normal(scale=0.5, size=120) > 0).astype(int) + (x[:, 2] > 1).astype(int)
    sk = SkLR(C=0.5, max_iter=2000, tol=1e-10).fit(x, y)
    ours = LogisticRegression(5, 3, c=0.5).fit(torch.from_numpy(x), torch.from_numpy(y))
    np.testing.assert_allclose(ours.predict_proba(torch.from_numpy(x)).numpy(), sk.predict_proba(x), atol=2e-3)


def test_ica_reaches_fixed_point_and_uses_neighbours():
    # two 8-cliques joined by one edge; noisy features, two of them pointing at the wrong class
    g = nx.disjoint_union(nx.complete_graph(8), nx.complete_graph(8))
    g.add_edge(0, 8)
    n = 16
    truth = torch.tensor([0] * 8 + [1] * 8)
    gen = torch.Generator().manual_seed(0)
    x = torch.nn.functional.one_hot(truth, 2).float() * 0.8 + 0.5 * torch.randn(n, 2, generator=gen)
    x[5] = torch.tensor([0.0, 1.0])
    x[12] = torch.tensor([1.0, 0.0])
    labelled = torch.zeros(n, dtype=torch.bool)
    labelled[[1, 2, 3, 9, 10, 11]] = True
    local = LogisticRegression(2, 2).fit(x[labelled], truth[labelled]).predict_proba(x).argmax(1)
    assert (local[~labelled] != truth[~labelled]).sum() >= 2  # features alone get some wrong
    probs, assignment, converged = ica(x, _ei(g), truth, labelled, 2, max_iter=10)
    # converged = the relational classifier reproduces the assignment it was given (a fixed point)
    assert converged
    assert torch.equal(assignment, truth)  # the neighbour counts corrected the misleading features
    assert torch.equal(probs.argmax(1), assignment)
    np.testing.assert_allclose(probs.sum(1).numpy(), 1.0, atol=1e-6)


def test_neighbour_label_distribution_brute_force():
    g = nx.connected_watts_strogatz_graph(25, 4, 0.3, seed=3)
    g.add_node(25)  # isolated
    n = 26
    assign = torch.arange(n) % 3
    dist, has = neighbour_label_distribution(two_hop_structure(_ei(g), n), assign, 3)
    for v in range(n):
        one = set(g.neighbors(v))
        two = {w for u in one for w in g.neighbors(u)} - {v}
        counts = np.zeros(3)
        for u in one:
            counts[u % 3] += 1
        for u in two:
            counts[u % 3] += 1
        if counts.sum() == 0:
            assert not has[v] and dist[v].abs().sum() == 0
        else:
            np.testing.assert_allclose(dist[v].numpy(), counts / counts.sum(), rtol=1e-6)
    assert not has[25] and has[:25].all()


@pytest.mark.gpu
def test_propagation_on_cuda_matches_cpu():
    g = nx.connected_watts_strogatz_graph(40, 4, 0.3, seed=3)
    ei = _ei(g)
    labels = torch.arange(40) % 2
    labelled = torch.zeros(40, dtype=torch.bool)
    labelled[:6] = True
    cpu = label_propagation(ei, 40, labels, labelled, 2)
    gpu = label_propagation(ei.cuda(), 40, labels.cuda(), labelled.cuda(), 2)
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=1e-5)
    s_cpu = neighbour_label_distribution(two_hop_structure(ei, 40), labels, 2)[0]
    s_gpu = neighbour_label_distribution(two_hop_structure(ei.cuda(), 40), labels.cuda(), 2)[0]
    torch.testing.assert_close(s_gpu.cpu(), s_cpu)
