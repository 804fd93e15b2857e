"""SelfTask basic attribute tasks: AttributeMask and PairwiseAttrSim (Jin et al. 2020, section 3)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn
from torch_geometric.data import Data

from threefold.graphs.selftask.base import PretextTask, random_subset, seed_from


def pca_features(x: Tensor, dim: int, seed: int) -> Tensor:
    """Principal components ``(N, min(dim, F)) float32`` of ``x (N, F)`` (scikit-learn PCA, seeded)."""
    from sklearn.decomposition import PCA

    dim = min(dim, x.shape[1], x.shape[0])
    z = PCA(n_components=dim, random_state=seed, svd_solver="randomized").fit_transform(x.detach().cpu().numpy())
    return torch.from_numpy(z.astype(np.float32)).to(x.device)


class AttributeMask(PretextTask):
    """Zero the features of ``mask_ratio`` of the unlabelled nodes in the backbone's input and
    regress their features reduced by PCA to ``pca_dim`` (256) from the hidden layer (MSE).
    The backbone keeps the original feature width; only the target is PCA-reduced."""

    name = "attributemask"

    def __init__(self, hidden: int, mask_ratio: float = 0.1, pca_dim: int = 256) -> None:
        super().__init__(hidden)
        self.mask_ratio = mask_ratio
        self.pca_dim = pca_dim
        self.head: nn.Module = nn.Identity()  # sized in prepare() once the feature width is known

    def prepare(self, data: Data, generator: torch.Generator) -> None:
        unlabelled = torch.nonzero(~data.train_mask).flatten()
        masked = random_subset(unlabelled, int(self.mask_ratio * unlabelled.numel()), generator)
        target = pca_features(data.x, self.pca_dim, seed_from(generator))
        self.head = nn.Linear(self.hidden, target.shape[1]).to(data.x.device)
        self.register_buffer("masked", masked, persistent=False)
        self.register_buffer("target", target[masked], persistent=False)

    def training_input(self, x: Tensor, edge_index: Tensor) -> tuple[Tensor, Tensor]:
        x = x.clone()
        x[self.masked] = 0.0
        return x, edge_index

    def loss(self, hidden: Tensor, generator: torch.Generator) -> Tensor:
        return nn.functional.mse_loss(self.head(hidden[self.masked]), self.target)


def similarity_pairs(x: Tensor, k: int, generator: torch.Generator, chunk: int = 256) -> tuple[Tensor, Tensor]:
    """For every node: its ``k`` most and ``k`` least cosine-similar other nodes and ``k`` random
    others. Returns unique unordered pairs ``(2, P) int64`` (u < v) and their cosine similarity
    ``(P,) float32``. Similarities are computed ``chunk`` rows at a time (memory chunk × N)."""
    xn = nn.functional.normalize(x, dim=1)
    n = x.shape[0]
    keys = []
    for lo in range(0, n, chunk):  # chunks of rows, not a Python loop over nodes
        rows = torch.arange(lo, min(lo + chunk, n), device=x.device)
        sim = xn[rows] @ xn.t()
        diag = (torch.arange(rows.numel(), device=x.device), rows)
        sim[diag] = -3.0  # below any cosine: never among the most similar
        top = torch.topk(sim, k, dim=1).indices
        sim[diag] = 3.0  # above any cosine: never among the least similar
        bottom = torch.topk(sim, k, dim=1, largest=False).indices
        rand = torch.randint(0, n - 1, (rows.numel(), k), generator=generator).to(x.device)
        rand = rand + (rand >= rows.unsqueeze(1)).long()  # skip self
        other = torch.cat([top, bottom, rand], 1)
        u = torch.minimum(rows.unsqueeze(1), other).flatten()
        v = torch.maximum(rows.unsqueeze(1), other).flatten()
        keys.append(u * n + v)
    key = torch.unique(torch.cat(keys))
    u, v = key // n, key % n
    # row-wise dot products in slices: gathering all pairs at once would hold 2 × P × F floats
    sim = torch.cat([(xn[u[i : i + 8192]] * xn[v[i : i + 8192]]).sum(1) for i in range(0, u.numel(), 8192)])
    return torch.stack([u, v]), sim


class PairwiseAttrSim(PretextTask):
    """Regress the cosine similarity of node features for the pairs of :func:`similarity_pairs`
    from ``|h_u − h_v|`` (MSE on ``pairs_per_step`` pairs sampled every step). The reference builds
    the dense N×N similarity matrix; here it is never materialised."""

    name = "pairwiseattrsim"

    def __init__(self, hidden: int, k: int = 3, pairs_per_step: int = 5000) -> None:
        super().__init__(hidden)
        self.head = nn.Linear(hidden, 1)
        self.k = k
        self.pairs_per_step = pairs_per_step

    def prepare(self, data: Data, generator: torch.Generator) -> None:
        pairs, sim = similarity_pairs(data.x, self.k, generator)
        self.register_buffer("pairs", pairs, persistent=False)
        self.register_buffer("target", sim, persistent=False)

    def loss(self, hidden: Tensor, generator: torch.Generator) -> Tensor:
        pick = random_subset(torch.arange(self.target.numel(), device=hidden.device), self.pairs_per_step, generator)
        pairs = self.pairs[:, pick]
        pred = self.head((hidden[pairs[0]] - hidden[pairs[1]]).abs()).squeeze(1)
        return nn.functional.mse_loss(pred, self.target[pick])
