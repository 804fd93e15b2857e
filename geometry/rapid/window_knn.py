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
``WINDOW_GROWTH`` times wider, or at once with windows covering their whole RoI (exact by definition,
the last round) when the remaining queries are few enough (:data:`WHOLE_ROI_PAIRS`); at most
log_4(largest RoI) + 1 rounds. The bound holds for any point set, so class RoIs
(C-RAPiD) are exact too, only with more retries.

Memory is bounded by :data:`PAIR_BUDGET` (query, candidate) pairs per block (about 50 bytes each:
about 420 MiB at the CUDA budget).
Distances are float64 by explicit differences, as the kd-tree computes them on the NumPy path.
Among exactly equidistant candidates at the k-th place the choice is ``topk``'s (the kd-tree's is its
own); such ties only change a feature when the tied points differ in remission.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from threefold.datasets.errors import ConfigError

__all__ = ["azimuth_window_knn", "WINDOW", "WINDOW_GROWTH", "PAIR_BUDGET", "WHOLE_ROI_PAIRS"]

#: Candidates per side of the first window. 16 settles 93 % of the queries of the real 124,668-point
#: 64-beam scan at k = 10 / 7 / 5 (benchmarks/rapid_features.py prints the rounds).
WINDOW = 16
#: Factor by which the window widens for the queries whose exactness check failed (8 saves a round on
#: ring RoIs but doubles the pairs searched for class RoIs, where many points share an azimuth).
WINDOW_GROWTH = 4
#: (query, candidate) pairs per block: a 120k-point scan's first round is one block on a GPU.
PAIR_BUDGET = {"cuda": 1 << 23, "cpu": 1 << 21}

#: The remaining queries get whole-RoI windows (the last round) once that costs at most this many
#: (query, candidate) pairs; before, their windows widen by WINDOW_GROWTH. On the real scan the third
#: round used to be 1,015 queries x 2 x 5,728 candidates (11.6 M pairs, the largest round after the
#: first); a 256-wide round first settles most of them for 0.5 M pairs. Devices not listed (CPU): two
#: blocks of PAIR_BUDGET, the previous rule.
WHOLE_ROI_PAIRS = {"cuda": 1 << 21}

#: backend="auto" on CUDA: the Triton kernel per round (geometry/rapid/window_triton.py) if set, else
#: the torch rounds. Off: on an H100 (docs/gpu-runs/2026-11-26-h100-rapid-features-window.txt) the whole
#: search took 5.2 ms with torch rounds and 9.5 ms with Triton rounds; backend="triton" still selects it.
USE_TRITON = False

_TWO_PI = 2.0 * math.pi


def _triton_round():
    try:
        from threefold.geometry.rapid.window_triton import window_round_triton
    except ImportError:
        return None
    return window_round_triton


def _disable_triton(err: Exception) -> None:
    global USE_TRITON
    USE_TRITON = False
    import warnings

    warnings.warn(f"azimuth_window_knn: the Triton round failed ({type(err).__name__}: {err}); using torch rounds",
                  RuntimeWarning, stacklevel=3)


def azimuth_window_knn(coord: Tensor, roi: Tensor, k_pt: Tensor, origin: Tensor | None = None,
                       window: int | None = None, stats: dict | None = None, k_max: int | None = None,
                       backend: str = "auto", whole_roi_pairs: int | None = None) -> tuple[Tensor, Tensor]:
    """The ``k_pt[j]`` nearest points of each point j inside its own RoI, self excluded (exact).

    Args:
        coord: (M, 3) float coordinates, metres (any device; computed in float64).
        roi: (M,) int64 RoI id of each point, all >= 0 (callers drop points without a RoI first).
        k_pt: (M,) int64 neighbours wanted per point, >= 1.
        origin: (3,) sensor position, the azimuth centre (default the coordinate origin). Any centre
            gives exact results; the sensor gives the narrowest windows for ring RoIs.
        window: candidates per side in the first round (default :data:`WINDOW`, read at call time).
        stats: if a dict is given, ``stats["rounds"]`` receives a list of (window, queries searched)
            per round (for tests and benchmarks).
        k_max: an upper bound of ``k_pt`` known to the caller (saves a device synchronisation).
        backend: "torch" (tensor operations, any device), "triton" (one kernel per round,
            :mod:`~threefold.geometry.rapid.window_triton`) or "auto": Triton for CUDA tensors when it is
            installed and :data:`USE_TRITON` is set (off by default: slower, see there), else torch.
            Both give the same neighbours.
        whole_roi_pairs: override of :data:`WHOLE_ROI_PAIRS` for this device (benchmark sweeps).

    Returns:
        idx (M, K) int64 row indices into ``coord`` and dist (M, K) float64 3D distances, K = k_max or
        max(k_pt), nearest first. Columns beyond ``k_pt[j]`` hold further candidates (not guaranteed
        to be the true next neighbours; callers mask them). A RoI of m <= k_pt[j] points gives its
        points m - 1 neighbours, the rest of the row -1 / inf.

    Written for few kernel launches (a scan's search is launch-bound on a GPU, not compute-bound): the
    first round works on views of the sorted arrays, rows are written unconditionally (a failed
    query's row is overwritten by a later round) and the only synchronisations are the sizes of the
    failed sets.
    """
    dev = coord.device
    m = coord.shape[0]
    kq = (int(k_pt.max()) if m else 1) if k_max is None else int(k_max)
    idx_s = torch.full((m, kq), -1, dtype=torch.long, device=dev)
    dist_s = torch.full((m, kq), float("inf"), dtype=torch.float64, device=dev)
    if stats is not None:
        stats["rounds"] = []
    if m == 0:
        return idx_s, dist_s
    x = coord.double()
    rel = x if origin is None else x - origin.to(device=dev, dtype=torch.float64)
    phi = torch.remainder(torch.atan2(rel[:, 1], rel[:, 0]), _TWO_PI)  # [0, 2π)
    _, rank, counts = torch.unique(roi, return_inverse=True, return_counts=True)
    # one sort by (RoI, azimuth): rank·8 + φ keeps RoIs apart since φ < 2π < 8
    order = torch.argsort(rank.double() * 8.0 + phi)
    # per sorted point, packed so that a round gathers them at once: RoI start, RoI length L, position
    # inside the RoI, ⌊(L-1)/2⌋ and L-1-⌊(L-1)/2⌋ (the most candidates a window can take left / right
    # before it wraps onto itself), and the column of its own k-th neighbour
    first = (torch.cumsum(counts, 0) - counts)[rank[order]]
    length = counts[rank[order]]
    half = torch.div(length - 1, 2, rounding_mode="floor")
    meta = torch.stack([first, length, torch.arange(m, device=dev) - first, half, length - 1 - half,
                        k_pt[order].long() - 1], 1)
    xs = x[order].T.contiguous()  # (3, M): a candidate gather is one index op, the sum over xyz contiguous
    # (2, M): azimuth and distance from the sensor's vertical axis
    polar = torch.stack([phi, torch.linalg.vector_norm(rel[:, :2], dim=1)])[:, order].contiguous()
    max_len = int(counts.max())
    budget = PAIR_BUDGET.get(dev.type, PAIR_BUDGET["cpu"])
    whole = WHOLE_ROI_PAIRS.get(dev.type, 2 * budget) if whole_roi_pairs is None else int(whole_roi_pairs)
    kernel = _triton_round() if (backend == "triton" or (backend == "auto" and coord.is_cuda and USE_TRITON)) else None
    if backend == "triton" and kernel is None:
        raise ConfigError("azimuth_window_knn(backend='triton'): Triton is not installed")
    positions = torch.arange(m, device=dev)
    if kernel is None and m < 2**31 - 1:  # int32 candidate positions: half the bytes of the largest index tensors
        meta = meta.int()
        idx_s = idx_s.int()

    def round_torch(q: slice | Tensor, w: int, check: bool) -> Tensor | None:
        """Rows ``q`` with windows of ``w`` per side (one block); the failed rows' offsets in ``q``."""
        f, length_q, i, h, r, kcol = meta[q].unbind(1)
        # offsets -w-1, -w..-1, 1..w, w+1: the outer two are the first excluded points of a window
        # that does not cover its RoI (a = b = w), whose azimuths the exactness check needs
        off = torch.arange(-(w + 1), w + 1, device=dev, dtype=meta.dtype)
        off += off >= 0
        # a window takes min(⌊(L-1)/2⌋, w) candidates on the left, min(L-1-⌊(L-1)/2⌋, w) on the right
        outside = (off < -torch.clamp(h, max=w)[:, None]) | (off > torch.clamp(r, max=w)[:, None])
        cand = torch.remainder(i[:, None] + off, length_q[:, None]).add_(f[:, None])
        diff = xs.index_select(1, cand.view(-1)).view(3, *cand.shape)
        d2 = diff.sub_(xs[:, q, None]).square_().sum(0)  # in place: the (3, Q, C) block is the peak
        d2.masked_fill_(outside, float("inf"))
        best, at = torch.topk(d2, kq, dim=1, largest=False, sorted=True)
        idx_s[q] = cand.gather(1, at)  # -1 where the distance is inf: set once at the end
        dist_s[q] = best
        if not check:
            return None
        # exactness check (module docstring), for windows that do not cover their RoI (r > w)
        ends = cand[:, :: cand.shape[1] - 1]  # columns 0 and -1 as a view (C = 2w + 2 >= 4)
        pq = polar[:, q]  # one gather of the queries' (φ, ρ)
        gap = torch.remainder((pq[0, :, None] - polar[0, ends]) * sign, _TWO_PI).amin(1)
        bound = pq[1] * torch.sin(gap.clamp_(max=math.pi / 2))
        # margin: φ and ρ carry float64 rounding of ~1e-16 relative; 1e-9 m is far above it
        kth2 = best.gather(1, kcol[:, None].long()).squeeze(1)
        return torch.nonzero((kth2 >= (bound - 1e-9).clamp_(min=0.0).square_()) & (r > w)).squeeze(1)

    def round_triton(q: Tensor, w: int, check: bool) -> Tensor | None:
        best, cand, bad = kernel(xs, polar[0], polar[1], meta, q, w, kq)
        idx_s[q] = cand
        dist_s[q] = best
        return torch.nonzero(bad).squeeze(1) if check else None

    sign = torch.tensor([1.0, -1.0], dtype=torch.float64, device=dev)
    w = max(int(WINDOW if window is None else window), (kq + 1) // 2)  # 2w candidates must hold the k nearest
    todo: Tensor | None = None  # None: every query (first round, views instead of gathers)
    while True:
        n_todo = m if todo is None else todo.numel()
        if n_todo == 0:
            break
        w = min(w, max_len)  # a window as wide as the largest RoI covers every RoI: the last round
        last = w == max_len
        if stats is not None:
            stats["rounds"].append((w, n_todo))
        failed = []
        if kernel is not None:  # one kernel for all the round's queries; its memory is (Q, k) only
            q = positions if todo is None else todo
            try:
                miss = round_triton(q, w, not last)
            except Exception as err:  # a Triton that cannot compile here: the torch rounds, said once
                if backend == "triton":
                    raise
                kernel = _disable_triton(err)
            else:
                failed.append(q[miss] if miss is not None else q[:0])
        if kernel is None:
            step = max(1, budget // (2 * w + 2))
            for s in range(0, n_todo, step):
                e = min(n_todo, s + step)
                miss = round_torch(slice(s, e) if todo is None else todo[s:e], w, not last)
                if miss is not None:
                    failed.append(miss + s if todo is None else todo[s:e][miss])
        if last:
            break
        todo = torch.cat(failed)
        # widen; straight to whole RoIs once that is cheap (WHOLE_ROI_PAIRS; each round costs launches and a sync)
        w = max_len if todo.numel() * (2 * max_len + 2) <= whole else w * WINDOW_GROWTH
    # back from sorted positions to input rows
    idx = torch.empty((m, kq), dtype=torch.long, device=dev)  # int64 whatever the rounds used
    dist = torch.empty_like(dist_s)
    idx[order] = torch.where(dist_s < float("inf"), order[idx_s], -1)
    dist[order] = dist_s.sqrt_()
    return idx, dist
