"""Hop distances on large sparse graphs without an N×N matrix (SelfTask pretext targets).

Breadth-first search from a batch of sources, advanced for all of them at once as a sparse-dense
product ``frontier (S, N) @ A (N, N)``; memory is O(chunk · N), the time O(depth · chunk · E).
"""

from __future__ import annotations

import torch
from torch import Tensor


def adjacency(edge_index: Tensor, num_nodes: int) -> Tensor:
    """Binary symmetric sparse COO adjacency ``(N, N) float32`` (coalesced) without self loops, on
    edge_index's device."""
    src, dst = edge_index
    keep = src != dst
    idx = torch.cat([torch.stack([src[keep], dst[keep]]), torch.stack([dst[keep], src[keep]])], 1)
    ones = torch.ones(idx.shape[1], device=edge_index.device)
    a = torch.sparse_coo_tensor(idx, ones, (num_nodes, num_nodes), check_invariants=False).coalesce()
    return torch.sparse_coo_tensor(a.indices(), torch.ones_like(a.values()), a.shape, is_coalesced=True, check_invariants=False)


def bfs_distances(
    edge_index: Tensor, num_nodes: int, sources: Tensor, max_depth: int | None = None, chunk: int = 512,
    dtype: torch.dtype = torch.int32,
) -> Tensor:
    """Shortest-path hop counts ``(S, N)`` of ``dtype`` from each node of ``sources (S,)``; -1 =
    unreachable (or farther than ``max_depth``); 0 at the source itself. ``dtype`` must hold the
    largest distance (``torch.int8`` suffices for ``max_depth`` ≤ 127 and saves memory)."""
    if max_depth is not None and max_depth > torch.iinfo(dtype).max:
        raise ValueError(f"max_depth={max_depth} does not fit {dtype}")
    a = adjacency(edge_index, num_nodes)
    out = torch.full((sources.numel(), num_nodes), -1, dtype=dtype, device=edge_index.device)
    limit = num_nodes if max_depth is None else max_depth
    for lo in range(0, sources.numel(), chunk):  # bounded memory: chunk × N per step
        src = sources[lo : lo + chunk]
        rows = torch.arange(src.numel(), device=src.device)
        dist = out[lo : lo + chunk]
        dist[rows, src] = 0
        frontier = torch.zeros(src.numel(), num_nodes, device=src.device)
        frontier[rows, src] = 1.0
        for depth in range(1, limit + 1):
            # (A @ frontierᵀ)ᵀ = frontier @ A since A is symmetric
            reached = torch.sparse.mm(a, frontier.t()).t() > 0
            new = reached & (dist < 0)
            if not new.any():
                break
            dist[new] = depth
            frontier = new.float()
    return out
