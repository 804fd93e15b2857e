"""Double-nested autoencoder with class-aware embedding (RAPiD-Seg, Li, Shum, Breckon, ECCV 2024, §3.3).

Per-point RAPiD rows ``(N, k_max)`` become a compact per-voxel embedding ``(M, l·d')``:

- **outer AE**: a voxel set attention encoder (:class:`~threefold.geometry.rapid.vsa.VoxelSetAttention`,
  ``l = 8`` latents of ``d = 64``) turns the rows of a voxel's points into codes ``H ∈ R^{l×d}``; its
  decoder lets each point query (the point's offset inside its voxel) attend over the voxel's codes
  and reconstruct the point's RAPiD row;
- **inner AE**: a per-latent linear map (a 1×1 conv) ``d → d' = 16``, then a ConvFFN — two depth-wise
  3×3×3 submanifold convs with a GELU between them and a residual — for inter-voxel exchange; the
  embedding is the ``(M, l·d')`` result. Its decoder mirrors it (ConvFFN, then ``d' → d``).
- **loss**: ``MSE(reconstructed rows, rows) + λ · class-aware contrastive(embedding, voxel labels)``,
  ``λ = 0.1``, the contrastive term of :func:`~threefold.geometry.rapid.losses.class_aware_contrastive`
  (cosine, hardest positive / negative, ``α_p = 0.9``, ``α_n = 0.5``, ≤ 4096 anchors).

Training is two-stage (paper): stage 1 trains this autoencoder alone; stage 2 trains the segmentation
network with it frozen (the paper's description, the default of the pipelines) or co-trained with
weight ``γ = 0.5`` on this loss.

What differs from the reference code: the official repository released only a simplified package;
the nesting, widths and loss follow the paper's text. A voxel's label for the contrastive term is the
majority label of its points (ignored points excluded).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from threefold.geometry.rapid.losses import IGNORE_INDEX, class_aware_contrastive
from threefold.geometry.rapid.sparse import DepthwiseSubMConv3d
from threefold.geometry.rapid.vsa import PointQueryDecoder, VoxelSetAttention


class ConvFFN(nn.Module):
    """``x + DW₂(GELU(DW₁(x)))`` with depth-wise submanifold 3×3×3 convs over the voxels."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.dw1 = DepthwiseSubMConv3d(channels)
        self.dw2 = DepthwiseSubMConv3d(channels)
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: Tensor, indices: Tensor, table: Tensor) -> Tensor:
        return x + self.dw2(F.gelu(self.dw1(self.norm(x), indices, table)), indices, table)


def voxel_majority_label(labels: Tensor, inverse: Tensor, num_voxels: int, num_classes: int) -> Tensor:
    """``(M,)`` int64: the most frequent non-ignored label of each voxel's points (-1 if none)."""
    keep = labels != IGNORE_INDEX
    counts = torch.zeros(num_voxels * num_classes, dtype=torch.long, device=labels.device)
    counts.index_add_(0, inverse[keep] * num_classes + labels[keep], torch.ones_like(labels[keep]))
    counts = counts.view(num_voxels, num_classes)
    return torch.where(counts.sum(1) > 0, counts.argmax(1), torch.full_like(counts[:, 0], IGNORE_INDEX))


class DoubleNestedAutoencoder(nn.Module):
    """RAPiD rows → class-aware voxel embedding, with the reconstruction path for training.

    Args:
        rapid_channels: k_max (10 for SemanticKITTI's k = 10 / 7 / 5).
        latents: l; dim: d; inner_dim: d'.
        contrastive_weight: λ; alpha_pos, alpha_neg: hinge margins; max_anchors: anchor budget.
    """

    def __init__(self, rapid_channels: int = 10, latents: int = 8, dim: int = 64, inner_dim: int = 16,
                 contrastive_weight: float = 0.1, alpha_pos: float = 0.9, alpha_neg: float = 0.5,
                 max_anchors: int = 4096) -> None:
        super().__init__()
        self.latents, self.dim, self.inner_dim = latents, dim, inner_dim
        self.encoder = VoxelSetAttention(rapid_channels, latents, dim)
        self.squeeze = nn.Linear(dim, inner_dim)
        self.inner_ffn = ConvFFN(latents * inner_dim)
        self.inner_ffn_dec = ConvFFN(latents * inner_dim)
        self.unsqueeze = nn.Linear(inner_dim, dim)
        self.decoder = PointQueryDecoder(3, dim, rapid_channels)
        self.contrastive_weight, self.alpha_pos, self.alpha_neg, self.max_anchors = (
            contrastive_weight, alpha_pos, alpha_neg, max_anchors)

    @property
    def out_channels(self) -> int:
        return self.latents * self.inner_dim

    def encode(self, rapid: Tensor, inverse: Tensor, indices: Tensor, table: Tensor) -> Tensor:
        """rapid ``(N, k_max)`` float32, inverse ``(N,)``, voxel ``indices (M, 4)``, neighbour
        ``table (27, M)`` → embedding ``(M, l·d')``."""
        m = indices.shape[0]
        h = self.encoder(rapid, inverse, m)  # (M, l, d)
        z = self.squeeze(h).flatten(1)  # (M, l·d')
        return self.inner_ffn(z, indices, table)

    def decode(self, z: Tensor, offset: Tensor, inverse: Tensor, indices: Tensor, table: Tensor) -> Tensor:
        """embedding ``(M, l·d')`` + point ``offset (N, 3)`` (inside the voxel, in voxel units) → rows ``(N, k_max)``."""
        h = self.unsqueeze(self.inner_ffn_dec(z, indices, table).view(-1, self.latents, self.inner_dim))
        return self.decoder(h, offset, inverse)

    def loss(self, rapid: Tensor, offset: Tensor, inverse: Tensor, indices: Tensor, table: Tensor,
             voxel_labels: Tensor | None, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """``MSE + λ·contrastive``; returns (loss, embedding ``(M, l·d')``, parts ``{"mse", "contrastive"}``)."""
        z = self.encode(rapid, inverse, indices, table)
        mse = F.mse_loss(self.decode(z, offset, inverse, indices, table), rapid)
        if voxel_labels is not None and self.contrastive_weight > 0:
            con = class_aware_contrastive(z, voxel_labels, self.alpha_pos, self.alpha_neg, self.max_anchors, generator)
        else:
            con = mse * 0.0
        return mse + self.contrastive_weight * con, z, {"mse": mse.detach(), "contrastive": con.detach()}
