"""Triton kernel for one round of the azimuth-window kNN of RAPiD features (CUDA).

:func:`~threefold.geometry.rapid.window_knn.azimuth_window_knn` gives each query a window of azimuth
neighbours inside its RoI and checks exactness against an azimuth-gap bound. In torch a round is about
forty tensor operations (index arithmetic, gathers, distances, ``topk``, the check), each a kernel launch;
a scan is launch-bound. Here one lane per query walks its own window — ``a`` candidates on the left and
``b`` on the right, circularly inside the RoI, the loop as long as the block's widest window — keeps its
``KP`` nearest in registers (replace-the-worst, as :mod:`threefold.geometry.knn_triton`), and evaluates
the check: the k-th nearest is below the bound iff at least k kept distances are. The caller sorts the
``KP`` survivors. Distances are float64 by explicit differences, like the torch round and the kd-tree.

Imported only when Triton is present; used for CUDA tensors with ``backend="triton"`` (and, under
``TRITON_INTERPRET=1``, for CPU tensors in tests). Not the default: on an H100 a scan took 9.5 ms with
these kernels against 5.2 ms with the torch rounds (docs/gpu-runs/2026-11-26-h100-rapid-features-window.txt;
not profiled per kernel, so the cause is not established).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

#: Queries per program: small blocks keep the per-block loop (the widest window in the block) short.
BLOCK_Q = 64
NUM_WARPS = 2


@triton.jit
def _window_round_kernel(
    xs_ptr,  # (3, M) float64 coordinates, sorted by (RoI, azimuth)
    phi_ptr,  # (M,) float64 azimuth in [0, 2π)
    rho_ptr,  # (M,) float64 distance from the sensor's vertical axis
    meta_ptr,  # (M, 6) int64: RoI start, RoI length L, position in RoI, ⌊(L-1)/2⌋, L-1-⌊(L-1)/2⌋, k-1
    q_ptr,  # (Q,) int64 sorted positions of the queries
    out_d_ptr,  # (Q, KP) float64 squared distances of the survivors (inf where none)
    out_p_ptr,  # (Q, KP) int64 sorted positions of the survivors
    bad_ptr,  # (Q,) int8: 1 where the window is not proven to hold the k nearest
    nq,
    m,
    w,
    KP: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    live = rows < nq
    p = tl.load(q_ptr + rows, mask=live, other=0)
    first = tl.load(meta_ptr + p * 6, mask=live, other=0)
    length = tl.load(meta_ptr + p * 6 + 1, mask=live, other=1)
    i = tl.load(meta_ptr + p * 6 + 2, mask=live, other=0)
    a = tl.minimum(tl.load(meta_ptr + p * 6 + 3, mask=live, other=0), w)
    rest = tl.load(meta_ptr + p * 6 + 4, mask=live, other=0)
    b = tl.minimum(rest, w)
    kcol = tl.load(meta_ptr + p * 6 + 5, mask=live, other=0)
    qx = tl.load(xs_ptr + p, mask=live, other=0.0)
    qy = tl.load(xs_ptr + m + p, mask=live, other=0.0)
    qz = tl.load(xs_ptr + 2 * m + p, mask=live, other=0.0)
    span = tl.where(live, a + b, 0)
    slot = tl.arange(0, KP)
    best_d = tl.full((BLOCK_Q, KP), float("inf"), tl.float64)
    best_p = tl.zeros((BLOCK_Q, KP), tl.int64)
    for t in range(0, tl.max(span, 0)):
        valid = t < span
        off = t - a + (t >= a).to(tl.int64)  # -a..-1, then 1..b
        local = (i + off) % length
        pos = first + tl.where(local < 0, local + length, local)
        dx = tl.load(xs_ptr + pos, mask=valid, other=0.0) - qx
        dy = tl.load(xs_ptr + m + pos, mask=valid, other=0.0) - qy
        dz = tl.load(xs_ptr + 2 * m + pos, mask=valid, other=0.0) - qz
        d = tl.where(valid, dx * dx + dy * dy + dz * dz, float("inf"))
        worst, at = tl.max(best_d, 1, return_indices=True)
        swap = (slot[None, :] == at[:, None]) & (d < worst)[:, None]
        best_d = tl.where(swap, d[:, None], best_d)
        best_p = tl.where(swap, pos[:, None], best_p)
    # exactness check for windows that do not cover their RoI (then a = b = w): the first excluded points
    # are at i - w - 1 and i + w + 1
    left = (i - a - 1) % length
    left = first + tl.where(left < 0, left + length, left)
    right = (i + b + 1) % length
    right = first + tl.where(right < 0, right + length, right)
    phq = tl.load(phi_ptr + p, mask=live, other=0.0)
    gap_l = phq - tl.load(phi_ptr + left, mask=live, other=0.0)
    gap_r = tl.load(phi_ptr + right, mask=live, other=0.0) - phq
    two_pi = 6.283185307179586  # 2π; the azimuths lie in [0, 2π), so one wrap suffices
    gap_l = tl.where(gap_l < 0, gap_l + two_pi, gap_l)
    gap_r = tl.where(gap_r < 0, gap_r + two_pi, gap_r)
    gap = tl.minimum(tl.minimum(gap_l, gap_r), 1.5707963267948966)  # π/2: beyond it the bound is ρ
    bound = tl.load(rho_ptr + p, mask=live, other=0.0) * tl.sin(gap) - 1e-9
    bound = tl.maximum(bound, 0.0)
    below = tl.sum((best_d < (bound * bound)[:, None]).to(tl.int64), 1)
    bad = (below < kcol + 1) & (rest > w)
    out = rows[:, None] * KP + slot[None, :]
    tl.store(out_d_ptr + out, best_d, mask=live[:, None])
    tl.store(out_p_ptr + out, best_p, mask=live[:, None])
    tl.store(bad_ptr + rows, bad.to(tl.int8), mask=live)


def window_round_triton(xs: Tensor, phi: Tensor, rho: Tensor, meta: Tensor, q: Tensor, w: int,
                        k: int) -> tuple[Tensor, Tensor, Tensor]:
    """One search round for the queries ``q (Q,)`` (sorted positions) with windows of ``w`` per side.

    ``xs (3, M)`` float64, ``phi, rho (M,)`` float64, ``meta (M, 6)`` int64 as built by
    :func:`~threefold.geometry.rapid.window_knn.azimuth_window_knn` → squared distances ``(Q, k)``
    float64 ascending (inf where the window holds fewer), sorted positions ``(Q, k)`` int64 and
    ``bad (Q,)`` bool (not proven exact; meaningless where the window covers the whole RoI).
    """
    nq = q.numel()
    kp = triton.next_power_of_2(max(k, 2))
    d2 = torch.empty(nq, kp, dtype=torch.float64, device=xs.device)
    pos = torch.empty(nq, kp, dtype=torch.long, device=xs.device)
    bad = torch.empty(nq, dtype=torch.int8, device=xs.device)
    if nq:
        with torch.cuda.device(xs.device) if xs.is_cuda else contextlib.nullcontext():
            _window_round_kernel[(triton.cdiv(nq, BLOCK_Q),)](
                xs, phi, rho, meta, q, d2, pos, bad, nq, xs.shape[1], w, KP=kp, BLOCK_Q=BLOCK_Q,
                num_warps=NUM_WARPS, enable_fp_fusion=False,  # distances round as in the torch rounds
            )
    d2, order = d2.sort(dim=1)
    return d2[:, :k], pos.gather(1, order[:, :k]), bad.bool()

