"""SelfTask pretext targets on small hand-built graphs, against networkx / scipy / brute force."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
import torch
from torch_geometric.data import Data

from threefold.datasets.errors import ConfigError
from threefold.graphs.selftask import TASKS, build_task
from threefold.graphs.selftask.attributes import similarity_pairs
from threefold.graphs.selftask.graph_distances import bfs_distances
from threefold.graphs.selftask.labels import Distance2Labeled, prototype_correction
from threefold.graphs.selftask.partition import spectral_partition
from threefold.graphs.selftask.structure import (
    Distance2Clusters,
    EdgeMask,
    PairwiseDistance,
    cluster_centres,
    degree_buckets,
)


def _ei(g: nx.Graph) -> torch.Tensor:
    e = torch.tensor(list(g.edges())).t()
    return torch.cat([e, e.flip(0)], 1)


def _graph(g: nx.Graph, classes: int = 2, seed: int = 0) -> Data:
    n = g.number_of_nodes()
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    train = torch.zeros(n, dtype=torch.bool)
    train[:classes * 2] = True
    return Data(x=torch.rand(n, 6, generator=gen), edge_index=_ei(g), y=y, train_mask=train, num_nodes=n)


def test_degree_buckets_star_and_path():
    g = nx.star_graph(9)  # centre degree 9, leaves 1
    nx.add_path(g, [10, 11, 12])
    g.add_edges_from([(20, j) for j in range(21, 25)])  # degree 4
    g = nx.convert_node_labels_to_integers(g, ordering="sorted")
    ei = torch.cat([_ei(g), _ei(g)], 1)  # duplicates must not count twice
    buckets = degree_buckets(ei, g.number_of_nodes())
    deg = np.array([d for _, d in sorted(g.degree())])
    np.testing.assert_array_equal(buckets.numpy(), np.digitize(deg, [3, 8]))
    assert buckets[0] == 2 and buckets[1] == 0


def test_bfs_distances_match_networkx():
    g = nx.connected_watts_strogatz_graph(60, 4, 0.2, seed=1)
    g.add_node(60)  # isolated
    src = torch.tensor([0, 7, 60])
    d = bfs_distances(_ei(g), 61, src, chunk=2)
    for row, s in enumerate(src.tolist()):
        ref = nx.single_source_shortest_path_length(g, s)
        expect = [ref.get(v, -1) for v in range(61)]
        assert d[row].tolist() == expect
    capped = bfs_distances(_ei(g), 61, src, max_depth=2)
    assert ((capped <= 2) & ((capped == d) | (capped == -1))).all()


def test_edgemask_hides_edges_and_samples_non_edges():
    g = nx.grid_2d_graph(6, 6)
    g = nx.convert_node_labels_to_integers(g)
    data = _graph(g)
    task = EdgeMask(8)
    task.prepare(data, torch.Generator().manual_seed(0))
    n = data.num_nodes
    m = g.number_of_edges()
    pos = task.pairs[:, task.target == 1].t().tolist()
    neg = task.pairs[:, task.target == 0].t().tolist()
    assert len(pos) == len(neg) == round(0.1 * m)
    assert all(g.has_edge(u, v) for u, v in pos) and not any(g.has_edge(u, v) for u, v in neg)
    train = set(map(tuple, task.train_edges.t().tolist()))
    assert len(train) == 2 * (m - len(pos))
    assert not any((u, v) in train or (v, u) in train for u, v in pos)
    x, ei = task.training_input(data.x, data.edge_index)
    assert ei is task.train_edges and x is data.x
    assert n == 36


def test_pairwise_distance_classes():
    g = nx.path_graph(12)
    g.add_edge(20, 21)  # another component: unreachable pairs are class ≥ 4
    g = nx.convert_node_labels_to_integers(g, ordering="sorted")
    data = _graph(g)
    task = PairwiseDistance(8, pairs_per_class=5)
    task.prepare(data, torch.Generator().manual_seed(0))
    pairs, cls = task.sample_pairs(torch.Generator().manual_seed(1))
    assert torch.bincount(cls, minlength=4).tolist() == [5, 5, 5, 5]
    lengths = dict(nx.all_pairs_shortest_path_length(g))
    for (u, v), c in zip(pairs.t().tolist(), cls.tolist()):
        d = lengths[u].get(v, 99)
        assert c == min(d, 4) - 1


def test_distance2labeled_path():
    g = nx.path_graph(5)
    data = _graph(g)
    data.train_mask = torch.tensor([True, False, False, False, True])
    data.y = torch.tensor([0, 1, 1, 1, 1])
    task = Distance2Labeled(4, 2)
    task.prepare(data, torch.Generator())
    # class 0 labelled at node 0, class 1 at node 4: target = 1/d
    np.testing.assert_allclose(task.target[:, 0].numpy(), [0, 1, 1 / 2, 1 / 3, 1 / 4], rtol=1e-6)
    np.testing.assert_allclose(task.target[:, 1].numpy(), [1 / 4, 1 / 3, 1 / 2, 1, 0], rtol=1e-6)


def test_partition_and_centres_on_cliques():
    g = nx.disjoint_union_all([nx.complete_graph(6) for _ in range(3)])
    g.add_edges_from([(0, 6), (7, 12)])
    parts = spectral_partition(_ei(g), 18, 3, seed=0)
    groups = [set(parts[i * 6:(i + 1) * 6].tolist()) for i in range(3)]
    assert all(len(s) == 1 for s in groups) and len(set.union(*groups)) == 3
    centres = cluster_centres(_ei(g), parts, 3)
    # within-part degree is 5 for every node: the lowest id of each clique wins
    assert sorted(centres.tolist()) == [0, 6, 12]
    task = Distance2Clusters(4, num_clusters=3)
    task.prepare(_graph(g), torch.Generator().manual_seed(0))
    col = int(torch.nonzero(task.target[0] == 1.0).flatten()[0])  # the column of centre 0 (labels permute with the seed)
    assert task.target[0, col] == 1.0 and task.target[1, col] == 1.0 and task.target[6, col] == 1.0
    assert task.target[13, col] == pytest.approx(1 / 4)  # 13 → 12 → 7 → 6 → 0


def test_similarity_pairs_brute_force():
    x = torch.rand(30, 5, generator=torch.Generator().manual_seed(2))
    pairs, sim = similarity_pairs(x, 2, torch.Generator().manual_seed(0), chunk=7)
    xn = x / x.norm(dim=1, keepdim=True)
    s = (xn @ xn.t()).numpy()
    np.fill_diagonal(s, np.nan)
    got = set(map(tuple, pairs.t().tolist()))
    for i in range(30):
        order = np.argsort(np.nan_to_num(s[i], nan=-9))
        for j in list(order[-2:]) + list(np.argsort(np.nan_to_num(s[i], nan=9))[:2]):
            assert (min(i, j), max(i, j)) in got
    np.testing.assert_allclose(sim.numpy(), s[pairs[0], pairs[1]], rtol=1e-5)
    assert (pairs[0] < pairs[1]).all()


def test_prototype_correction_recovers_clusters():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    truth = torch.arange(200) % 2
    emb = centres[truth] + 0.1 * torch.randn(200, 3, generator=gen)
    noisy = truth.clone()
    flip = torch.arange(0, 200, 5)
    noisy[flip] = 1 - noisy[flip]  # 20 % wrong pseudo-labels
    idx = torch.arange(200)
    corrected = prototype_correction(emb, noisy, idx, 2, gen, samples_per_class=100, num_prototypes=8)
    assert (corrected == truth).float().mean() > 0.97


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_gives_finite_loss_and_gradient(name):
    g = nx.connected_caveman_graph(4, 8)
    data = _graph(g, classes=4)
    task = build_task(name, 16, 4, "cora", **({"num_clusters": 4} if name == "distance2clusters" else {}))
    task.prepare(data, torch.Generator().manual_seed(0))
    h = torch.randn(data.num_nodes, 16, requires_grad=True)
    loss = task.loss(h, torch.Generator().manual_seed(1))
    loss.backward()
    assert torch.isfinite(loss) and h.grad.abs().sum() > 0


def test_unknown_task():
    with pytest.raises(ConfigError):
        build_task("nope", 8, 2)
