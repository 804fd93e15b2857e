"""Pseudo-labels from the few known labels, in torch: label propagation, ICA, and the neighbour
label distribution that SelfTask's ContextLabel task regresses.

- :func:`label_propagation`: the harmonic function of Zhu, Ghahramani and Lafferty (ICML 2003),
  ``F ← D⁻¹AF`` with the labelled rows clamped, iterated to a fixed point.
- :func:`ica`: iterative classification (Lu & Getoor, ICML 2003; Sen et al., AI Magazine 2008): a
  local logistic regression on features bootstraps labels, then a relational logistic regression on
  ``[features, neighbour label counts]`` relabels the unlabelled nodes until nothing changes. Updates
  are synchronous (all unlabelled nodes at once) where the reference's ``ica`` package updates nodes
  one at a time in random order; synchronous updates are deterministic and vectorised.
- :func:`neighbour_label_distribution`: per node, the label histogram over its 1-hop neighbours plus
  its 2-hop neighbourhood (the structure of A², self excluded), normalised to sum to 1 (SelfTask-GNN,
  Jin et al. 2020, "context" of a node).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from threefold.graphs.probes import LogisticRegression
from threefold.graphs.selftask.graph_distances import adjacency


def label_propagation(
    edge_index: Tensor, num_nodes: int, labels: Tensor, labelled: Tensor, num_classes: int,
    max_iter: int = 1000, tol: float = 1e-6,
) -> Tensor:
    """Class probabilities ``(N, C) float32`` of the harmonic solution.

    ``labels (N,) int64`` are read only at ``labelled (N,) bool``. Nodes in a component without any
    labelled node get the uniform distribution (no information), not class 0.
    """
    a = adjacency(edge_index, num_nodes)
    deg = torch.sparse.mm(a, torch.ones(num_nodes, 1, device=labels.device)).squeeze(1)
    clamp = torch.nn.functional.one_hot(labels[labelled], num_classes).float()
    f = torch.zeros(num_nodes, num_classes, device=labels.device)
    f[labelled] = clamp
    inv = torch.where(deg > 0, 1.0 / deg.clamp(min=1), torch.zeros_like(deg)).unsqueeze(1)
    for _ in range(max_iter):
        nxt = inv * torch.sparse.mm(a, f)
        nxt[labelled] = clamp
        delta = (nxt - f).abs().max()
        f = nxt
        if delta < tol:
            break
    mass = f.sum(1, keepdim=True)
    return torch.where(mass > 0, f / mass.clamp(min=1e-12), torch.full_like(f, 1.0 / num_classes))


def _neighbour_counts(a: Tensor, assignment: Tensor, num_classes: int) -> Tensor:
    return torch.sparse.mm(a, torch.nn.functional.one_hot(assignment, num_classes).float())


def ica(
    x: Tensor, edge_index: Tensor, labels: Tensor, labelled: Tensor, num_classes: int, max_iter: int = 10, c: float = 1.0,
) -> tuple[Tensor, Tensor, bool]:
    """Iterative classification. Returns (probabilities (N, C), assignment (N,) int64, converged).

    The relational features are ``[x, counts of each class among 1-hop neighbours]`` ("count"
    aggregation, as the reference). Labelled nodes keep their labels and probabilities one-hot.
    """
    n = x.shape[0]
    a = adjacency(edge_index, n)
    local = LogisticRegression(x.shape[1], num_classes, c).fit(x[labelled], labels[labelled])
    probs = local.predict_proba(x)
    assignment = torch.where(labelled, labels, probs.argmax(1))
    rel_x = torch.cat([x, _neighbour_counts(a, assignment, num_classes)], 1)
    relational = LogisticRegression(rel_x.shape[1], num_classes, c).fit(rel_x[labelled], labels[labelled])
    converged = False
    for _ in range(max_iter):
        rel_x = torch.cat([x, _neighbour_counts(a, assignment, num_classes)], 1)
        probs = relational.predict_proba(rel_x)
        new = torch.where(labelled, labels, probs.argmax(1))
        if torch.equal(new, assignment):
            converged = True
            break
        assignment = new
    probs = probs.clone()
    probs[labelled] = torch.nn.functional.one_hot(labels[labelled], num_classes).float()
    return probs, assignment, converged


def two_hop_structure(edge_index: Tensor, num_nodes: int) -> tuple[Tensor, Tensor]:
    """(A, B) sparse binary ``(N, N)``: A the 1-hop adjacency, B the nonzero pattern of A² without
    the diagonal (nodes reachable by a walk of length 2)."""
    a = adjacency(edge_index, num_nodes)
    with warnings.catch_warnings():  # sparse @ sparse goes through CSR internally, which warns "beta"
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        a2 = torch.sparse.mm(a, a).coalesce()
    idx = a2.indices()
    idx = idx[:, idx[0] != idx[1]]
    ones = torch.ones(idx.shape[1], device=idx.device)
    b = torch.sparse_coo_tensor(idx, ones, a.shape, is_coalesced=True, check_invariants=False)
    return a, b


def neighbour_label_distribution(
    structure: tuple[Tensor, Tensor], assignment: Tensor, num_classes: int
) -> tuple[Tensor, Tensor]:
    """Label histogram over 1-hop plus 2-hop neighbours, normalised: ``(N, C) float32``, and a mask
    ``(N,) bool`` of nodes that have any neighbour (isolated nodes get a zero row and mask False)."""
    a, b = structure
    onehot = torch.nn.functional.one_hot(assignment, num_classes).float()
    counts = torch.sparse.mm(a, onehot) + torch.sparse.mm(b, onehot)
    total = counts.sum(1, keepdim=True)
    has = total.squeeze(1) > 0
    return torch.where(total > 0, counts / total.clamp(min=1e-12), torch.zeros_like(counts)), has
