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
own); such ties only change a feature when the tied points differ in remission. (``topk`` rather than a
row sort: on an H100 a stable sort of the first round's 124,668 x 34 float64 block is a radix sort of
1.6 ms, ``topk`` 0.2 ms — docs/gpu-runs/2026-11-26-h100-rapid-features-profile.txt.)
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
from torch import Tensor

from threefold.datasets.errors import ConfigError

__all__ = ["azimuth_window_knn", "window_knn_sorted", "SortedKnn", "WINDOW", "WINDOW_GROWTH", "PAIR_BUDGET", "WHOLE_ROI_PAIRS"]

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
#: the torch rounds. Off: on an H100 the RAPiD features of the real scan took 3.7-5.3 ms with torch rounds
#: and 10.3 ms with Triton rounds (docs/gpu-runs/2026-11-26-h100-rapid-features-final.txt);
#: backend="triton" still selects it.
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


class SortedKnn(NamedTuple):
    """The window search's answer in its own sorted order (by RoI, then azimuth), before any back-permutation."""

    order: Tensor  #: (M,) int64: the input row of each sorted position
    idx: Tensor  #: (M, K) int32 (int64 past 2**31 points) sorted positions of the neighbours; any position where dist is inf
    dist: Tensor  #: (M, K) float64 3D distances, nearest first, inf where the window held no further point
    n_found: Tensor  #: (M,) min(k_pt, RoI size - 1): the leading columns that are the exact nearest
    carried: Tensor | None  #: (M,) float64 ``carry`` in the sorted order (None without one)


@functools.lru_cache(maxsize=64)
def _offsets(w: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Window offsets -w-1, -w..-1, 1..w, w+1 (C = 2w + 2; the outer two are the first excluded points of a
    window that does not cover its RoI, whose azimuths the exactness check needs), and their absolute
    values as (2, w + 1): left half, right half. Made once per (w, device): a round's launches otherwise.
    Read-only."""
    off = torch.arange(-(w + 1), w + 1, device=device, dtype=dtype)
    off += off >= 0
    return off, off.abs().view(2, w + 1)


def azimuth_window_knn(coord: Tensor, roi: Tensor, k_pt: Tensor, origin: Tensor | None = None,
                       window: int | None = None, stats: dict | None = None, k_max: int | None = None,
                       backend: str = "auto", whole_roi_pairs: int | None = None) -> tuple[Tensor, Tensor]:
    """The ``k_pt[j]`` nearest points of each point j inside its own RoI, self excluded (exact).

    Args:
        coord: (M, 3) float coordinates, metres (any device; computed in float64).
        roi: (M,) int64 RoI id of each point; a negative id means no RoI (the point gets no neighbours
            and is nobody's neighbour).
        k_pt: (M,) integer neighbours wanted per point, >= 1.
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

    :func:`window_knn_sorted` is the same search without the back-permutation (RAPiD features compute
    their rows in the sorted order and permute once, at the end).
    """
    found = window_knn_sorted(coord, roi, k_pt, origin, window, stats, k_max, backend, whole_roi_pairs)
    idx = torch.empty(found.idx.shape, dtype=torch.long, device=coord.device)
    dist = torch.empty_like(found.dist)
    idx[found.order] = torch.where(found.dist < float("inf"), found.order[found.idx], -1)
    dist[found.order] = found.dist
    return idx, dist


def window_knn_sorted(coord: Tensor, roi: Tensor, k_pt: Tensor, origin: Tensor | None = None,
                      window: int | None = None, stats: dict | None = None, k_max: int | None = None,
                      backend: str = "auto", whole_roi_pairs: int | None = None,
                      carry: Tensor | None = None) -> SortedKnn:
    """:func:`azimuth_window_knn` (same arguments) in the search's sorted order: see :class:`SortedKnn`.
    ``carry`` (M,), optional: per-point values (RAPiD: the remission) returned in that order as float64,
    sorted with the coordinates in one gather.

    Written for few kernel launches and host synchronisations (on a GPU a scan's search is a few hundred
    small kernels, so launches and synchronisations cost as much as the arithmetic): no ``torch.unique`` and no compaction of RoI-less points
    (a negative id becomes a RoI of its own point), small constants made once per device, the first
    round on views of the sorted arrays, its rows used as they come out of ``topk``, rows written
    unconditionally (a failed query's row is overwritten by a later round), and the only
    synchronisations are the sizes of the failed sets plus the largest RoI's size, read after the
    first round is queued (the first round does not need it).
    """
    dev = coord.device
    m = coord.shape[0]
    kq = (int(k_pt.max()) if m else 1) if k_max is None else int(k_max)
    if stats is not None:
        stats["rounds"] = []
    small = m < 2**31 - 1  # int32 positions: half the bytes of the largest index tensors
    if m == 0:
        empty = torch.empty((0, kq), dtype=torch.int32, device=dev)
        return SortedKnn(torch.empty(0, dtype=torch.long, device=dev), empty,
                         torch.empty((0, kq), dtype=torch.float64, device=dev), torch.empty(0, dtype=torch.int32, device=dev),
                         None if carry is None else torch.empty(0, dtype=torch.float64, device=dev))
    x = coord.double()
    rel = x if origin is None else x - origin.to(device=dev, dtype=torch.float64)
    phi = torch.remainder(torch.atan2(rel[:, 1], rel[:, 0]), _TWO_PI)  # [0, 2π)
    positions = torch.arange(m, device=dev, dtype=torch.int32 if small else torch.long)
    # sort by (RoI, azimuth) with no synchronisation: by azimuth, then stably by RoI id (torch.unique's
    # dense RoI ranks, for a single float key, would cost one). A negative id becomes ~position =
    # -1 - position: a RoI of one point, which has no neighbours and never fails the check.
    key = roi.where(roi >= 0, ~positions)
    _, by_phi = torch.sort(phi)
    key_s, by_key = torch.sort(key[by_phi], stable=True)
    order = by_phi[by_key]
    # per sorted point, packed so that a round gathers them at once: RoI start, RoI length L, position
    # inside the RoI, ⌊(L-1)/2⌋ and L-1-⌊(L-1)/2⌋ (the most candidates a window can take left and right
    # before it wraps onto itself), and the column of its own k-th neighbour (the Triton kernel's layout).
    # A RoI is the run of equal keys around the point: two binary searches in the sorted keys.
    first = torch.searchsorted(key_s, key_s, out_int32=small)
    length = torch.searchsorted(key_s, key_s, right=True, out_int32=small) - first
    others = length - 1
    left = torch.div(others, 2, rounding_mode="floor")
    k_s = k_pt[order].to(positions.dtype)
    meta = torch.stack([first, length, positions - first, left, others - left, k_s - 1], 1)
    # (6, M) float64 per sorted point: x, y, z (rows 0-2: a round's candidate gather is one index_select,
    # contiguous over the candidates), -φ and φ (the check gathers the left end's -φ and the right end's φ,
    # so both azimuth gaps are one subtraction from the query's (-φ, φ)) and ρ, the distance from the
    # sensor's vertical axis; a round gathers its queries' six values in one op. Row 6: ``carry``
    # (stack promotes it to float64)
    tab = torch.stack([x[:, 0], x[:, 1], x[:, 2], phi.neg(), phi, torch.linalg.vector_norm(rel[:, :2], dim=1)]
                      + ([] if carry is None else [carry])).index_select(1, order)
    xs = tab[:3]
    max_len: Tensor | int = length.max()  # read (a synchronisation) once the first round is queued
    budget = PAIR_BUDGET.get(dev.type, PAIR_BUDGET["cpu"])
    whole = WHOLE_ROI_PAIRS.get(dev.type, 2 * budget) if whole_roi_pairs is None else int(whole_roi_pairs)
    kernel = _triton_round() if (backend == "triton" or (backend == "auto" and coord.is_cuda and USE_TRITON)) else None
    if backend == "triton" and kernel is None:
        raise ConfigError("azimuth_window_knn(backend='triton'): Triton is not installed")
    meta64 = meta.long() if kernel is not None else None  # the kernel reads int64

    def round_torch(q: slice | Tensor, w: int, last: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        """Rows ``q`` with windows of ``w`` per side (one block): squared distances, sorted positions and
        the failed rows' offsets in ``q`` (None in the last round: its windows take whole RoIs, w = the
        largest RoI's size, nothing to clamp and nothing to check)."""
        mq, tq = meta[q], tab[:, q]
        f, length_q, i, _, r, kcol = mq.unbind(1)
        off, off_abs = _offsets(w, dev, meta.dtype)  # -w-1, -w..-1, 1..w, w+1
        # a window takes a = min(⌊(L-1)/2⌋, w) candidates on the left, b = min(L-1-⌊(L-1)/2⌋, w) on the
        # right: a column is outside when |offset| exceeds its side's count, one comparison of the (2, w+1)
        # halves of |offset| with (a, b)
        a_b = mq[:, 3:5] if last else mq[:, 3:5].clamp(max=w)
        outside = (off_abs > a_b[:, :, None]).view(-1, off.shape[0])
        cand = torch.remainder(i[:, None] + off, length_q[:, None]).add_(f[:, None])
        diff = xs.index_select(1, cand.view(-1)).view(3, *cand.shape)
        d2 = diff.sub_(tq[:3, :, None]).square_().sum(0)  # in place: the (3, Q, C) block is the peak
        d2.masked_fill_(outside, float("inf"))
        best, at = torch.topk(d2, kq, dim=1, largest=False, sorted=True)
        pos = cand.gather(1, at)
        if last:
            return best, pos, None
        # exactness check (module docstring), for windows that do not cover their RoI (r > w): the
        # azimuth gaps to the first excluded points, columns 0 and -1 (a view: C = 2w + 2 >= 4)
        ends = cand[:, :: cand.shape[1] - 1]
        gap = torch.remainder(tab[3:5].gather(1, ends.t()) - tq[3:5], _TWO_PI).amin(0)
        bound = tq[5] * torch.sin(gap.clamp_(max=math.pi / 2))
        # margin: φ and ρ carry float64 rounding of ~1e-16 relative; 1e-9 m is far above it
        kth2 = best.gather(1, kcol[:, None]).squeeze(1)
        return best, pos, torch.nonzero((kth2 >= (bound - 1e-9).clamp_(min=0.0).square_()) & (r > w)).squeeze(1)

    def round_triton(q: Tensor, w: int, check: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        best, pos, bad = kernel(xs, tab[4], tab[5], meta64, q, w, kq)
        return best, pos, (torch.nonzero(bad).squeeze(1) if check else None)

    dist_s: Tensor | None = None
    idx_s: Tensor | None = None

    def store(q: slice | Tensor, best: Tensor, pos: Tensor) -> None:
        nonlocal dist_s, idx_s
        if dist_s is None:
            if best.shape[0] == m:  # the first round in one block: its outputs are the rows
                dist_s, idx_s = best, pos
                return
            dist_s = torch.empty((m, kq), dtype=torch.float64, device=dev)  # every row is written in round 1
            idx_s = torch.empty((m, kq), dtype=pos.dtype, device=dev)
        dist_s[q] = best
        idx_s[q] = pos.to(idx_s.dtype)

    w = max(int(WINDOW if window is None else window), (kq + 1) // 2)  # 2w candidates must hold the k nearest
    todo: Tensor | None = None  # None: every query (first round, views instead of gathers)
    while True:
        n_todo = m if todo is None else todo.numel()
        if n_todo == 0:
            break
        if todo is not None:  # max_len is known after the first round
            w = min(w, max_len)  # a window as wide as the largest RoI covers every RoI: the last round
        last = todo is not None and w == max_len
        if stats is not None:
            stats["rounds"].append((w, n_todo))
        failed = []
        if kernel is not None:  # one kernel for all the round's queries; its memory is (Q, k) only
            q = positions.long() if todo is None else todo
            try:
                best, pos, miss = round_triton(q, w, not last)
            except Exception as err:  # a Triton that cannot compile here: the torch rounds, said once
                if backend == "triton":
                    raise
                kernel = _disable_triton(err)
            else:
                store(q, best, pos)
                failed.append(q[miss] if miss is not None else q[:0])
        if kernel is None:
            step = max(1, budget // (2 * w + 2))
            for s in range(0, n_todo, step):
                e = min(n_todo, s + step)
                q = slice(s, e) if todo is None else todo[s:e]
                best, pos, miss = round_torch(q, w, last)
                store(q, best, pos)
                if miss is not None:
                    failed.append((miss + s if s else miss) if todo is None else q[miss])
        if todo is None:
            # the first synchronisation; the first round did not need the size (a window at least as
            # wide as a RoI covers it and never fails), so it runs queued behind it
            max_len = int(max_len)
            if stats is not None:
                stats["rounds"][0] = (min(w, max_len), m)
        if last:
            break
        todo = failed[0] if len(failed) == 1 else torch.cat(failed)
        # widen; straight to whole RoIs once that is cheap (WHOLE_ROI_PAIRS; each round costs launches and a sync)
        w = max_len if todo.numel() * (2 * max_len + 2) <= whole else w * WINDOW_GROWTH
    n_found = torch.minimum(k_s, others)  # a window that held fewer than k candidates covered its RoI
    return SortedKnn(order, idx_s, dist_s.sqrt_(), n_found, None if carry is None else tab[6])
