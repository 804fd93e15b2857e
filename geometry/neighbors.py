"""Neighbourhood queries on point clouds: k nearest neighbours, ball query, gather and grouping.

These are the grouping operators of PointNet++ (Qi et al., "PointNet++: Deep Hierarchical Feature
Learning on Point Sets in a Metric Space", NeurIPS 2017, §3.2) and of Point-MAE (Pang et al.,
"Masked Autoencoders for Point Cloud Self-supervised Learning", ECCV 2022, §3.1), written in plain
torch so they run on CPU and CUDA without compiled extensions.

Shapes: a point set is ``(B, N, D)`` (batched) or ``(N, D)`` (one cloud); coordinates are float32 or
float64 in the caller's unit (metres for LiDAR, unit-sphere-normalised for ShapeNet). Indices are
int64 and refer to the second-to-last axis of ``ref``.

Memory is bounded: no ``(N, M)`` distance matrix is ever formed for the whole cloud; distances are
computed in query blocks of at most :data:`BLOCK_ELEMENTS` pairs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from threefold.datasets.errors import ConfigError, DataFormatError

#: Upper bound on the number of (query, reference) pairs whose distances are held at once.
BLOCK_ELEMENTS = 1 << 23


def _as_batched(points: Tensor, name: str) -> tuple[Tensor, bool]:
    """Return ``(B, N, D)`` and whether the input was unbatched ``(N, D)``."""
    if points.dim() == 2:
        return points.unsqueeze(0), True
    if points.dim() == 3:
        return points, False
    raise DataFormatError(f"{name}: expected shape (B, N, D) or (N, D), got {tuple(points.shape)}")


def _check_pair(query: Tensor, ref: Tensor) -> tuple[Tensor, Tensor, bool]:
    q, q_unbatched = _as_batched(query, "query")
    r, r_unbatched = _as_batched(ref, "ref")
    if q_unbatched != r_unbatched:
        raise DataFormatError(
            f"query {tuple(query.shape)} and ref {tuple(ref.shape)}: both must be batched (B, N, D) or both (N, D)"
        )
    if q.shape[0] != r.shape[0] or q.shape[2] != r.shape[2]:
        raise DataFormatError(
            f"query {tuple(query.shape)} and ref {tuple(ref.shape)}: batch size and point dimension D must match"
        )
    if not q.is_floating_point() or q.dtype != r.dtype:
        raise DataFormatError(f"query dtype {q.dtype} and ref dtype {r.dtype}: expected the same floating dtype")
    if q.device != r.device:
        raise DataFormatError(f"query on {q.device} and ref on {r.device}: expected the same device")
    return q, r, q_unbatched


def _pair_sq_dist(q: Tensor, r: Tensor) -> Tensor:
    """Squared distances ``(B, Q, M)`` by explicit differences.

    The expansion ``|q|^2 - 2 q.r + |r|^2`` is faster but cancels catastrophically for nearby points,
    which reorders close neighbours; the explicit form is exact up to one rounding per term.
    """
    d = (q[:, :, None, 0] - r[:, None, :, 0]).square_()
    for c in range(1, q.shape[-1]):
        d.add_((q[:, :, None, c] - r[:, None, :, c]).square_())
    return d


def _dense_knn_idx(q: Tensor, r: Tensor, k: int) -> Tensor:
    """Indices ``(B, Q, k)`` of the k nearest rows of ``r`` by blocked brute force."""
    b, nq, _ = q.shape
    m = r.shape[1]
    step = max(1, BLOCK_ELEMENTS // max(1, b * m))
    out = torch.empty(b, nq, k, dtype=torch.long, device=q.device)
    for s in range(0, nq, step):
        d = _pair_sq_dist(q[:, s : s + step], r)
        out[:, s : s + step] = d.topk(k, dim=2, largest=False, sorted=True).indices
    return out


def knn_indices(query: Tensor, ref: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` nearest reference points of each query point, nearest first.

    ``query (B, Q, D)``, ``ref (B, M, D)`` (or both unbatched) -> ``idx (B, Q, k)`` int64 (or ``(Q, k)``).
    Not differentiable (indices); :func:`knn` adds the distances with gradients.
    Points at exactly equal distance may come in either order.
    """
    q, r, unbatched = _check_pair(query, ref)
    if not 1 <= k <= r.shape[1]:
        raise ConfigError(f"knn: k={k} must be between 1 and the number of reference points ({r.shape[1]})")
    with torch.no_grad():
        idx = _dense_knn_idx(q.detach(), r.detach(), k)
    return idx[0] if unbatched else idx


def knn(query: Tensor, ref: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """k nearest neighbours (PointNet++ §3.2 kNN grouping; Point-MAE §3.1 patch grouping).

    Args:
        query: ``(B, Q, D)`` or ``(Q, D)`` float, the points whose neighbours are wanted.
        ref: ``(B, M, D)`` or ``(M, D)`` float, same dtype and device; ``k <= M``.
        k: number of neighbours; a query point that is also in ``ref`` finds itself first.

    Returns:
        ``dist (B, Q, k)`` Euclidean distances in the coordinates' unit, ascending, differentiable
        with respect to both inputs; ``idx (B, Q, k)`` int64 row indices into ``ref``.
    """
    idx = knn_indices(query, ref, k)
    neighbours = index_points(ref, idx)
    dist = (neighbours - query.unsqueeze(-2)).square().sum(-1).sqrt()
    return dist, idx


def ball_query(query: Tensor, ref: Tensor, radius: float, k: int) -> tuple[Tensor, Tensor]:
    """Ball query of PointNet++ (§3.2): up to ``k`` reference points within ``radius`` of each query.

    Convention (that of the PointNet++ CUDA op ``query_ball_point``): the *first* ``k`` reference points
    in index order with squared distance ``< radius**2`` are taken (not the nearest ``k``), and a ball
    with fewer than ``k`` points is padded by repeating its first found index. A ball with no point at
    all is filled with index 0, as in the reference op; ``count`` tells such rows apart.

    Args:
        query: ``(B, Q, D)`` or ``(Q, D)`` float.
        ref: ``(B, M, D)`` or ``(M, D)`` float, same dtype and device.
        radius: ball radius in the coordinates' unit, > 0.
        k: maximum number of points per ball (``nsample``).

    Returns:
        ``idx (B, Q, k)`` int64 indices into ``ref``, ascending within the found part;
        ``count (B, Q)`` int64 number of points found, clipped to ``k``.
    """
    q, r, unbatched = _check_pair(query, ref)
    if not radius > 0:
        raise ConfigError(f"ball_query: radius={radius} must be > 0")
    if k < 1:
        raise ConfigError(f"ball_query: k={k} must be >= 1")
    with torch.no_grad():
        idx, count = _dense_ball_query(q.detach(), r.detach(), radius, k)
    return (idx[0], count[0]) if unbatched else (idx, count)


def _dense_ball_query(q: Tensor, r: Tensor, radius: float, k: int) -> tuple[Tensor, Tensor]:
    b, nq, _ = q.shape
    m = r.shape[1]
    step = max(1, BLOCK_ELEMENTS // max(1, b * m))
    idx = torch.empty(b, nq, k, dtype=torch.long, device=q.device)
    count = torch.empty(b, nq, dtype=torch.long, device=q.device)
    # An out-of-ball point gets key m, so the k smallest keys are the first k in-ball indices.
    arange = torch.arange(m, device=q.device)
    for s in range(0, nq, step):
        inside = _pair_sq_dist(q[:, s : s + step], r) < radius * radius
        keys = torch.where(inside, arange, m)
        kk = min(k, m)
        first = keys.topk(kk, dim=2, largest=False, sorted=True).values
        if kk < k:
            first = torch.cat([first, first.new_full((*first.shape[:2], k - kk), m)], dim=2)
        idx[:, s : s + step], count[:, s : s + step] = _pad_with_first(first, m)
    return idx, count


def _pad_with_first(first: Tensor, missing: int) -> tuple[Tensor, Tensor]:
    """Replace the ``missing`` marker by the row's first index (0 for an empty row)."""
    found = first != missing
    count = found.sum(-1)
    head = torch.where(found[..., :1], first[..., :1], 0)
    return torch.where(found, first, head), count


def index_points(points: Tensor, idx: Tensor) -> Tensor:
    """Gather rows of a point set by index (PointNet++ ``index_points`` / ``gather_operation``).

    ``points (B, N, C)`` with ``idx (B, *S)`` int64 -> ``(B, *S, C)``; or unbatched ``points (N, C)``
    with ``idx (*S)`` -> ``(*S, C)``. Differentiable with respect to ``points``.
    """
    if idx.dtype != torch.long:
        raise DataFormatError(f"index_points: idx dtype {idx.dtype}, expected torch.int64")
    if points.dim() == 2:
        return points[idx]
    if points.dim() != 3 or idx.dim() < 1 or idx.shape[0] != points.shape[0]:
        raise DataFormatError(
            f"index_points: points {tuple(points.shape)} and idx {tuple(idx.shape)}: expected (B, N, C) and (B, ...)"
        )
    b, _, c = points.shape
    flat = idx.reshape(b, -1)
    out = points.gather(1, flat.unsqueeze(-1).expand(b, flat.shape[1], c))
    return out.reshape(*idx.shape, c)


def group_patches(points: Tensor, centers: Tensor, k: int, features: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Group the ``k`` nearest points of each centre into a patch re-centred on it (Point-MAE §3.1).

    Args:
        points: ``(B, N, 3)`` or ``(N, 3)`` coordinates.
        centers: ``(B, G, 3)`` or ``(G, 3)`` patch centres (typically farthest-point samples of ``points``).
        k: points per patch.
        features: optional ``(B, N, C)`` or ``(N, C)`` per-point features grouped alongside.

    Returns:
        ``patches (B, G, k, 3 [+ C])``: neighbour coordinates minus their centre (then the grouped
        features, not re-centred), nearest first; ``idx (B, G, k)`` int64 indices into ``points``.
    """
    idx = knn_indices(centers, points, k)
    patches = index_points(points, idx) - centers.unsqueeze(-2)
    if features is not None:
        if features.shape[:-1] != points.shape[:-1]:
            raise DataFormatError(
                f"group_patches: features {tuple(features.shape)} must match points {tuple(points.shape)} but for the last axis"
            )
        patches = torch.cat([patches, index_points(features, idx)], dim=-1)
    return patches, idx
