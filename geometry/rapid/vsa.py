"""Voxel set attention (VSA): point sets of a voxel → ``l`` latent codes, and back.

He, Li, Zhang, Zhang, "Voxel Set Transformer" (VoxSeT, CVPR 2022), used by RAPiD-Seg (Li, Shum,
Breckon, ECCV 2024) to voxelise its coordinate, intensity and RAPiD streams.

Encoder (:class:`VoxelSetAttention`), for the points ``i`` of voxel ``v`` with features ``x_i``:

    f_i = MLP(x_i) ∈ R^d,    s_i = W_s f_i ∈ R^l                 (one score per latent)
    a_{i,j} = exp(s_{i,j}) / Σ_{i' ∈ v} exp(s_{i',j})            (scatter-softmax over the voxel)
    H_v[j] = Σ_{i ∈ v} a_{i,j} · W_v f_i ∈ R^d                  (H_v ∈ R^{l×d}, defaults l = 8, d = 64)

VoxSeT's induced set attention computes ``s_i`` as the dot products of the keys ``W_k f_i`` with ``l``
learned latent queries; the product of the queries with ``W_k`` is the single linear map ``W_s`` used
here (the same function class, one matmul fewer).

Decoder (:class:`PointQueryDecoder`): a point query ``q_i`` (from the point's offset inside its voxel)
attends over the ``l`` codes of its voxel: ``o_i = Σ_j softmax_j(q_i · K H_v[j] / √d) · V H_v[j]``.

Segments are the voxels of :func:`~threefold.geometry.rapid.sparse.voxelize` (``inverse (N,)``);
the scatter ops are torch-native (:mod:`threefold.geometry.scatter`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from threefold.geometry.scatter import scatter_softmax, scatter_sum


def _mlp(cin: int, hidden: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(cin, hidden), nn.LayerNorm(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, cout))


class VoxelSetAttention(nn.Module):
    """Points ``(N, C_in)`` → per-voxel latent codes ``(M, l, d)``.

    Args:
        in_channels: C_in; latents: l; dim: d.
    """

    def __init__(self, in_channels: int, latents: int = 8, dim: int = 64) -> None:
        super().__init__()
        self.latents, self.dim = latents, dim
        self.embed = _mlp(in_channels, dim, dim)
        self.score = nn.Linear(dim, latents)
        self.value = nn.Linear(dim, dim)

    def forward(self, x: Tensor, inverse: Tensor, num_voxels: int) -> Tensor:
        """x ``(N, C_in)`` float32, inverse ``(N,)`` int64 voxel of each point → ``(M, l, d)``."""
        f = self.embed(x)
        s, v = self.score(f), self.value(f)
        # Under a float16 autocast the linear layers run in float16; the softmax and the segment sums
        # stay float32 (CUDA's 16-bit atomics are slow, see geometry/scatter.py), so cast once here
        # rather than at every scatter op: the (N, l·d) outer products are the largest tensor here.
        wide = torch.promote_types(s.dtype, torch.float32)  # float16 → float32; float64 stays
        with torch.autocast(x.device.type, enabled=False):
            a = scatter_softmax(s.to(wide), inverse, num_voxels)  # (N, l), sums to 1 over each voxel
            # Σ_i a_{i,j} v_i per voxel: an (l·d)-wide segment sum of the per-point outer products
            h = scatter_sum((a[:, :, None] * v.to(wide)[:, None, :]).flatten(1), inverse, num_voxels)
        return h.view(num_voxels, self.latents, self.dim)


class VSAEncoder(nn.Module):
    """A VSA stream of RAPiD-Seg: points → ``(M, out_channels)`` voxel embedding.

    The ``l × d`` codes are flattened and projected (Linear + BatchNorm + ReLU) to ``out_channels``.
    """

    def __init__(self, in_channels: int, out_channels: int, latents: int = 8, dim: int = 64) -> None:
        super().__init__()
        self.vsa = VoxelSetAttention(in_channels, latents, dim)
        self.project = nn.Sequential(nn.Linear(latents * dim, out_channels), nn.BatchNorm1d(out_channels), nn.ReLU(inplace=True))

    def forward(self, x: Tensor, inverse: Tensor, num_voxels: int) -> Tensor:
        return self.project(self.vsa(x, inverse, num_voxels).flatten(1))


class PointQueryDecoder(nn.Module):
    """Per-voxel codes ``(M, l, d)`` + point queries → per-point outputs ``(N, out_channels)``.

    Args:
        query_channels: width of the per-point query input (3: the offset inside the voxel).
        dim: d; out_channels: width of the reconstruction (k_max for RAPiD rows).
    """

    def __init__(self, query_channels: int, dim: int, out_channels: int) -> None:
        super().__init__()
        self.query = _mlp(query_channels, dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = _mlp(2 * dim, dim, out_channels)
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, codes: Tensor, query: Tensor, inverse: Tensor) -> Tensor:
        q = self.query(query)  # (N, d)
        k, v = self.key(codes), self.value(codes)  # (M, l, d)
        att = torch.einsum("nd,nld->nl", q, k[inverse]) * self.scale
        o = torch.einsum("nl,nld->nd", att.softmax(1), v[inverse])
        return self.out(torch.cat([o, q], 1))
