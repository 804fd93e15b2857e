"""Building blocks of NestedMorph (Marthi et al., "NestedMorph: Enhancing Deformable Medical Image
Registration with Nested Attention Mechanisms", WACV 2025, arXiv 2410.02550), written for 5D
channel-first tensors ``(B, C, D, H, W)`` throughout.

The encoder and the deep decoder stages use the *dual transformer block* of DAE-Former (Azad et al.,
PRIME 2023): efficient (linear) attention (Shen et al., "Efficient Attention: Attention with Linear
Complexities", WACV 2021), a Mix-FFN with a depth-wise 3³ convolution (Xie et al., SegFormer,
NeurIPS 2021) and squeeze-and-excitation channel attention (Hu et al., CVPR 2018). The shallow
decoder stages use large-kernel attention blocks (Guo et al., "Visual Attention Network", 2022).
Skips are fused with the decoder feature by **nested attention fusion** (the multi-scale gated
attention of MSA²Net, Ghorbani Kolahi et al., BMVC 2024, which NestedMorph adopts).

Every block keeps the channel-first layout and normalises with :class:`ChannelLayerNorm` (a
``LayerNorm`` over channels), so no token reshape can silently mix channels and voxels — the
reference code reshapes a channel-first tensor to tokens with ``view`` in two decoder stages, which
scrambles features; that is not reproduced here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DepthwiseConv3d(nn.Conv3d):
    """Depth-wise ``Conv3d`` (``groups = channels``) that runs in float32 under autocast.

    Under bf16 / fp16 autocast, cuDNN computes the weight gradient of a grouped 3D convolution with one
    kernel launch per channel: on an H100 (cuDNN 9, torch 2.11) a NestedMorph training step at 64³ made
    ~10,000 such launches, 307 ms per step against 73 ms in float32, where the TF32 implicit-GEMM kernel
    does the whole layer at once (docs/gpu-runs/2026-11-26-h100-nestedmorph-bf16-profile.txt). These layers
    hold a small share of the FLOPs, so running them in float32 costs little and keeps mixed precision
    worth using; the output is float32 and the next autocast op casts it as usual. Same parameters
    (``weight``, ``bias``) as ``nn.Conv3d``: checkpoints load either way.
    """

    def __init__(self, channels: int, kernel_size: int, padding: int = 0, dilation: int = 1) -> None:
        super().__init__(channels, channels, kernel_size, padding=padding, dilation=dilation, groups=channels)

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return super().forward(x.float())
        return super().forward(x)


class ChannelLayerNorm(nn.Module):
    """``LayerNorm`` over the channel axis of ``(B, C, D, H, W)`` (the per-token LayerNorm of a
    transformer, written for channel-first volumes)."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        y = F.layer_norm(x.movedim(1, -1), (x.shape[1],), self.weight, self.bias, self.eps)
        return y.movedim(-1, 1)


class EfficientAttention(nn.Module):
    """Efficient attention (Shen et al. 2021): ``softmax_N(K) Vᵀ`` is a ``(c, c)`` context per head,
    applied to ``softmax_C(Q)``; cost linear in the number of voxels ``N``.

    Args:
        dim: channels ``C`` (keys, queries and values all have ``C`` channels, as in NestedMorph).
        heads: number of heads; ``C`` must be divisible by it.

    Shapes: ``(B, C, D, H, W) -> (B, C, D, H, W)``.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"EfficientAttention: dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.keys = nn.Conv3d(dim, dim, 1)
        self.queries = nn.Conv3d(dim, dim, 1)
        self.values = nn.Conv3d(dim, dim, 1)
        self.reprojection = nn.Conv3d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, d, h, w = x.shape
        shape = (b, self.heads, c // self.heads, d * h * w)
        k = self.keys(x).reshape(shape).softmax(dim=-1)  # over voxels
        q = self.queries(x).reshape(shape).softmax(dim=-2)  # over channels of the head
        v = self.values(x).reshape(shape)
        context = k @ v.transpose(-1, -2)  # (B, heads, c_k, c_v)
        out = context.transpose(-1, -2) @ q  # (B, heads, c_v, N)
        return self.reprojection(out.reshape(b, c, d, h, w))


class MixFFN(nn.Module):
    """Mix-FFN with skip (DAE-Former's ``mix_skip``): ``fc2(GELU(LN(dw3³(fc1 x) + fc1 x)))``,
    hidden width ``4 C``. Shapes: ``(B, C, D, H, W) -> (B, C, D, H, W)``."""

    def __init__(self, dim: int, expansion: int = 4) -> None:
        super().__init__()
        hidden = dim * expansion
        self.fc1 = nn.Conv3d(dim, hidden, 1)
        self.dwconv = DepthwiseConv3d(hidden, 3, padding=1)
        self.norm = ChannelLayerNorm(hidden)
        self.fc2 = nn.Conv3d(hidden, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        return self.fc2(F.gelu(self.norm(self.dwconv(h) + h)))


class SqueezeExcitation(nn.Module):
    """SE channel attention (Hu et al. 2018): ``x · σ(W₂ ReLU(W₁ mean_voxels(x)))``, reduction 16,
    no biases (as in NestedMorph). Shapes: ``(B, C, D, H, W) -> (B, C, D, H, W)``."""

    def __init__(self, dim: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(dim // reduction, 1)
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3, 4))))))
        return x * s[:, :, None, None, None]


class DualTransformerBlock(nn.Module):
    """DAE-Former dual transformer block, pre-norm residual form::

        x = x + EA(LN x);  x = x + MixFFN(LN x);  x = x + SE(LN x);  x = x + MixFFN(LN x)

    Shapes: ``(B, C, D, H, W) -> (B, C, D, H, W)``.
    """

    def __init__(self, dim: int, heads: int = 2) -> None:
        super().__init__()
        self.norm1, self.attn = ChannelLayerNorm(dim), EfficientAttention(dim, heads)
        self.norm2, self.mlp1 = ChannelLayerNorm(dim), MixFFN(dim)
        self.norm3, self.channel_attn = ChannelLayerNorm(dim), SqueezeExcitation(dim)
        self.norm4, self.mlp2 = ChannelLayerNorm(dim), MixFFN(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp1(self.norm2(x))
        x = x + self.channel_attn(self.norm3(x))
        return x + self.mlp2(self.norm4(x))


class OverlapPatchEmbed(nn.Module):
    """Overlapping patch embedding: ``Conv3d(kernel, stride, padding=kernel // 2)`` then LayerNorm.
    Kernel 7 / stride 4 for the first stage, kernel 3 / stride 2 after (SegFormer)."""

    def __init__(self, in_channels: int, dim: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_channels, dim, kernel, stride, padding=kernel // 2)
        self.norm = ChannelLayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x))


def pixel_shuffle_3d(x: Tensor, scale: int) -> Tensor:
    """``(B, C·s³, D, H, W) -> (B, C, s·D, s·H, s·W)``: channel group ``(c, i, j, k)`` goes to voxel
    offset ``(i, j, k)`` of the ``s³`` block (the 3D form of ``torch.nn.PixelShuffle``)."""
    b, cs, d, h, w = x.shape
    c = cs // scale**3
    x = x.reshape(b, c, scale, scale, scale, d, h, w)
    return x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, c, d * scale, h * scale, w * scale)


class PatchExpand(nn.Module):
    """Swin-Unet patch expansion in 3D: a bias-free linear map to ``C·s³ / r`` channels, a pixel
    shuffle by ``s`` and LayerNorm. ``scale=2`` halves the channels (``r = 2``, ``C → C/2``);
    ``scale=4`` is the final ×4 expansion keeping ``C`` channels (``r = 1``)."""

    def __init__(self, dim: int, scale: int = 2) -> None:
        super().__init__()
        self.scale = scale
        self.out_dim = dim // 2 if scale == 2 else dim
        self.expand = nn.Conv3d(dim, self.out_dim * scale**3, 1, bias=False)
        self.norm = ChannelLayerNorm(self.out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(pixel_shuffle_3d(self.expand(x), self.scale))


class LargeKernelAttention(nn.Module):
    """VAN large-kernel attention: depth-wise 5³, depth-wise 7³ dilated by 3 (a 19³ receptive
    field), 1×1; the result multiplies the input. Shapes preserved."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv0 = DepthwiseConv3d(dim, 5, padding=2)
        self.conv_spatial = DepthwiseConv3d(dim, 7, padding=9, dilation=3)
        self.conv1 = nn.Conv3d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.conv1(self.conv_spatial(self.conv0(x)))


class LKABlock(nn.Module):
    """VAN block: ``x + γ₁ · SpatialAttention(LN x)``, then ``x + γ₂ · MLP(LN x)`` with
    SpatialAttention = ``proj₂(LKA(GELU(proj₁ y))) + y`` and MLP = ``1×1 → dw3³ → GELU → 1×1``
    (hidden ``4 C``); layer scales γ initialised to 1e-2. Shapes preserved."""

    def __init__(self, dim: int, expansion: int = 4, layer_scale: float = 1e-2) -> None:
        super().__init__()
        hidden = dim * expansion
        self.norm1 = ChannelLayerNorm(dim)
        self.proj1 = nn.Conv3d(dim, dim, 1)
        self.lka = LargeKernelAttention(dim)
        self.proj2 = nn.Conv3d(dim, dim, 1)
        self.norm2 = ChannelLayerNorm(dim)
        self.fc1 = nn.Conv3d(dim, hidden, 1)
        self.dwconv = DepthwiseConv3d(hidden, 3, padding=1)
        self.fc2 = nn.Conv3d(hidden, dim, 1)
        self.gamma1 = nn.Parameter(torch.full((dim, 1, 1, 1), layer_scale))
        self.gamma2 = nn.Parameter(torch.full((dim, 1, 1, 1), layer_scale))

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm1(x)
        x = x + self.gamma1 * (self.proj2(self.lka(F.gelu(self.proj1(y)))) + y)
        return x + self.gamma2 * self.fc2(F.gelu(self.dwconv(self.fc1(self.norm2(x)))))


class NestedAttentionFusion(nn.Module):
    """Nested attention fusion of an encoder skip ``x`` with the decoder feature ``g`` (NestedMorph
    Fig. 2; MSA²Net's multi-scale gated attention).

    - local branch on ``x``: depth-wise 3³ → BN → ReLU → 3³ dilated by 2 → BN → ReLU → 1×1 → BN;
    - global branch on ``g``: channel-mean and channel-max maps → 1×1 (2 → 1) → BN;
    - ``F = BN(local + global)``; ``(A, B) = softmax over 2 channels of 1×1(F)``;
    - ``x' = A·x + x``, ``g' = B·g + g``; cross-gating ``σ(g')·x'`` and ``σ(x')·g'``; their
      product is the interaction;
    - the skip is gated: ``y = BN(1×1(σ(BN(1×1 interaction)) · x))``.

    Shapes: ``x, g (B, C, D, H, W) -> (B, C, D, H, W)``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.local = nn.Sequential(
            DepthwiseConv3d(dim, 3, padding=1),
            nn.BatchNorm3d(dim),
            nn.ReLU(inplace=True),
            nn.Conv3d(dim, dim, 3, padding=2, dilation=2),
            nn.BatchNorm3d(dim),
            nn.ReLU(inplace=True),
            nn.Conv3d(dim, dim, 1),
            nn.BatchNorm3d(dim),
        )
        self.global_proj = nn.Sequential(nn.Conv3d(2, 1, 1), nn.BatchNorm3d(1))
        self.fuse_norm = nn.BatchNorm3d(dim)
        self.selection = nn.Conv3d(dim, 2, 1)
        self.proj = nn.Conv3d(dim, dim, 1)
        self.proj_norm = nn.BatchNorm3d(dim)
        self.out = nn.Conv3d(dim, dim, 1)
        self.out_norm = nn.BatchNorm3d(dim)

    def forward(self, x: Tensor, g: Tensor) -> Tensor:
        global_maps = torch.cat([g.mean(dim=1, keepdim=True), g.amax(dim=1, keepdim=True)], dim=1)
        fused = self.fuse_norm(self.local(x) + self.global_proj(global_maps))
        a, b = self.selection(fused).softmax(dim=1).split(1, dim=1)
        x_att = a * x + x
        g_att = b * g + g
        interaction = (torch.sigmoid(g_att) * x_att) * (torch.sigmoid(x_att) * g_att)
        gate = torch.sigmoid(self.proj_norm(self.proj(interaction)))
        return self.out_norm(self.out(gate * x))
