"""Neighbourhood queries on point clouds: k nearest neighbours, ball query, gather and grouping.

These are the grouping operators of PointNet++ (Qi et al., "PointNet++: Deep Hierarchical Feature
Learning on Point Sets in a Metric Space", NeurIPS 2017, §3.2) and of Point-MAE (Pang et al.,
"Masked Autoencoders for Point Cloud Self-supervised Learning", ECCV 2022, §3.1), written in plain
torch so they run on CPU and CUDA without compiled extensions.

Shapes: a point set is ``(B, N, D)`` (batched) or ``(N, D)`` (one cloud); coordinates are float32 or
float64 in the caller's unit (metres for LiDAR, unit-sphere-normalised for ShapeNet). Indices are
int64 and refer to the second-to-last axis of ``ref``.

Three-dimensional queries go through a uniform grid: reference points are sorted by cell, and each
query looks at the 3x3x3 cells around its own (nine contiguous runs of the sorted order, found with
``searchsorted``). The search is exact: a kNN answer is accepted only when the k-th distance is shorter
than the distance from the query to the outside of the searched block; the other queries are retried
on a grid of twice the cell size, and the last few by brute force. On CUDA with Triton installed the
candidate scan of float32 kNN runs in one kernel (:mod:`threefold.geometry.knn_triton`). The ball query uses cells at least
``radius`` wide, so the block always contains the whole ball. Other dimensions use blocked brute force.

Memory is bounded: no ``(N, M)`` distance matrix is ever formed for the whole cloud; distances are
computed in query blocks of at most :data:`BLOCK_ELEMENTS` (query, candidate) pairs on CPU and
:data:`BLOCK_ELEMENTS_CUDA` on CUDA (about 40 bytes of temporaries per pair).
"""

from __future__ import annotations

import torch
from torch import Tensor

from threefold.datasets.errors import ConfigError, DataFormatError

#: Upper bound on the number of (query, reference) pairs whose distances are held at once.
BLOCK_ELEMENTS = 1 << 23
#: The same bound on CUDA, where fewer, larger blocks save kernel launches and host synchronisations.
BLOCK_ELEMENTS_CUDA = 1 << 25


def _block_budget(device: torch.device) -> int:
    return BLOCK_ELEMENTS_CUDA if device.type == "cuda" else BLOCK_ELEMENTS
#: Brute force is used when a cloud has at most GRID_MIN_REF reference points or the problem has at
#: most DENSE_MAX_PAIRS (query, reference) pairs: the grid's set-up then costs more than it saves.
GRID_MIN_REF = 4096
DENSE_MAX_PAIRS = 1 << 18


def _use_grid(q: Tensor, r: Tensor) -> bool:
    return q.shape[2] == 3 and r.shape[1] > GRID_MIN_REF and q.shape[0] * q.shape[1] * r.shape[1] > DENSE_MAX_PAIRS
#: Mean reference points per grid cell for kNN, as a multiple of k (a cell must hold the k-th
#: neighbour of most queries: 0.24 k is the break-even for uniform density).
KNN_CELL_FILL = 0.4
#: Scan kNN candidates with the Triton kernel (geometry/knn_triton.py) for float32 on CUDA when available.
USE_TRITON = True
#: Grid rounds (cell size doubling each time) before the remaining kNN queries fall back to brute force.
KNN_GRID_ROUNDS = 4


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
    if not bool(torch.isfinite(q).all() & torch.isfinite(r).all()):
        raise DataFormatError("query / ref: coordinates contain NaN or inf; expected finite values")
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
    step = max(1, _block_budget(q.device) // max(1, b * m))
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
        if _use_grid(q, r):
            idx = _grid_knn_idx(q.detach(), r.detach(), k)
        else:
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
        if _use_grid(q, r):
            idx, count = _grid_ball_query(q.detach(), r.detach(), radius, k)
        else:
            idx, count = _dense_ball_query(q.detach(), r.detach(), radius, k)
    return (idx[0], count[0]) if unbatched else (idx, count)


def _dense_ball_query(q: Tensor, r: Tensor, radius: float, k: int) -> tuple[Tensor, Tensor]:
    b, nq, _ = q.shape
    m = r.shape[1]
    step = max(1, _block_budget(q.device) // max(1, b * m))
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


class _Grid:
    """Reference points of every cloud sorted by cell of a uniform grid (cell size per cloud)."""

    def __init__(self, q: Tensor, r: Tensor, cell: Tensor) -> None:
        b, m, _ = r.shape
        self.b, self.m = b, m
        self.lo = torch.minimum(q.amin(1), r.amin(1))  # (B, 3)
        extent = torch.maximum(q.amax(1), r.amax(1)) - self.lo
        # Cap the cells per axis so that cell keys of all clouds fit in int64.
        max_cells = 1 << max(1, (62 - max(b - 1, 1).bit_length()) // 3)
        self.cell = torch.maximum(cell, extent.amax(1) / (max_cells - 1)).clamp_min(torch.finfo(r.dtype).tiny)
        self.dims = (extent / self.cell[:, None]).floor().long() + 1  # (B, 3)
        ncell = self.dims.prod(1)
        self.base = torch.cumsum(ncell, 0) - ncell
        rc = self._cells(r)
        keys, self.perm = self._key(rc, torch.arange(b, device=r.device)[:, None]).view(-1).sort()
        self.keys = keys.contiguous()
        self.sorted_ref = r.reshape(-1, 3).index_select(0, self.perm)  # (B*M, 3)
        self.sorted_local = self.perm % m  # index within its own cloud

    def _cells(self, pts: Tensor) -> Tensor:
        c = ((pts - self.lo[:, None]) / self.cell[:, None, None]).floor().long()
        return torch.minimum(c.clamp_min(0), self.dims[:, None] - 1)

    def _key(self, c: Tensor, batch: Tensor) -> Tensor:
        ny, nz = self.dims[batch, 1], self.dims[batch, 2]
        return self.base[batch] + (c[..., 0] * ny + c[..., 1]) * nz + c[..., 2]

    def runs(self, q_rows: Tensor, batch: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Nine runs of the sorted reference order around each query row ``(R, 3)`` of cloud
        ``batch (R,)``: ``start, count (R, 9)``, and ``bound (R,)``, the distance from the query to the
        outside of its 3x3x3 block (inf where the block reaches the grid edge on every side)."""
        dims = self.dims[batch]
        pos = q_rows - self.lo[batch]
        cell = self.cell[batch, None]
        c = torch.minimum((pos / cell).floor().long().clamp_min(0), dims - 1)
        step = torch.tensor([-1, 0, 1], device=q_rows.device)
        cx = c[:, 0, None, None] + step[:, None]  # (BQ, 3, 1)
        cy = c[:, 1, None, None] + step[None, :]  # (BQ, 1, 3)
        inside = (cx >= 0) & (cx < dims[:, 0, None, None]) & (cy >= 0) & (cy < dims[:, 1, None, None])
        z_lo = (c[:, 2] - 1).clamp_min(0)[:, None, None]
        z_hi = torch.minimum(c[:, 2] + 1, dims[:, 2] - 1)[:, None, None]
        col = self.base[batch, None, None] + (cx * dims[:, 1, None, None] + cy) * dims[:, 2, None, None]
        start = torch.searchsorted(self.keys, (col + z_lo).view(-1, 9))
        end = torch.searchsorted(self.keys, (col + z_hi).view(-1, 9), right=True)
        count = torch.where(inside.view(-1, 9), end - start, 0)
        below = torch.where(c >= 1, pos - (c - 1) * cell, float("inf"))
        above = torch.where(c + 2 <= dims - 1, (c + 2) * cell - pos, float("inf"))
        return start, count, torch.minimum(below, above).amin(1)

    def candidates(self, q_rows: Tensor, start: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
        """Candidates of a block of queries ``(R, 3)`` with runs ``start, count (R, runs)``: position in
        the sorted reference order ``(R, C)`` (unspecified where there is none) and squared distance
        ``(R, C)`` (inf where there is none)."""
        rows, runs = count.shape
        dev = count.device
        total = count.sum(1)
        width = max(1, int(total.max()))
        n_cand = int(total.sum())
        # Flat list of every (query, candidate) pair, then scattered into a padded (R, width) table.
        flat_count = count.view(-1)
        run_of = torch.repeat_interleave(torch.arange(rows * runs, device=dev), flat_count, output_size=n_cand)
        row_of = torch.repeat_interleave(torch.arange(rows, device=dev), total, output_size=n_cand)
        serial = torch.arange(n_cand, device=dev)
        flat_pos = (start.view(-1) - torch.cumsum(flat_count, 0) + flat_count)[run_of].add_(serial)
        col_of = serial.sub_((torch.cumsum(total, 0) - total)[row_of])
        cand = self.sorted_ref.index_select(0, flat_pos)
        query = q_rows.index_select(0, row_of)
        flat_d2 = (cand[:, 0] - query[:, 0]).square_()
        flat_d2.add_((cand[:, 1] - query[:, 1]).square_()).add_((cand[:, 2] - query[:, 2]).square_())
        # Padding slots of `pos` stay uninitialised: their distance is inf, so they are only ever
        # selected for rows with fewer candidates than asked for, which the callers reject or mask.
        pos = torch.empty(rows, width, dtype=torch.long, device=dev)
        pos.index_put_((row_of, col_of), flat_pos)
        d2 = torch.full((rows, width), float("inf"), dtype=q_rows.dtype, device=dev)
        d2.index_put_((row_of, col_of), flat_d2)
        return pos, d2


def _blocks(count: Tensor) -> list[tuple[int, int]]:
    """Split query rows into consecutive blocks within the pair budget (padded width)."""
    total = count.sum(1)
    n = len(total)
    if n == 0:
        return []
    width = max(1, int(total.max()))
    step = max(1, _block_budget(count.device) // width)
    return [(s, min(n, s + step)) for s in range(0, n, step)]


def _triton_scan():
    try:
        from threefold.geometry.knn_triton import knn_runs_triton
    except ImportError:
        return None
    return knn_runs_triton


def _grid_knn_idx(q: Tensor, r: Tensor, k: int) -> Tensor:
    b, nq, _ = q.shape
    m = r.shape[1]
    extent = (torch.maximum(q.amax(1), r.amax(1)) - torch.minimum(q.amin(1), r.amin(1))).clamp_min(1e-12)
    # Cell size for KNN_CELL_FILL * k points per cell if the cloud filled its box; surfaces are
    # denser than that, so shrink to the median occupancy seen on that first grid.
    cell = (extent.prod(1) * KNN_CELL_FILL * k / m) ** (1 / 3)
    probe = _Grid(q, r, cell)
    _, inverse, occupancy = torch.unique_consecutive(probe.keys, return_inverse=True, return_counts=True)
    # The median over every point's cell occupancy, estimated from a fixed stride of at most 4,096
    # points per cloud (a full median of 120k values costs more than the rest of this setup).
    per_point = occupancy[inverse].view(b, m)[:, :: max(1, m // 4096)].float()
    typical = per_point.median(1).values.to(r.dtype)
    cell = probe.cell * (KNN_CELL_FILL * k / typical).clamp(max=1.0) ** (1 / 3)

    out = torch.empty(b * nq, k, dtype=torch.long, device=q.device)
    todo = torch.arange(b * nq, device=q.device)
    q_flat = q.reshape(-1, 3)
    scan = _triton_scan() if USE_TRITON and q.is_cuda and q.dtype == torch.float32 else None
    for _ in range(KNN_GRID_ROUNDS):
        if todo.numel() == 0:
            break
        grid = _Grid(q, r, cell)
        start, count, bound = grid.runs(q_flat[todo], todo // nq)
        # Visit queries in cell order: neighbouring rows then read neighbouring reference runs.
        order = start[:, 4].argsort()
        todo, start, count, bound = todo[order], start[order], count[order], bound[order]
        failed = []
        for s, e in _blocks(count) if scan is None else [(0, len(todo))]:
            rows = todo[s:e]
            if scan is None:
                pos, d2 = grid.candidates(q_flat[rows], start[s:e], count[s:e])
                kk = min(k, d2.shape[1])
                best_d2, at = d2.topk(kk, dim=1, largest=False, sorted=True)
                best_pos = pos.gather(1, at)
            else:
                kk = k
                best_d2, best_pos = scan(q_flat[rows], grid.sorted_ref, start, count, k)
            # Accept only when no point outside the searched block can be as close as the k-th found.
            ok = (count[s:e].sum(1) >= k) & (best_d2[:, -1] * (1 + 1e-5) < bound[s:e].square())
            if kk == k:
                out[rows[ok]] = grid.sorted_local[best_pos[ok]]
            failed.append(rows[~ok])
        todo = torch.cat(failed) if failed else todo[:0]
        cell = grid.cell * 2
    if todo.numel():
        batch = todo // nq
        for c in range(b):
            rows = todo[batch == c]
            if rows.numel():
                out[rows] = _dense_knn_idx(q_flat[rows][None], r[c : c + 1], k)[0]
    return out.view(b, nq, k)


def _grid_ball_query(q: Tensor, r: Tensor, radius: float, k: int) -> tuple[Tensor, Tensor]:
    b, nq, _ = q.shape
    m = r.shape[1]
    # Cells wider than `radius` (by a margin far above rounding in the cell assignment): the 3x3x3
    # block around a query contains its whole ball.
    grid = _Grid(q, r, torch.full((b,), radius * (1 + 1e-4), dtype=q.dtype, device=q.device))
    start, count, _ = grid.runs(q.reshape(-1, 3), torch.arange(b, device=q.device).repeat_interleave(nq))
    q_flat = q.reshape(-1, 3)
    idx = torch.empty(b * nq, k, dtype=torch.long, device=q.device)
    found = torch.empty(b * nq, dtype=torch.long, device=q.device)
    for s, e in _blocks(count):
        pos, d2 = grid.candidates(q_flat[s:e], start[s:e], count[s:e])
        inside = d2 < radius * radius
        keys = torch.where(inside, grid.sorted_local[pos.masked_fill_(~inside, 0)], m)
        kk = min(k, keys.shape[1])
        first = keys.topk(kk, dim=1, largest=False, sorted=True).values
        if kk < k:
            first = torch.cat([first, first.new_full((len(first), k - kk), m)], dim=1)
        idx[s:e], found[s:e] = _pad_with_first(first, m)
    return idx.view(b, nq, k), found.view(b, nq)


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
