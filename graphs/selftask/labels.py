"""SelfTask's label-aware tasks ("SelfTask" proper, Jin et al. 2020, section 5): Distance2Labeled,
ContextLabel (pseudo-labels by label propagation or ICA), EnsembleLabel (both combined) and
CorrectedLabel (prototype-based relabelling of the pseudo-labels during training).

Only labels of the training nodes (``train_mask``) are read; targets are regressed on unlabelled
nodes, as the reference does.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch_geometric.data import Data

from threefold.datasets.errors import ConfigError
from threefold.graphs.selftask.base import PretextTask, random_subset
from threefold.graphs.selftask.graph_distances import bfs_distances
from threefold.graphs.selftask.propagation import ica, label_propagation, neighbour_label_distribution, two_hop_structure


class Distance2Labeled(PretextTask):
    """Regress, per class c, the mean over labelled nodes of class c of ``1 / hop distance`` (0 when
    unreachable) — MSE on unlabelled nodes."""

    name = "distance2labeled"

    def __init__(self, hidden: int, num_classes: int) -> None:
        super().__init__(hidden)
        self.head = nn.Linear(hidden, num_classes)
        self.num_classes = num_classes

    def prepare(self, data: Data, generator: torch.Generator) -> None:
        labelled = torch.nonzero(data.train_mask).flatten()
        dist = bfs_distances(data.edge_index, data.num_nodes, labelled).float()  # (L, N)
        inv = torch.where(dist > 0, 1.0 / dist.clamp(min=1), torch.zeros_like(dist))
        cls = data.y[labelled]
        total = torch.zeros(self.num_classes, data.num_nodes, device=inv.device).index_add_(0, cls, inv)
        count = torch.bincount(cls, minlength=self.num_classes).clamp(min=1).unsqueeze(1).float()
        self.register_buffer("target", (total / count).t().contiguous(), persistent=False)
        self.register_buffer("unlabelled", ~data.train_mask, persistent=False)

    def loss(self, hidden: Tensor, generator: torch.Generator) -> Tensor:
        return nn.functional.mse_loss(self.head(hidden)[self.unlabelled], self.target[self.unlabelled])


def pseudo_labels(data: Data, num_classes: int, method: str) -> tuple[Tensor, Tensor]:
    """(probabilities (N, C), assignment (N,)) from ``lp``, ``ica`` or ``ensemble`` (LP + ICA
    probabilities summed, as the reference's CombinedAgent); training labels kept as given."""
    labelled = data.train_mask
    if method not in ("lp", "ica", "ensemble"):
        raise ConfigError(f"pseudo-label method {method!r}: expected 'lp', 'ica' or 'ensemble'")
    probs = torch.zeros(data.num_nodes, num_classes, device=data.x.device)
    if method in ("lp", "ensemble"):
        probs = probs + label_propagation(data.edge_index, data.num_nodes, data.y, labelled, num_classes)
    if method in ("ica", "ensemble"):
        probs = probs + ica(data.x, data.edge_index, data.y, labelled, num_classes)[0]
    assignment = torch.where(labelled, data.y, probs.argmax(1))
    return probs, assignment


class ContextLabel(PretextTask):
    """Regress the neighbour label distribution (1- and 2-hop) of pseudo-labels with
    ``softmax(Linear(dropout(h)))`` — MSE on unlabelled nodes that have neighbours."""

    name = "contextlabel"

    def __init__(self, hidden: int, num_classes: int, method: str = "ica", dropout: float = 0.5) -> None:
        super().__init__(hidden)
        self.head = nn.Linear(hidden, num_classes)
        self.num_classes = num_classes
        self.method = method
        self.dropout = dropout

    def prepare(self, data: Data, generator: torch.Generator) -> None:
        _, assignment = pseudo_labels(data, self.num_classes, self.method)
        self.structure = two_hop_structure(data.edge_index, data.num_nodes)
        target, has = neighbour_label_distribution(self.structure, assignment, self.num_classes)
        self.register_buffer("assignment", assignment, persistent=False)
        self.register_buffer("target", target, persistent=False)
        self.register_buffer("used", has & ~data.train_mask, persistent=False)
        self.register_buffer("labelled", data.train_mask, persistent=False)

    def output(self, hidden: Tensor) -> Tensor:
        # dropout on the task input is part of the reference's ContextLabel head
        return torch.softmax(self.head(nn.functional.dropout(hidden, self.dropout, self.training)), dim=1)

    def loss(self, hidden: Tensor, generator: torch.Generator) -> Tensor:
        return nn.functional.mse_loss(self.output(hidden)[self.used], self.target[self.used])


class EnsembleLabel(ContextLabel):
    """ContextLabel with pseudo-labels from LP and ICA combined (probabilities summed)."""

    name = "ensemblelabel"

    def __init__(self, hidden: int, num_classes: int, dropout: float = 0.5) -> None:
        super().__init__(hidden, num_classes, method="ensemble", dropout=dropout)


def prototype_correction(
    embeddings: Tensor, labels: Tensor, idx: Tensor, num_classes: int, generator: torch.Generator,
    samples_per_class: int = 320, num_prototypes: int = 8, percentile: float = 40.0, eta_cap: float = 0.95,
) -> Tensor:
    """Relabel nodes ``idx`` by cosine similarity to class prototypes (SelfTask's CorrectedLabel,
    after Han et al., "Deep Self-Learning From Noisy Labels", ICCV 2019).

    Per class c: up to ``samples_per_class`` nodes currently labelled c; cosine similarities S;
    density ρ_i = Σ_j sign(S_ij − S_c) with S_c the ``percentile``-th percentile of S; η_i = the
    largest similarity to a denser node (min_j S_ij for the densest); nodes with η ≥ ``eta_cap`` get
    ρ = 0; the ``num_prototypes`` densest remaining are the prototypes. Each node of ``idx`` takes
    the class whose prototypes it is most similar to on average. Returns ``(len(idx),) int64``.
    """
    emb = nn.functional.normalize(embeddings.detach(), dim=1)
    score = torch.full((idx.numel(), num_classes), -2.0, device=emb.device)
    for c in range(num_classes):  # loop over classes (few); each step is vectorised
        members = random_subset(torch.nonzero(labels == c).flatten(), samples_per_class, generator)
        if members.numel() == 0:
            continue
        s = emb[members] @ emb[members].t()
        s_c = torch.quantile(s.flatten(), percentile / 100.0)
        rho = torch.sign(s - s_c).sum(1)
        denser = rho.unsqueeze(0) > rho.unsqueeze(1)  # denser[i, j]: j is denser than i
        eta = torch.where(denser, s, torch.full_like(s, -2.0)).max(1).values
        eta = torch.where(denser.any(1), eta, s.min(1).values)
        rho = torch.where(eta >= eta_cap, torch.zeros_like(rho), rho)
        protos = members[torch.argsort(rho, stable=True)[-num_prototypes:]]
        score[:, c] = (emb[idx] @ emb[protos].t()).mean(1)
    return score.argmax(1)


class CorrectedLabel(ContextLabel):
    """ContextLabel + ``alpha`` · MSE against the context distribution of corrected pseudo-labels:
    every step, ``num_sampled`` unlabelled nodes are relabelled by :func:`prototype_correction` on
    the current (detached) hidden layer, and the neighbour distribution is recomputed."""

    name = "correctedlabel"

    def __init__(
        self, hidden: int, num_classes: int, method: str = "ica", alpha: float = 1.5, num_sampled: int = 1000, dropout: float = 0.5
    ) -> None:
        super().__init__(hidden, num_classes, method, dropout)
        self.alpha = alpha
        self.num_sampled = num_sampled

    def loss(self, hidden: Tensor, generator: torch.Generator) -> Tensor:
        unlabelled = torch.nonzero(~self.labelled).flatten()
        sampled = random_subset(unlabelled, self.num_sampled, generator)
        corrected = self.assignment.clone()
        corrected[sampled] = prototype_correction(hidden, self.assignment, sampled, self.num_classes, generator)
        target, has = neighbour_label_distribution(self.structure, corrected, self.num_classes)
        out = self.output(hidden)
        base = nn.functional.mse_loss(out[self.used], self.target[self.used])
        keep = sampled[has[sampled]]
        return base + self.alpha * nn.functional.mse_loss(out[keep], target[keep])
