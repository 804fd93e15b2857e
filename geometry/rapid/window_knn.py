"""Exact same-RoI k nearest neighbours by azimuth windows: the torch search behind RAPiD features.

A spinning LiDAR's ring is a curve around the sensor, so a point's nearest ring-mates are almost
always its neighbours in azimuth. The search sorts the points once by (RoI, azimuth about the sensor's
vertical axis) and gives every query the same fixed window of candidates, ``w`` sorted positions on
each side (circularly inside its RoI), so a whole scan is one gather, one distance pass and one
``topk``, whatever the number of RoIs.

Exactness. Every point left out of a query q's window has an azimuth at least Δ away from q's, where
Δ is the smaller angular gap between q and the first excluded point on either side (the excluded points
are one arc of the sorted circle, so its nearest angle is one of its ends). A point on the half-plane
at azimuth offset Δ ≤ π/2 is at least ``ρ_q sin Δ`` from q (ρ_q: q's distance from the vertical axis
through the sensor; for Δ > π/2 the bound is ρ_q), in 3D as in the xy-plane. So when q's own k-th
candidate distance is below that bound, no excluded point can displace any of its k nearest, and the
window's answer is the exact kNN. Queries that fail the check (depth edges, points near the sensor's
axis, class RoIs whose members share an azimuth at many ranges) are searched again with a window
``WINDOW_GROWTH`` times wider; a window that covers the whole RoI is exact by definition, so the loop
ends after at most log_4(largest RoI) + 1 rounds. The bound holds for any point set, so class RoIs
(C-RAPiD) are exact too, only with more retries.

Memory is bounded by :data:`PAIR_BUDGET` (query, candidate) pairs per block (about 40 bytes each).
Distances are float64 by explicit differences, as the kd-tree computes them on the NumPy path.
Among exactly equidistant candidates at the k-th place the choice is ``topk``'s (the kd-tree's is its
own); such ties only change a feature when the tied points differ in remission.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["azimuth_window_knn", "WINDOW", "WINDOW_GROWTH", "PAIR_BUDGET"]

#: Candidates per side of the first window. 16 settles 93 % of the queries of the real 124,668-point
#: 64-beam scan at k = 10 / 7 / 5 (benchmarks/rapid_features.py prints the rounds).
WINDOW = 16
#: Factor by which the window widens for the queries whose exactness check failed (8 saves a round on
#: ring RoIs but doubles the pairs searched for class RoIs, where many points share an azimuth).
WINDOW_GROWTH = 4
#: (query, candidate) pairs per block: a 120k-point scan's first round is one block on a GPU.
PAIR_BUDGET = {"cuda": 1 << 23, "cpu": 1 << 21}

_TWO_PI = 2.0 * math.pi


def azimuth_window_knn(coord: Tensor, roi: Tensor, k_pt: Tensor, origin: Tensor | None = None,
                       window: int = WINDOW, stats: dict | None = None) -> tuple[Tensor, Tensor]:
    """The ``k_pt[j]`` nearest points of each point j inside its own RoI, self excluded (exact).

    Args:
        coord: (M, 3) float coordinates, metres (any device; computed in float64).
        roi: (M,) int64 RoI id of each point, all >= 0 (callers drop points without a RoI first).
        k_pt: (M,) int64 neighbours wanted per point, >= 1.
        origin: (3,) sensor position, the azimuth centre (default the coordinate origin). Any centre
            gives exact results; the sensor gives the narrowest windows for ring RoIs.
        window: candidates per side in the first round.
        stats: if a dict is given, ``stats["rounds"]`` receives a list of (window, queries searched)
            per round (for tests and benchmarks).

    Returns:
        idx (M, K) int64 row indices into ``coord`` and dist (M, K) float64 3D distances, K = max(k_pt),
        nearest first. Columns beyond ``k_pt[j]`` hold further candidates (not guaranteed to be the
        true next neighbours; callers mask them). A RoI of m <= k_pt[j] points gives its points
        m - 1 neighbours, the rest of the row -1 / inf.
    """
    dev = coord.device
    m = coord.shape[0]
    kq = int(k_pt.max()) if m else 1
    idx_s = torch.full((m, kq), -1, dtype=torch.long, device=dev)
    dist_s = torch.full((m, kq), float("inf"), dtype=torch.float64, device=dev)
    if stats is not None:
        stats["rounds"] = []
    if m == 0:
        return idx_s, dist_s
    x = coord.double()
    rel = x if origin is None else x - origin.to(device=dev, dtype=torch.float64)
    phi = torch.atan2(rel[:, 1], rel[:, 0])
    phi = torch.where(phi < 0, phi + _TWO_PI, phi)  # [0, 2π]
    rxy = torch.hypot(rel[:, 0], rel[:, 1])
    _, rank, counts = torch.unique(roi, return_inverse=True, return_counts=True)
    # one sort by (RoI, azimuth): rank·8 + φ keeps RoIs apart since φ <= 2π < 8
    order = torch.argsort(rank.double() * 8.0 + phi)
    starts = torch.cumsum(counts, 0) - counts
    rk = rank[order]
    st, ln = starts[rk], counts[rk]
    loc = torch.arange(m, device=dev) - st
    sx, sy, sz = (x[order, c].contiguous() for c in range(3))
    phis, rs, ks = phi[order], rxy[order], k_pt[order]
    max_len = int(counts.max())
    budget = PAIR_BUDGET.get(dev.type, PAIR_BUDGET["cpu"])

    w = max(int(window), (kq + 1) // 2)  # 2w candidates must hold the k nearest
    todo: Tensor | None = None  # None: every query (first round, no gather of the query set)
    while True:
        n_todo = m if todo is None else todo.numel()
        if n_todo == 0:
            break
        if stats is not None:
            stats["rounds"].append((w, n_todo))
        w_eff = min(w, max_len)  # a window wider than the largest RoI covers every RoI
        off = torch.cat([torch.arange(-w_eff, 0, device=dev), torch.arange(1, w_eff + 1, device=dev)])
        step = max(1, budget // off.numel())
        failed = []
        for s in range(0, n_todo, step):
            q = torch.arange(s, min(n_todo, s + step), device=dev) if todo is None else todo[s:s + step]
            length, i, first = ln[q], loc[q], st[q]
            # a, b: candidates taken on the left and the right; a + b = L - 1 covers the whole RoI
            a = torch.clamp((length - 1) // 2, max=w_eff)
            b = torch.minimum(length - 1 - a, torch.full_like(a, w_eff))
            valid = (off[None, :] >= -a[:, None]) & (off[None, :] <= b[:, None])
            cand = first[:, None] + torch.remainder(i[:, None] + off[None, :], length[:, None])
            d2 = (sx[cand] - sx[q, None]).square_()
            d2.add_((sy[cand] - sy[q, None]).square_()).add_((sz[cand] - sz[q, None]).square_())
            d2.masked_fill_(~valid, float("inf"))
            kk = min(kq, off.numel())
            best, at = torch.topk(d2, kk, dim=1, largest=False, sorted=True)
            best_c = cand.gather(1, at)
            whole = (a + b) == (length - 1)
            # exactness check: the query's own k-th distance against the azimuth-gap bound
            left = first + torch.remainder(i - a - 1, length)
            right = first + torch.remainder(i + b + 1, length)
            gap = torch.minimum(torch.remainder(phis[q] - phis[left], _TWO_PI),
                                torch.remainder(phis[right] - phis[q], _TWO_PI)).clamp_(max=math.pi / 2)
            # margin: φ and ρ carry float64 rounding of ~1e-16 relative; 1e-9 m is far above it
            bound = (rs[q] * torch.sin(gap) - 1e-9).clamp_min(0.0)
            kth = best.gather(1, (ks[q] - 1).clamp(max=kk - 1)[:, None]).squeeze(1)
            ok = whole | (kth < bound.square())
            found = torch.isfinite(best)
            rows = q[ok]
            idx_s[rows, :kk] = torch.where(found, best_c, torch.full_like(best_c, -1))[ok]
            dist_s[rows, :kk] = best.sqrt()[ok]
            failed.append(q[~ok])
        todo = torch.cat(failed)
        w *= WINDOW_GROWTH
    # back from sorted positions to input rows
    idx_o = torch.where(idx_s >= 0, order[idx_s.clamp_min(0)], idx_s)
    idx = torch.empty_like(idx_o)
    dist = torch.empty_like(dist_s)
    idx[order] = idx_o
    dist[order] = dist_s
    return idx, dist
