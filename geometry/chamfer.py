"""Chamfer distance, normal consistency and F-score between point sets.

The Chamfer distance has two conventions in the literature, selected here by name rather than by a
bare "L1"/"L2" flag, because the two papers this package reproduces mean different things by them:

* Point-MAE (Pang et al., ECCV 2022) "CD-L2": squared Euclidean distances, the two directional means
  summed -> ``chamfer_distance(x, y, squared=True, reduction="sum")`` (the default). BSP-Net
  (Chen et al., CVPR 2020, §4) reports the same quantity.
* Point-MAE "CD-L1": Euclidean (not squared) distances, the two directional means averaged ->
  ``chamfer_distance(x, y, squared=False, reduction="mean")``.

All three functions are differentiable with respect to the coordinates (the nearest-neighbour
assignment is piecewise constant, as in every Chamfer loss) and run on the inputs' device.
"""

from __future__ import annotations

from torch import Tensor

from threefold.datasets.errors import ConfigError, DataFormatError
from threefold.geometry.neighbors import index_points, knn_indices


def _directional(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Squared distance ``(B, N)`` from each point of ``x`` to its nearest point in ``y``, and its index."""
    idx = knn_indices(x, y, 1).squeeze(-1)
    d2 = (index_points(y, idx) - x).square().sum(-1)
    return d2, idx


def _batched(x: Tensor, y: Tensor, name: str) -> tuple[Tensor, Tensor, bool]:
    if x.dim() != y.dim() or x.dim() not in (2, 3) or x.shape[-1] != y.shape[-1]:
        raise DataFormatError(
            f"{name}: x {tuple(x.shape)} and y {tuple(y.shape)}: expected (B, N, D) and (B, M, D), or (N, D) and (M, D)"
        )
    if x.dim() == 2:
        return x.unsqueeze(0), y.unsqueeze(0), True
    return x, y, False


def chamfer_distance(x: Tensor, y: Tensor, *, squared: bool = True, reduction: str = "sum") -> Tensor:
    """Symmetric Chamfer distance.

    ``CD(x, y) = R(mean_i min_j d(x_i, y_j), mean_j min_i d(y_j, x_i))`` with ``d`` the squared
    (``squared=True``) or plain Euclidean distance and ``R`` the sum (``reduction="sum"``) or the mean
    (``"mean"``) of the two directional terms. See the module docstring for which paper uses which.

    Args:
        x: ``(B, N, D)`` or ``(N, D)`` float points.
        y: ``(B, M, D)`` or ``(M, D)`` float points, same dtype and device.
        squared: use squared distances (unit^2) instead of distances (unit).
        reduction: ``"sum"`` or ``"mean"`` of the two directional means.

    Returns:
        ``(B,)`` per-cloud distances, or a 0-d tensor for unbatched inputs.
    """
    if reduction not in ("sum", "mean"):
        raise ConfigError(f"chamfer_distance: reduction={reduction!r}, expected 'sum' or 'mean'")
    xb, yb, unbatched = _batched(x, y, "chamfer_distance")
    dx, _ = _directional(xb, yb)
    dy, _ = _directional(yb, xb)
    if not squared:
        # sqrt'(0) is infinite; a coincident pair contributes zero distance and zero gradient instead.
        dx = dx.clamp_min(1e-30).sqrt() * (dx > 0)
        dy = dy.clamp_min(1e-30).sqrt() * (dy > 0)
    cd = dx.mean(-1) + dy.mean(-1)
    if reduction == "mean":
        cd = cd / 2
    return cd[0] if unbatched else cd


def normal_consistency(x: Tensor, nx: Tensor, y: Tensor, ny: Tensor) -> Tensor:
    """Normal consistency (Mescheder et al., "Occupancy Networks", CVPR 2019, §4).

    Mean absolute cosine between each point's normal and the normal of its nearest neighbour in the
    other set, averaged over both directions. Normals need not be unit length (they are normalised).

    Args:
        x, nx: ``(B, N, 3)`` points and normals (or unbatched ``(N, 3)``).
        y, ny: ``(B, M, 3)`` points and normals.

    Returns:
        ``(B,)`` or 0-d, in ``[0, 1]``.
    """
    xb, yb, unbatched = _batched(x, y, "normal_consistency")
    nxb, nyb, _ = _batched(nx, ny, "normal_consistency normals")
    if nxb.shape != xb.shape or nyb.shape != yb.shape:
        raise DataFormatError(
            f"normal_consistency: normals {tuple(nx.shape)}, {tuple(ny.shape)} must match points {tuple(x.shape)}, {tuple(y.shape)}"
        )
    nxb = nxb / nxb.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    nyb = nyb / nyb.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    _, ix = _directional(xb, yb)
    _, iy = _directional(yb, xb)
    cos_x = (nxb * index_points(nyb, ix)).sum(-1).abs().mean(-1)
    cos_y = (nyb * index_points(nxb, iy)).sum(-1).abs().mean(-1)
    nc = (cos_x + cos_y) / 2
    return nc[0] if unbatched else nc


def fscore(x: Tensor, y: Tensor, threshold: float) -> Tensor:
    """F-score at a distance threshold (Tatarchenko et al., "What Do Single-view 3D Reconstruction
    Networks Learn?", CVPR 2019, §3).

    Precision: fraction of ``x`` (prediction) closer than ``threshold`` (Euclidean, strict ``<`` as in
    the authors' ``calculate_fscore``) to ``y``; recall: fraction of ``y`` (ground truth) closer than
    ``threshold`` to ``x``; F = 2PR / (P + R), 0 when both are 0. The count is a step function, so the
    F-score has no useful gradient: use it as a metric.

    Args:
        x: ``(B, N, D)`` or ``(N, D)`` predicted points; y: ``(B, M, D)`` or ``(M, D)`` reference points.
        threshold: distance in the coordinates' unit, > 0.

    Returns:
        ``(B,)`` or 0-d, in ``[0, 1]``.
    """
    if not threshold > 0:
        raise ConfigError(f"fscore: threshold={threshold} must be > 0")
    xb, yb, unbatched = _batched(x, y, "fscore")
    dx, _ = _directional(xb, yb)
    dy, _ = _directional(yb, xb)
    t2 = threshold * threshold
    precision = (dx < t2).to(x.dtype).mean(-1)
    recall = (dy < t2).to(x.dtype).mean(-1)
    f = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
    return f[0] if unbatched else f
