"""Triton kernel for the candidate scan of the exact grid kNN on CUDA.

:mod:`threefold.geometry.neighbors` finds, for every query, nine runs of the cell-sorted reference
points (its 3x3x3 block of cells). In pure torch those candidates are expanded into flat
``(query, candidate)`` tensors, which is memory-bound. Here one lane per query walks its own runs and
keeps its ``K`` best candidates in registers (replace-the-worst), so the only traffic is reading each
candidate's coordinates once. The caller sorts the ``K`` survivors and applies the same acceptance test
as the torch path, so the result is identical. Floating-point contraction is disabled
(``enable_fp_fusion=False``) so that distances round like the torch path's.

Imported only when CUDA and Triton are present.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

#: Queries per program and warps per program: the fastest of a sweep on an H100 at 120k points, k = 16
#: (blocks 16-128, 1-8 warps, cell fill 0.4-0.9; docs/gpu-runs/2026-11-26-h100-knn-sweep.txt).
BLOCK_Q = 128
NUM_WARPS = 4


@triton.jit
def _knn_runs_kernel(
    q_ptr,  # (Q, 3) float32 queries
    ref_ptr,  # (3, R) float32 cell-sorted reference coordinates (structure of arrays)
    start_ptr,  # (Q, RUNS) int64 first sorted position of each run
    count_ptr,  # (Q, RUNS) int64 run lengths
    out_d_ptr,  # (Q, K) float32 squared distances of the survivors (inf where none)
    out_p_ptr,  # (Q, K) int64 sorted positions of the survivors
    nq,
    nref,
    RUNS: tl.constexpr,
    K: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    live = rows < nq
    qx = tl.load(q_ptr + rows * 3, mask=live, other=0.0)
    qy = tl.load(q_ptr + rows * 3 + 1, mask=live, other=0.0)
    qz = tl.load(q_ptr + rows * 3 + 2, mask=live, other=0.0)
    slot = tl.arange(0, K)
    best_d = tl.full((BLOCK_Q, K), float("inf"), tl.float32)
    best_p = tl.zeros((BLOCK_Q, K), tl.int64)
    for run in tl.static_range(RUNS):
        first = tl.load(start_ptr + rows * RUNS + run, mask=live, other=0)
        length = tl.load(count_ptr + rows * RUNS + run, mask=live, other=0)
        for t in range(0, tl.max(length, 0)):
            valid = t < length
            pos = first + t
            dx = tl.load(ref_ptr + pos, mask=valid, other=0.0) - qx
            dy = tl.load(ref_ptr + nref + pos, mask=valid, other=0.0) - qy
            dz = tl.load(ref_ptr + 2 * nref + pos, mask=valid, other=0.0) - qz
            d = tl.where(valid, dx * dx + dy * dy + dz * dz, float("inf"))
            worst, at = tl.max(best_d, 1, return_indices=True)
            swap = (slot[None, :] == at[:, None]) & (d < worst)[:, None]
            best_d = tl.where(swap, d[:, None], best_d)
            best_p = tl.where(swap, pos[:, None], best_p)
    out = rows[:, None] * K + slot[None, :]
    tl.store(out_d_ptr + out, best_d, mask=live[:, None])
    tl.store(out_p_ptr + out, best_p, mask=live[:, None])


def knn_runs_triton(q: Tensor, sorted_ref: Tensor, start: Tensor, count: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` nearest candidates of each query among its runs.

    ``q (Q, 3)`` float32, ``sorted_ref (R, 3)`` float32, ``start, count (Q, RUNS)`` int64 ->
    ``d2 (Q, k)`` float32 ascending (inf where the runs hold fewer than k points) and
    ``pos (Q, k)`` int64 positions in ``sorted_ref``. Equal distances come in unspecified order.
    """
    nq, runs = start.shape
    width = triton.next_power_of_2(k)
    d2 = torch.empty(nq, width, dtype=torch.float32, device=q.device)
    pos = torch.empty(nq, width, dtype=torch.long, device=q.device)
    if nq:
        block = BLOCK_Q
        with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
            _knn_runs_kernel[(triton.cdiv(nq, block),)](
                q.contiguous(), sorted_ref.T.contiguous(), start.contiguous(), count.contiguous(), d2, pos,
                nq, sorted_ref.shape[0], RUNS=runs, K=width, BLOCK_Q=block, num_warps=NUM_WARPS, enable_fp_fusion=False,
            )
    d2, order = d2.sort(dim=1)
    return d2[:, :k], pos.gather(1, order[:, :k])
