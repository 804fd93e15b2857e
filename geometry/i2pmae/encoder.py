"""Hierarchical point encoder of I2P-MAE (Zhang et al., CVPR 2023, §3.1; reference ``H_Encoder``,
``Token_Embed``, ``Group_v2`` and ``PointNetFeaturePropagation`` in ZrrSkywalker/I2P-MAE ``models/``).

Shapes (B clouds, scale s with G_s tokens of k_s members, C_s channels; the reference configuration
is G = 512 / 256 / 64, k = 16 / 8 / 8, C = 96 / 192 / 384, 5 blocks per scale, 6 heads):

* :func:`hierarchical_groups`: scale 0 groups the points (exact FPS from point 0, then kNN), every
  later scale groups the previous scale's centres -> one :class:`Scale` per level.
* :class:`TokenMerge`: the token embedding of scales ≥ 1, a mini-PointNet over the k_s member tokens
  (C→C→C, max-pool, concat, 2C→C'→C', max-pool); scale 0 uses Point-MAE's :class:`PatchEmbed`
  (3→128→256, 512→512→C_0).
* :class:`HierarchicalEncoder`: per scale, token embedding/merging, a positional MLP of the centres
  (3→C→C, GELU) added before every pre-norm block, only visible tokens encoded. Visible counts vary
  across the batch under 2D-guided masking, so visible tokens are packed to the front of a padded
  sequence and padding is excluded from attention by a key mask; fine-tuning adds local attention
  (tokens farther apart than the scale's radius do not attend to each other).
* :class:`FeaturePropagation`: PointNet++ feature propagation (inverse squared-distance weights of
  the 3 nearest coarse tokens), concatenated with the fine tokens and fused by pointwise layers with a
  residual block (BN, GELU), as in the reference decoder.

Differences from the reference code: pure torch FPS/kNN; padding is built by a stable sort instead of a
Python loop over the batch; attention masks are boolean masks of ``scaled_dot_product_attention``
(the reference adds -1e5 to masked logits, the same softmax to float precision); pointwise Conv1d layers
are Linear layers on channels-last tokens (same parameters, same function).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from threefold.datasets.errors import ConfigError, DataFormatError
from threefold.geometry.neighbors import index_points, knn_indices
from threefold.geometry.pointmae.model import Attention, Block, PatchEmbed, init_weights
from threefold.geometry.sampling import farthest_point_sampling


@dataclass
class Scale:
    """One level of the hierarchy: ``centers (B, G, 3)``; ``members (B, G, k)`` int64 indices of each
    token's members in the level below (the points for scale 0); ``neighborhood (B, G, k, 3)`` the
    members' coordinates re-centred on their token; ``neighborhood_abs`` the same not re-centred."""

    centers: Tensor
    members: Tensor
    neighborhood: Tensor
    neighborhood_abs: Tensor


def hierarchical_groups(points: Tensor, num_groups: Sequence[int], group_sizes: Sequence[int]) -> list[Scale]:
    """``points (B, N, 3)`` -> one :class:`Scale` per level; level s > 0 groups level s-1's centres."""
    if points.dim() != 3 or points.shape[-1] != 3:
        raise DataFormatError(f"hierarchical_groups: points {tuple(points.shape)}, expected (B, N, 3)")
    if len(num_groups) != len(group_sizes):
        raise ConfigError(f"num_groups {list(num_groups)} and group_sizes {list(group_sizes)} differ in length")
    scales = []
    source = points
    for g, k in zip(num_groups, group_sizes):
        if not 1 <= k <= source.shape[1] or not 1 <= g <= source.shape[1]:
            raise ConfigError(f"hierarchical_groups: {g} groups of {k} from {source.shape[1]} points/centres")
        centers = index_points(source, farthest_point_sampling(source.detach(), g))
        members = knn_indices(centers, source, k)
        absolute = index_points(source, members)
        scales.append(Scale(centers, members, absolute - centers.unsqueeze(2), absolute))
        source = centers
    return scales


class TokenMerge(nn.Module):
    """Token embedding of scales ≥ 1 (the reference's ``Token_Embed(in_c=C, out_c=C')``):
    ``tokens (B, G, k, C)`` -> ``(B, G, C')``; BatchNorm statistics over all B·G·k members."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.first_conv = nn.Sequential(nn.Linear(in_dim, in_dim), nn.BatchNorm1d(in_dim), nn.ReLU(inplace=True),
                                        nn.Linear(in_dim, in_dim))
        self.second_conv = nn.Sequential(nn.Linear(2 * in_dim, out_dim), nn.BatchNorm1d(out_dim),
                                         nn.ReLU(inplace=True), nn.Linear(out_dim, out_dim))
        self.out_dim = out_dim

    def forward(self, tokens: Tensor) -> Tensor:
        b, g, k, c = tokens.shape
        x = self.first_conv(tokens.reshape(b * g * k, c)).reshape(b * g, k, c)
        x = torch.cat([x.max(1, keepdim=True).values.expand(-1, k, -1), x], 2).reshape(b * g * k, 2 * c)
        return self.second_conv(x).reshape(b * g, k, self.out_dim).max(1).values.reshape(b, g, self.out_dim)


class MaskedAttention(Attention):
    """:class:`~threefold.geometry.pointmae.model.Attention` with an optional boolean mask
    ``(B, 1, L, L)`` or ``(B, 1, 1, L)`` (True = may attend)."""

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class MaskedBlock(Block):
    """Pre-norm block whose attention takes a mask (parameter names as Point-MAE's :class:`Block`)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0) -> None:
        super().__init__(dim, heads, mlp_ratio, drop_path)
        self.attn = MaskedAttention(dim, heads)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class MaskedTransformer(nn.Module):
    """Blocks with the positional embedding added before each (the reference's ``Encoder_Block`` /
    ``Decoder_Block``); ``rates`` are the blocks' drop-path probabilities."""

    def __init__(self, dim: int, heads: int, rates: Sequence[float], mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MaskedBlock(dim, heads, mlp_ratio, r) for r in rates)

    def forward(self, x: Tensor, pos: Tensor, mask: Tensor | None = None) -> Tensor:
        for block in self.blocks:
            x = block(x + pos, mask)
        return x


def centre_mlp(dim: int) -> nn.Sequential:
    """Positional embedding of I2P-MAE: Linear(3, C), GELU, Linear(C, C)."""
    return nn.Sequential(nn.Linear(3, dim), nn.GELU(), nn.Linear(dim, dim))


def pack_visible(visible: Tensor) -> tuple[Tensor, Tensor]:
    """Visible tokens first, in their original order: ``visible (B, G)`` bool -> ``order (B, L)`` int64
    (L = the largest visible count) and ``valid (B, L)`` bool (False = padding)."""
    count = visible.sum(1)
    length = int(count.max())
    order = torch.argsort((~visible).to(torch.int8), dim=1, stable=True)[:, :length]
    valid = torch.arange(length, device=visible.device) < count.unsqueeze(1)
    return order, valid


@dataclass
class EncodedScale:
    """Encoder output of one scale: ``tokens (B, L, C)`` (un-normalised block output of the packed
    visible tokens), ``valid (B, L)`` bool, ``order (B, L)`` their token indices, ``visible (B, G)``."""

    tokens: Tensor
    valid: Tensor
    order: Tensor
    visible: Tensor


class HierarchicalEncoder(nn.Module):
    """Multi-scale encoder (the reference's ``H_Encoder``).

    ``forward(scales, masks=None, radii=None)``: ``masks`` one ``(B, G_s)`` bool per scale (True =
    masked; None: all visible), ``radii`` one local-attention radius per scale (≤ 0: global) -> one
    :class:`EncodedScale` per scale. :attr:`norms` (one LayerNorm per scale) are applied by the callers.
    """

    def __init__(self, dims: Sequence[int] = (96, 192, 384), depths: Sequence[int] = (5, 5, 5), heads: int = 6,
                 mlp_ratio: float = 4.0, drop_path: float = 0.1, embed_width: int = 128) -> None:
        super().__init__()
        if len(dims) != len(depths):
            raise ConfigError(f"encoder dims {list(dims)} and depths {list(depths)} differ in length")
        self.dims = list(dims)
        self.token_embed = nn.ModuleList(
            [PatchEmbed(dims[0], embed_width)] + [TokenMerge(dims[i - 1], dims[i]) for i in range(1, len(dims))])
        self.pos_embeds = nn.ModuleList(centre_mlp(d) for d in dims)
        rates = torch.linspace(0, drop_path, sum(depths)).tolist()
        starts = [sum(depths[:i]) for i in range(len(depths))]
        self.blocks = nn.ModuleList(MaskedTransformer(d, heads, rates[s:s + n], mlp_ratio)
                                    for d, s, n in zip(dims, starts, depths))
        self.norms = nn.ModuleList(nn.LayerNorm(d) for d in dims)
        init_weights(self)

    def forward(self, scales: Sequence[Scale], masks: Sequence[Tensor] | None = None,
                radii: Sequence[float] | None = None) -> list[EncodedScale]:
        out: list[EncodedScale] = []
        full = None
        for i, scale in enumerate(scales):
            if i == 0:
                tokens = self.token_embed[0](scale.neighborhood)
            else:
                tokens = self.token_embed[i](index_points(full, scale.members))  # merge the members' tokens
            b, g, _ = tokens.shape
            radius = radii[i] if radii is not None else 0.0
            if masks is None:
                visible = torch.ones(b, g, dtype=torch.bool, device=tokens.device)
                order = torch.arange(g, device=tokens.device).expand(b, g)
                valid, x, centers, attend = visible, tokens, scale.centers, None
            else:
                visible = ~masks[i]
                order, valid = pack_visible(visible)
                x, centers = index_points(tokens, order), index_points(scale.centers, order)
                attend = valid[:, None, None, :]  # padding never serves as a key
            if radius > 0:
                near = (torch.cdist(centers, centers) < radius).unsqueeze(1)  # a token always sees itself
                attend = near if attend is None else attend & near
            x = self.blocks[i](x, self.pos_embeds[i](centers), attend)
            out.append(EncodedScale(x, valid, order, visible))
            if i + 1 < len(scales):
                # Visible tokens carry their encoding upward; masked ones keep their embedding, which only
                # masked parents (never encoded) gather: every member of a visible parent is visible.
                if masks is None:
                    full = x
                else:
                    full = tokens.clone()
                    full[visible] = x[valid].to(full.dtype)  # both row-major over the visible tokens
        return out


def three_nn_interpolate(fine_xyz: Tensor, coarse_xyz: Tensor, coarse: Tensor) -> Tensor:
    """PointNet++ interpolation: ``coarse (B, S, C)`` features at ``coarse_xyz (B, S, 3)`` -> ``(B, N, C)``
    at ``fine_xyz (B, N, 3)``, weights ``1 / (d² + 1e-8)`` of the 3 nearest coarse points normalised to
    sum 1 (a single coarse point is copied)."""
    b, n, _ = fine_xyz.shape
    s = coarse_xyz.shape[1]
    if s == 1:
        return coarse.expand(b, n, coarse.shape[-1])
    idx = knn_indices(fine_xyz, coarse_xyz, min(3, s))  # (B, N, 3)
    d2 = (index_points(coarse_xyz, idx) - fine_xyz.unsqueeze(2)).square().sum(-1)
    w = 1.0 / (d2 + 1e-8)
    w = w / w.sum(-1, keepdim=True)
    return (index_points(coarse, idx) * w.unsqueeze(-1).to(coarse.dtype)).sum(2)


class FeaturePropagation(nn.Module):
    """PointNet++ feature propagation (Qi et al., NeurIPS 2017, §3.4) with the reference's fusion:
    ``forward(fine_xyz (B, N, 3), coarse_xyz (B, S, 3), fine (B, N, C1) | None, coarse (B, S, C2))``
    -> ``(B, N, out_dim)``: coarse features interpolated with inverse squared-distance weights of the
    3 nearest coarse points, concatenated after ``fine``, then Linear-BN-GELU and ``blocks`` residual
    blocks (Linear-BN-GELU-Linear-BN, + input, GELU)."""

    def __init__(self, in_dim: int, out_dim: int, blocks: int = 1) -> None:
        super().__init__()
        self.fuse = nn.Sequential(nn.Linear(in_dim, out_dim), nn.BatchNorm1d(out_dim), nn.GELU())
        self.extraction = nn.ModuleList(
            nn.Sequential(nn.Linear(out_dim, out_dim), nn.BatchNorm1d(out_dim), nn.GELU(),
                          nn.Linear(out_dim, out_dim), nn.BatchNorm1d(out_dim))
            for _ in range(blocks))
        self.act = nn.GELU()

    def forward(self, fine_xyz: Tensor, coarse_xyz: Tensor, fine: Tensor | None, coarse: Tensor) -> Tensor:
        b, n, _ = fine_xyz.shape
        interp = three_nn_interpolate(fine_xyz, coarse_xyz, coarse)
        x = interp if fine is None else torch.cat([fine, interp], -1)
        x = self.fuse(x.reshape(b * n, -1))
        for block in self.extraction:
            x = self.act(block(x) + x)
        return x.reshape(b, n, -1)
