"""Triton kernel for exact farthest point sampling on CUDA (one launch for all S iterations).

The pure-torch loop launches several kernels per sample, so on a GPU it is bound by launch latency
(0.4 s for 100k -> 4,096 on an H200). Here each cloud is split over ``P`` programs that keep their
slice of the points and of the running minimum distance in registers for the whole run; after every
sample they agree on the next one through a packed 64-bit ``atomic_max`` (distance bits in the high
word, ``2^31 - 1 - index`` in the low word, so equal distances resolve to the lowest index) and a
per-iteration arrival counter that acts as a grid barrier. The barrier is safe because the launch
never has more programs than the GPU has streaming multiprocessors, so all of them are resident.

Floating-point contraction is disabled (``enable_fp_fusion=False``): the squared distance is rounded
as ``((dx*dx + dy*dy) + dz*dz)`` exactly like the CPU path and the NumPy reference, so the indices are
identical, not merely close. Imported only when CUDA and Triton are present.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import triton
import triton.language as tl
from torch import Tensor

#: Largest slice of one cloud held by one program (registers: about 5 values per point).
MAX_BLOCK = 16384


@triton.jit
def _fps_kernel(
    xyz_ptr,  # (B, 3, N) float32, contiguous
    count_ptr,  # (B,) int32: real points of each cloud (the rest is padding)
    start_ptr,  # (B,) int64
    out_ptr,  # (B, S) int64
    key_ptr,  # (B, S) int64, zeroed: packed running maximum of iteration i
    arrive_ptr,  # (B, S) int32, zeroed: programs done with iteration i
    stuck_ptr,  # (1,) int32, zeroed: set when a barrier wait gives up
    n,
    s,
    nprog,
    BLOCK: tl.constexpr,
    SINGLE: tl.constexpr,
    SPIN_LIMIT: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    real = offs < tl.load(count_ptr + b)
    base = xyz_ptr + b * 3 * n
    x = tl.load(base + offs, mask=real, other=0.0)
    y = tl.load(base + n + offs, mask=real, other=0.0)
    z = tl.load(base + 2 * n + offs, mask=real, other=0.0)
    dmin = tl.where(real, float("inf"), float("-inf"))
    cur = tl.load(start_ptr + b)
    if pid == 0:
        tl.store(out_ptr + b * s, cur)
    zero = pid * 0  # an int32 scalar: loop-carried flags must not be Python constants
    stuck = zero
    for i in range(1, s):
        dx = x - tl.load(base + cur)
        dy = y - tl.load(base + n + cur)
        dz = z - tl.load(base + 2 * n + cur)
        dmin = tl.minimum(dmin, dx * dx + dy * dy + dz * dz)
        # One reduction for the maximum and its first (lowest-index) position.
        best, at = tl.max(dmin, 0, return_indices=True, return_indices_tie_break_left=True)
        first = pid * BLOCK + at
        if SINGLE:
            cur = first.to(tl.int64)
        else:
            # best >= 0 (every program owns a real point), so its bits order like the float.
            key = (best.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (2147483647 - first).to(tl.int64)
            slot = b * s + i
            tl.atomic_max(key_ptr + slot, key, sem="relaxed", scope="gpu")
            tl.atomic_add(arrive_ptr + slot, 1, sem="release", scope="gpu")
            # A bounded wait: if the programs were ever not co-resident the kernel reports it and
            # stops waiting instead of hanging the GPU.
            spins = zero
            while (tl.atomic_add(arrive_ptr + slot, 0, sem="acquire", scope="gpu") < nprog) & (stuck == 0):
                spins += 1
                if spins > SPIN_LIMIT:
                    stuck = 1
                    tl.atomic_xchg(stuck_ptr, 1)
            won = tl.atomic_max(key_ptr + slot, 0, sem="acquire", scope="gpu")
            cur = 2147483647 - (won & 2147483647)
        if pid == 0:
            tl.store(out_ptr + b * s + i, cur)


def fps_triton(pts: Tensor, counts: Tensor, num_samples: int, start: Tensor) -> Tensor | None:
    """Exact FPS of ``pts (B, N, 3)`` float32 on CUDA; ``counts (B,)`` real points per cloud.

    Returns ``(B, S)`` int64, or None when the clouds are too large for the register-resident layout
    or a barrier wait gave up (the caller then uses the torch loop; the latter also warns).
    """
    b, n, _ = pts.shape
    # On CPU tensors (TRITON_INTERPRET=1 only) one program per cloud: the interpreter runs programs
    # one after another, so a barrier between them could never be passed.
    sms = torch.cuda.get_device_properties(pts.device).multi_processor_count if pts.is_cuda else 1
    per_cloud = max(1, sms // b)
    block = min(MAX_BLOCK, max(256, triton.next_power_of_2(-(-n // per_cloud))))
    nprog = -(-n // block)
    if nprog > sms:
        return None
    # Clouds per launch such that all programs of a launch are resident at once (barrier safety).
    chunk = b if nprog == 1 else max(1, sms // nprog)
    xyz = pts.transpose(1, 2).contiguous()
    counts = counts.to(torch.int32).contiguous()
    start = start.contiguous()
    out = torch.empty(b, num_samples, dtype=torch.long, device=pts.device)
    warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
    stuck = torch.zeros(1, dtype=torch.int32, device=pts.device)
    with torch.cuda.device(pts.device) if pts.is_cuda else contextlib.nullcontext():
        for c in range(0, b, chunk):
            e = min(b, c + chunk)
            key = torch.zeros(e - c, num_samples, dtype=torch.long, device=pts.device)
            arrive = torch.zeros(e - c, num_samples, dtype=torch.int32, device=pts.device)
            _fps_kernel[(nprog, e - c)](
                xyz[c:e], counts[c:e], start[c:e], out[c:e], key, arrive, stuck, n, num_samples, nprog,
                BLOCK=block, SINGLE=nprog == 1, SPIN_LIMIT=1 << 22, num_warps=warps, enable_fp_fusion=False,
            )
    if int(stuck.item()):
        warnings.warn("fps_triton: a grid barrier timed out (programs not co-resident); using the torch loop", RuntimeWarning, stacklevel=3)
        return None
    return out
