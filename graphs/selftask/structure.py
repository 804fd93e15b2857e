"""SelfTask basic structure tasks: NodeProperty, EdgeMask, PairwiseDistance, Distance2Clusters
(Jin et al. 2020, section 3). Targets are computed with sparse ops; no N×N matrix is built."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn
from torch_geometric.data import Data

from threefold.datasets.graph_splits import sample_non_edges
from threefold.graphs.selftask.base import PretextTask, random_subset, seed_from
from threefold.graphs.selftask.graph_distances import bfs_distances
from threefold.graphs.selftask.partition import spectral_partition


def degree_buckets(edge_index: Tensor, num_nodes: int) -> Tensor:
    """NodeProperty target: degree class ``(N,) int64`` — 0 for degree ≤ 2, 1 for 3–7, 2 for > 7
    (degree = distinct neighbours, self loops ignored)."""
    src, dst = edge_index
    keep = src != dst
    key = torch.unique(torch.minimum(src[keep], dst[keep]) * num_nodes + torch.maximum(src[keep], dst[keep]))
    ends = torch.cat([key // num_nodes, key % num_nodes])
    degree = torch.bincount(ends, minlength=num_nodes)
    return (degree > 2).long() + (degree > 7).long()


class NodeProperty(PretextTask):
    """Classify each node's degree bucket (cross-entropy over all nodes)."""

    name = "nodeproperty"

    def __init__(self, hidden: int) -> None:
        super().__init__(hidden)
        self.head = nn.Linear(hidden, 3)

    def prepare(self, data: Data, generator: torch.Generator) -> None:
        self.register_buffer("target", degree_buckets(data.edge_index, data.num_nodes), persistent=False)

    def loss(self, hidden: Tensor, generator: torch.Generator) -> Tensor:
        return nn.functional.cross_entropy(self.head(hidden), self.target)


def _pair_head_input(hidden: Tensor, pairs: Tensor) -> Tensor:
    return (hidden[pairs[0]] - hidden[pairs[1]]).abs()


class EdgeMask(PretextTask):
    """Hide ``mask_ratio`` of the undirected edges from the backbone and classify them against as
    many sampled non-edges from ``|h_u − h_v|`` (cross-entropy). The reference masks directed
    entries of the adjacency; masking whole undirected edges keeps the training graph symmetric."""

    name = "edgemask"

    def __init__(self, hidden: int, mask_ratio: float = 0.1) -> None:
        super().__init__(hidden)
        self.head = nn.Linear(hidden, 2)
        self.mask_ratio = mask_ratio

    def prepare(self, data: Data, generator: torch.Generator) -> None:
        n = data.num_nodes
        src, dst = data.edge_index
        lo, hi = torch.minimum(src, dst), torch.maximum(src, dst)
        key = torch.unique((lo * n + hi)[lo != hi])
        perm = torch.randperm(key.numel(), generator=generator).to(key.device)
        n_mask = int(round(self.mask_ratio * key.numel()))
        masked, kept = key[perm[:n_mask]], key[perm[n_mask:]]
        pos = torch.stack([masked // n, masked % n])
        neg = torch.from_numpy(sample_non_edges(data.edge_index, n, n_mask, np.random.default_rng(seed_from(generator))))
        kept_pairs = torch.stack([kept // n, kept % n])
        self.register_buffer("train_edges", torch.cat([kept_pairs, kept_pairs.flip(0)], 1), persistent=False)
        self.register_buffer("pairs", torch.cat([pos, neg.to(pos.device)], 1), persistent=False)
        self.register_buffer("target", torch.cat([torch.ones(n_mask), torch.zeros(n_mask)]).long().to(pos.device), persistent=False)

    def training_input(self, x: Tensor, edge_index: Tensor) -> tuple[Tensor, Tensor]:
        return x, self.train_edges

    def loss(self, hidden: Tensor, generator: torch.Generator) -> Tensor:
        return nn.functional.cross_entropy(self.head(_pair_head_input(hidden, self.pairs)), self.target)


class PairwiseDistance(PretextTask):
    """Classify the hop distance of node pairs into 1 / 2 / 3 / ≥ 4 (unreachable counts as ≥ 4),
    ``pairs_per_class`` pairs per class resampled every step (cross-entropy on ``|h_u − h_v|``).

    The reference computes all-pairs distances (dense N×N); here BFS runs from ``max_sources``
    random source nodes (all nodes when N ≤ max_sources) to depth 3, and pairs are drawn from those
    rows, so memory is ``sources × N`` bytes. A class with fewer candidate pairs than
    ``pairs_per_class`` uses all of them."""

    name = "pairwisedistance"

    def __init__(self, hidden: int, pairs_per_class: int = 4000, max_sources: int = 3000) -> None:
        super().__init__(hidden)
        self.head = nn.Linear(hidden, 4)
        self.pairs_per_class = pairs_per_class
        self.max_sources = max_sources

    def prepare(self, data: Data, generator: torch.Generator) -> None:
        n = data.num_nodes
        sources = random_subset(torch.arange(n, device=data.edge_index.device), self.max_sources, generator)
        cls = bfs_distances(data.edge_index, n, sources, max_depth=3, dtype=torch.int8)
        cls[cls < 0] = 4  # 0 = self, 1..3, 4 = farther or unreachable (in place: S × N bytes in all)
        self.register_buffer("sources", sources, persistent=False)
        self.register_buffer("dist_class", cls, persistent=False)
        self.pools = [torch.nonzero(cls.flatten() == d).flatten() for d in (1, 2, 3)]

    def sample_pairs(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(pairs (2, P) int64, class (P,) int64 in 0..3)."""
        n = self.dist_class.shape[1]
        flat, labels = [], []
        for c, pool in enumerate(self.pools):
            pick = random_subset(pool, self.pairs_per_class, generator)
            flat.append(pick)
            labels.append(torch.full_like(pick, c))
        # class ≥ 4: rejection-sample (source, node) cells whose class is 4
        far = torch.empty(0, dtype=torch.int64, device=self.dist_class.device)
        total = self.dist_class.numel()
        if (self.dist_class == 4).any():
            while far.numel() < self.pairs_per_class:
                cand = torch.randint(0, total, (2 * self.pairs_per_class,), generator=generator).to(far.device)
                far = torch.cat([far, cand[self.dist_class.flatten()[cand] == 4]])
            far = far[: self.pairs_per_class]
        flat.append(far)
        labels.append(torch.full_like(far, 3))
        flat_t = torch.cat(flat)
        return torch.stack([self.sources[flat_t // n], flat_t % n]), torch.cat(labels)

    def loss(self, hidden: Tensor, generator: torch.Generator) -> Tensor:
        pairs, target = self.sample_pairs(generator)
        return nn.functional.cross_entropy(self.head(_pair_head_input(hidden, pairs)), target)


def cluster_centres(edge_index: Tensor, parts: Tensor, num_parts: int) -> Tensor:
    """Per part, the node with the most neighbours inside its own part (lowest id on ties)."""
    src, dst = edge_index
    inside = (parts[src] == parts[dst]) & (src != dst)
    deg = torch.bincount(src[inside], minlength=parts.numel()).float()
    # rank nodes by (part, degree desc, id asc) and take the first of each part
    score = deg - torch.arange(parts.numel(), device=deg.device, dtype=torch.float32) / (parts.numel() + 1)
    best = torch.full((num_parts,), -1.0, device=deg.device).scatter_reduce(0, parts, score, reduce="amax")
    is_best = score == best[parts]
    centres = torch.zeros(num_parts, dtype=torch.int64, device=deg.device)
    centres[parts[is_best]] = torch.nonzero(is_best).flatten()
    return centres


class Distance2Clusters(PretextTask):
    """Regress, for every node, ``1 / hop distance`` to the centre of each graph cluster (0 when
    unreachable; 1 at the centre itself, where the reference's BFS leaves 0) — MSE over all nodes.
    Clusters come from :func:`~threefold.graphs.selftask.partition.spectral_partition` (a stated
    substitute for METIS); centres are the nodes with the largest within-cluster degree."""

    name = "distance2clusters"

    def __init__(self, hidden: int, num_clusters: int = 10) -> None:
        super().__init__(hidden)
        self.head = nn.Linear(hidden, num_clusters)
        self.num_clusters = num_clusters

    def prepare(self, data: Data, generator: torch.Generator) -> None:
        parts = spectral_partition(data.edge_index, data.num_nodes, self.num_clusters, seed_from(generator))
        centres = cluster_centres(data.edge_index, parts, self.num_clusters)
        dist = bfs_distances(data.edge_index, data.num_nodes, centres).t().float()  # (N, k)
        target = torch.where(dist > 0, 1.0 / dist.clamp(min=1), torch.zeros_like(dist))
        target[dist == 0] = 1.0
        self.register_buffer("target", target, persistent=False)

    def loss(self, hidden: Tensor, generator: torch.Generator) -> Tensor:
        return nn.functional.mse_loss(self.head(hidden), self.target)
