"""Exact farthest point sampling (FPS), batched and ragged.

FPS (Eldar et al., "The farthest point strategy for progressive image sampling", IEEE TIP 1997; used as
the set-abstraction sampler of PointNet++, Qi et al., NeurIPS 2017, §3.2, and for the patch centres of
Point-MAE, Pang et al., ECCV 2022, §3.1) picks a start point, then repeatedly the point whose distance to
the already chosen set is largest.

Exactness contract: the returned indices equal those of the textbook loop

    dmin = inf; idx[0] = start
    for i in 1..S-1: dmin = minimum(dmin, |p - p[idx[i-1]]|^2); idx[i] = argmax(dmin)

evaluated in the input's dtype with the squared distance summed as ``((dx^2 + dy^2) + dz^2)``, ties going
to the lowest index (NumPy's ``argmax``). Determinism follows: there is no random choice; the start point
is an argument.

Three evaluation strategies give identical indices:

* dense: every iteration updates all ``N`` distances, with in-place ops into preallocated buffers;
  cheapest for small clouds and large batches.
* bucketed: points are sorted into kd-tree leaves of at most ``cap`` points; an iteration only touches the
  leaves whose bounding box is closer to the new point than the leaf's current largest ``dmin`` (the same
  pruning as the bucket-based FPS of Han et al., "QuickFPS", IEEE TCAD 2023). The pruning bound has a
  relative safety margin far above floating-point rounding, so a skipped leaf provably keeps its
  distances, and the result stays exact.
* Triton (CUDA, float32, 3-D): one kernel launch for the whole run, see :mod:`threefold.geometry.fps_triton`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from threefold.datasets.errors import ConfigError, DataFormatError

#: Clouds of at least this many points (per batch item) use the bucketed strategy.
BUCKETED_MIN_POINTS = 32768
#: Use the Triton kernel (geometry/fps_triton.py) for float32 3-D clouds on CUDA when Triton is installed.
USE_TRITON = True
#: Points per kd-tree leaf in the bucketed strategy.
LEAF_SIZE = 128
# A leaf is skipped only if its box distance exceeds (1 + margin) times its largest dmin: rounding in
# float32 is ~1e-7 relative, so 1e-4 can never skip a leaf that a rounded distance would update.
_PRUNE_MARGIN = 1.0 + 1e-4


def farthest_point_sampling(points: Tensor, num_samples: int, *, start: int | Tensor = 0) -> Tensor:
    """Exact farthest point sampling of each cloud in a batch.

    Args:
        points: ``(B, N, D)`` or ``(N, D)`` float32/float64 coordinates (any unit; usually D = 3).
        num_samples: ``S``, number of points to pick, ``1 <= S <= N``.
        start: index of the first sample: an int for every cloud or an int64 tensor ``(B,)``.

    Returns:
        ``(B, S)`` or ``(S,)`` int64 indices into the point axis, in selection order; ``idx[..., 0] == start``.
    """
    if points.dim() not in (2, 3):
        raise DataFormatError(f"farthest_point_sampling: points {tuple(points.shape)}, expected (B, N, D) or (N, D)")
    unbatched = points.dim() == 2
    pts = points.unsqueeze(0) if unbatched else points
    b, n, _ = pts.shape
    if not 1 <= num_samples <= n:
        raise ConfigError(f"farthest_point_sampling: num_samples={num_samples} must be between 1 and N={n}")
    start_t = _start_tensor(start, b, torch.full((b,), n, device=pts.device), pts.device)
    idx = _fps_padded(pts, None, num_samples, start_t)
    return idx[0] if unbatched else idx


def farthest_point_sampling_ragged(
    coord: Tensor, offset: Tensor, new_offset: Tensor, *, start: int | Tensor = 0
) -> Tensor:
    """Exact farthest point sampling of clouds concatenated along the point axis (Pointcept layout).

    Args:
        coord: ``(N_total, D)`` float coordinates of all clouds, one after another.
        offset: ``(B,)`` int64 cumulative point counts (end of each cloud), as in Point Transformer V2.
        new_offset: ``(B,)`` int64 cumulative sample counts; cloud ``b`` gets
            ``new_offset[b] - new_offset[b-1]`` samples, at most its point count.
        start: first sample of each cloud as an index *local to the cloud*: int or ``(B,)`` int64.

    Returns:
        ``(new_offset[-1],)`` int64 indices into ``coord`` (global), cloud after cloud, each cloud's in
        selection order.
    """
    if coord.dim() != 2:
        raise DataFormatError(f"farthest_point_sampling_ragged: coord {tuple(coord.shape)}, expected (N_total, D)")
    if offset.dim() != 1 or new_offset.shape != offset.shape or offset.numel() == 0:
        raise DataFormatError(
            f"farthest_point_sampling_ragged: offset {tuple(offset.shape)} and new_offset {tuple(new_offset.shape)} "
            "must both be (B,) with B >= 1"
        )
    offset = offset.to(device=coord.device, dtype=torch.long)
    new_offset = new_offset.to(device=coord.device, dtype=torch.long)
    counts = torch.diff(offset, prepend=offset.new_zeros(1))
    samples = torch.diff(new_offset, prepend=new_offset.new_zeros(1))
    if int(offset[-1]) != coord.shape[0] or bool((counts < 1).any()):
        raise DataFormatError(
            f"farthest_point_sampling_ragged: offset {offset.tolist()} must increase strictly and end at "
            f"coord.shape[0]={coord.shape[0]}"
        )
    if bool((samples < 1).any()) or bool((samples > counts).any()):
        raise ConfigError(
            f"farthest_point_sampling_ragged: new_offset {new_offset.tolist()} must increase strictly and ask "
            f"each cloud for at most its point count {counts.tolist()}"
        )
    b = counts.numel()
    start_t = _start_tensor(start, b, counts, coord.device)
    n_max = int(counts.max())
    begin = offset - counts
    # Pad each cloud to n_max with copies of its start point; padded slots start at dmin = -inf, so
    # they never win the argmax and never move a bounding box.
    slot = torch.arange(n_max, device=coord.device)
    valid = slot[None, :] < counts[:, None]
    gather = torch.where(valid, begin[:, None] + slot[None, :], (begin + start_t)[:, None])
    padded = coord[gather]
    idx = _fps_padded(padded, valid, int(samples.max()), start_t)
    keep = slot[None, : idx.shape[1]] < samples[:, None]
    return (idx + begin[:, None])[keep]


def _start_tensor(start: int | Tensor, b: int, counts: Tensor, device: torch.device) -> Tensor:
    start_t = torch.as_tensor(start, dtype=torch.long, device=device).reshape(-1).expand(b).clone()
    if start_t.numel() != b or bool(((start_t < 0) | (start_t >= counts)).any()):
        raise ConfigError(f"farthest point sampling: start={start} must index a point of each of the {b} clouds")
    return start_t


def _fps_padded(pts: Tensor, valid: Tensor | None, num_samples: int, start: Tensor) -> Tensor:
    """Dispatch ``(B, N, D)`` clouds (``valid (B, N)`` marks real points) to a strategy."""
    if not pts.is_floating_point():
        raise DataFormatError(f"farthest point sampling: points dtype {pts.dtype}, expected a floating dtype")
    if not bool(torch.isfinite(pts).all()):
        raise DataFormatError("farthest point sampling: points contain NaN or inf; expected finite coordinates")
    with torch.no_grad():
        pts = pts.detach()
        if USE_TRITON and pts.is_cuda and pts.dtype == torch.float32 and pts.shape[2] == 3 and pts.shape[1] < 2**31 - 1:
            idx = _fps_triton(pts, valid, num_samples, start)
            if idx is not None:
                return idx
        dmin = torch.full(pts.shape[:2], float("inf"), dtype=pts.dtype, device=pts.device)
        if valid is not None:
            dmin.masked_fill_(~valid, float("-inf"))
        # The bucketed strategy synchronises with the host every iteration: CPU only.
        if pts.shape[1] >= BUCKETED_MIN_POINTS and num_samples > 1 and pts.device.type == "cpu":
            return _fps_bucketed(pts, dmin, num_samples, start)
        return _fps_dense(pts, dmin, num_samples, start)


def _fps_triton(pts: Tensor, valid: Tensor | None, num_samples: int, start: Tensor) -> Tensor | None:
    try:
        from threefold.geometry.fps_triton import fps_triton
    except ImportError:
        return None
    counts = valid.sum(1) if valid is not None else torch.full((pts.shape[0],), pts.shape[1], device=pts.device)
    return fps_triton(pts, counts, num_samples, start)


def _fps_dense(pts: Tensor, dmin: Tensor, num_samples: int, start: Tensor) -> Tensor:
    b, n, d = pts.shape
    coords = pts.transpose(1, 2).contiguous()  # (B, D, N): each coordinate row contiguous
    out = torch.empty(num_samples, b, dtype=torch.long, device=pts.device)
    out[0] = start
    diff = torch.empty_like(coords)
    dist = torch.empty_like(dmin)
    for i in range(num_samples - 1):
        p = coords.gather(2, out[i].view(b, 1, 1).expand(b, d, 1))
        torch.sub(coords, p, out=diff)
        diff.mul_(diff)
        torch.sum(diff, 1, out=dist)
        torch.minimum(dmin, dist, out=dmin)
        torch.argmax(dmin, 1, out=out[i + 1])
    return out.T.contiguous()


def _kd_leaf_order(pts: Tensor, levels: int, n_pad: int, start: Tensor) -> Tensor:
    """Per-cloud permutation ``(B, n_pad)`` of point indices into ``2**levels`` kd-tree leaves.

    Every node is split at its median along its widest axis; slots past ``N`` hold index ``N`` (padding).
    Coordinates are quantised to 2^20 steps so that each level is one integer sort, which is several
    times faster than a float sort on CPU; any split is valid for the pruning, only its tightness
    depends on the quantisation.
    """
    b, n, d = pts.shape
    dev = pts.device
    lo = pts.amin(1, keepdim=True)
    extent = (pts.amax(1, keepdim=True) - lo).amax(2, keepdim=True).clamp_min(torch.finfo(pts.dtype).tiny)
    quant = ((pts - lo) / extent * ((1 << 20) - 1)).long()
    order = torch.cat([torch.arange(n, device=dev).expand(b, n), torch.full((b, n_pad - n), n, device=dev)], 1)
    # Padding slots sit at the start point (where the caller places their coordinates too).
    q = quant.gather(1, torch.where(order < n, order, start[:, None])[..., None].expand(b, n_pad, d))
    for level in range(levels):
        nodes = 1 << level
        view = q.view(b, nodes, -1, d)
        axis = (view.amax(2) - view.amin(2)).argmax(-1)
        key = view.gather(3, axis[:, :, None, None].expand(b, nodes, view.shape[2], 1)).squeeze(3)
        key = key + (torch.arange(nodes, device=dev) << 21)[None, :, None]
        perm = key.view(b, n_pad).argsort(dim=1)
        order, q = order.gather(1, perm), q.gather(1, perm[..., None].expand(b, n_pad, d))
    return order


def _fps_bucketed(pts: Tensor, dmin: Tensor, num_samples: int, start: Tensor) -> Tensor:
    b, n, d = pts.shape
    dev = pts.device
    levels = ((n - 1) // LEAF_SIZE).bit_length()
    leaves = 1 << levels
    cap = -(-n // leaves)
    n_pad = leaves * cap
    # Inside a leaf, order by original index so that a leaf's first argmax is its lowest-index tie.
    orig = _kd_leaf_order(pts, levels, n_pad, start).view(b, leaves, cap).sort(dim=2).values.view(b, n_pad)
    # Padding slots (index n) repeat the start point with dmin = -inf: they never win and never widen a box.
    src = torch.where(orig < n, orig, start[:, None])
    g = b * leaves
    leaf_xyz = pts.gather(1, src[..., None].expand(b, n_pad, d)).view(g, cap, d).transpose(1, 2).contiguous()
    leaf_dmin = torch.cat([dmin, dmin.new_full((b, 1), float("-inf"))], 1).gather(1, orig).view(g, cap)
    leaf_orig = orig.view(g, cap)
    lo = leaf_xyz.amin(2).T.contiguous()  # (D, G)
    hi = leaf_xyz.amax(2).T.contiguous()
    leaf_max = leaf_dmin.amax(1)  # inf where a leaf holds a real point, -inf for pure padding
    leaf_key = torch.zeros(g, dtype=torch.long, device=dev)
    big = torch.tensor(n, device=dev)
    coords = pts.reshape(b * n, d).T.contiguous()  # (D, B*N) to look up each new sample
    base = torch.arange(b, device=dev) * n
    out = torch.empty(num_samples, b, dtype=torch.long, device=dev)
    out[0] = start
    for i in range(num_samples - 1):
        p = coords.index_select(1, out[i] + base if b > 1 else out[i])  # (D, B)
        p_leaf = p.repeat_interleave(leaves, 1) if b > 1 else p
        box = torch.clamp(p_leaf, lo, hi).sub_(p_leaf).square_().sum(0)  # squared distance to each leaf box
        sel = (box.mul_(1 / _PRUNE_MARGIN) < leaf_max).nonzero().squeeze(1)
        p_sel = p_leaf.index_select(1, sel).T[:, :, None] if b > 1 else p.view(1, d, 1)
        dist = leaf_xyz.index_select(0, sel).sub_(p_sel).square_().sum(1)
        cur = leaf_dmin.index_select(0, sel)
        torch.minimum(cur, dist, out=cur)
        leaf_dmin.index_copy_(0, sel, cur)
        mx, am = cur.max(1)
        leaf_max.index_copy_(0, sel, mx)
        leaf_key.index_copy_(0, sel, leaf_orig.index_select(0, sel).gather(1, am[:, None]).squeeze(1))
        lm = leaf_max.view(b, leaves)
        torch.amin(torch.where(lm == lm.amax(1, keepdim=True), leaf_key.view(b, leaves), big), 1, out=out[i + 1])
    return out.T.contiguous()
