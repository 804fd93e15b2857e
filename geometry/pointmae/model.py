"""Point-MAE: masked autoencoding of point patches (Pang et al., "Masked Autoencoders for Point Cloud
Self-supervised Learning", ECCV 2022, §3; reference code Pang-Yatian/Point-MAE ``models/Point_MAE.py``).

Shapes (B clouds of N points, G patches of k points, C = ``dim``):

* :func:`group_points`: ``points (B, N, 3)`` -> ``patches (B, G, k, 3)`` re-centred on ``centers (B, G, 3)``
  (exact FPS from point 0, then kNN), in the points' unit (unit sphere after normalisation).
* :class:`PatchEmbed` (mini-PointNet, §3.2): pointwise 3→w→2w, max-pool, concat the pooled feature to
  every point (4w), pointwise 4w→4w→C, max-pool -> ``tokens (B, G, C)``; w = 128 in the paper.
* :func:`random_patch_mask`: ``(B, G)`` bool, exactly ``int(ratio * G)`` True (masked) per cloud.
* :class:`PointMAEEncoder`: pre-norm transformer blocks on the visible tokens only, the positional
  MLP of the centres (3→128→C, GELU) added before every block, then LayerNorm.
* :class:`PointMAE`: encoder + decoder (a shared learned mask token for every masked patch, its own
  positional MLP, ``decoder_depth`` blocks, LayerNorm, a pointwise C→3k layer) and the Chamfer-L2 loss
  (squared distances, sum of the two directional means, averaged over masked patches).

Differences from the reference code: the mask is drawn from a ``torch.Generator`` (the reference
uses the global NumPy state in a Python loop); FPS/kNN are pure torch (no CUDA extensions); attention
uses :func:`torch.nn.functional.scaled_dot_product_attention`, the same function as the reference's
explicit softmax.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from threefold.datasets.errors import ConfigError, DataFormatError
from threefold.geometry.chamfer import chamfer_distance
from threefold.geometry.neighbors import group_patches, index_points, knn_indices
from threefold.geometry.sampling import farthest_point_sampling


def group_points(points: Tensor, num_group: int, group_size: int) -> tuple[Tensor, Tensor]:
    """Point-MAE patches: FPS ``num_group`` centres (first point first), their ``group_size`` nearest
    points re-centred. ``points (B, N, 3)`` float -> ``patches (B, G, k, 3)``, ``centers (B, G, 3)``."""
    if points.dim() != 3 or points.shape[-1] != 3:
        raise DataFormatError(f"group_points: points {tuple(points.shape)}, expected (B, N, 3)")
    if not 1 <= group_size <= points.shape[1]:
        raise ConfigError(f"group_points: group_size={group_size} must be between 1 and N={points.shape[1]}")
    centers = index_points(points, farthest_point_sampling(points.detach(), num_group))
    patches, _ = group_patches(points, centers, group_size)
    return patches, centers


def random_patch_mask(batch: int, num_group: int, ratio: float, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> Tensor:
    """Random masking (§3.1): ``(B, G)`` bool with exactly ``int(ratio * G)`` masked patches per cloud,
    uniformly chosen. The draw happens on ``generator``'s device and moves to ``device``."""
    if not 0 <= ratio < 1:
        raise ConfigError(f"mask ratio {ratio} must be in [0, 1)")
    num_mask = int(ratio * num_group)
    gen_device = generator.device if generator is not None else device
    noise = torch.rand(batch, num_group, generator=generator, device=gen_device)
    rank = noise.argsort(1).argsort(1)
    return (rank < num_mask).to(device if device is not None else noise.device)


class PatchEmbed(nn.Module):
    """Mini-PointNet patch embedding (§3.2): ``patches (B, G, k, 3)`` -> ``tokens (B, G, dim)``.

    The paper's pointwise Conv1d layers are written as Linear layers on channels-last points, the same
    operation (a kernel-1 convolution is a shared Linear) at a fraction of the CPU cost; BatchNorm
    statistics run over all B·G·k points per channel, as BatchNorm1d over (B·G, C, k) does.
    """

    def __init__(self, dim: int = 384, width: int = 128) -> None:
        super().__init__()
        self.first_conv = nn.Sequential(nn.Linear(3, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
                                        nn.Linear(width, 2 * width))
        self.second_conv = nn.Sequential(nn.Linear(4 * width, 4 * width), nn.BatchNorm1d(4 * width),
                                         nn.ReLU(inplace=True), nn.Linear(4 * width, dim))
        self.dim = dim

    def forward(self, patches: Tensor) -> Tensor:
        b, g, k, _ = patches.shape
        x = self.first_conv(patches.reshape(b * g * k, 3)).reshape(b * g, k, -1)  # (BG, k, 2w)
        pooled = x.max(1, keepdim=True).values
        x = torch.cat([pooled.expand(-1, k, -1), x], 2).reshape(b * g * k, -1)  # (BGk, 4w)
        x = self.second_conv(x).reshape(b * g, k, self.dim)
        return x.max(1).values.reshape(b, g, self.dim)


class DropPath(nn.Module):
    """Stochastic depth (Huang et al., ECCV 2016): drop the residual branch of a whole sample with
    probability ``p`` in training and rescale the kept ones by ``1 / (1 - p)``."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        keep = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device, dtype=x.dtype) >= self.p
        return x * keep / (1 - self.p)


class Attention(nn.Module):
    """Multi-head self-attention, qkv without bias as the reference."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"attention: dim={dim} is not divisible by heads={heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + DropPath(Attn(LN(x)))``, then ``x + DropPath(MLP(LN(x)))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def positional_mlp(dim: int) -> nn.Sequential:
    """Centre positional embedding (§3.2): Linear(3, 128), GELU, Linear(128, dim)."""
    return nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, dim))


class Transformer(nn.Module):
    """A stack of :class:`Block` with the positional embedding added before every block; drop-path
    rates rise linearly from 0 to ``drop_path``."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0) -> None:
        super().__init__()
        rates = torch.linspace(0, drop_path, depth).tolist() if depth > 0 else []
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, r) for r in rates)

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x + pos)
        return x


def init_weights(module: nn.Module) -> None:
    """The reference's initialisation: truncated normal (std 0.02) for Linear/Conv1d weights, zero biases,
    unit LayerNorm."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class PointMAEEncoder(nn.Module):
    """Patch embedding + positional MLP + ``depth`` blocks + LayerNorm (the reference's ``MaskTransformer``
    without its mask). ``forward(patches (B, G, k, 3), centers (B, G, 3), visible (B, G) bool | None)``
    -> ``(B, V, dim)`` tokens of the visible patches (all G when ``visible`` is None), in patch order."""

    def __init__(self, dim: int = 384, depth: int = 12, heads: int = 6, mlp_ratio: float = 4.0,
                 drop_path: float = 0.1, embed_width: int = 128) -> None:
        super().__init__()
        self.dim = dim
        self.patch_embed = PatchEmbed(dim, embed_width)
        self.pos_embed = positional_mlp(dim)
        self.blocks = Transformer(dim, depth, heads, mlp_ratio, drop_path)
        self.norm = nn.LayerNorm(dim)

    def forward(self, patches: Tensor, centers: Tensor, visible: Tensor | None = None) -> Tensor:
        tokens = self.patch_embed(patches)
        b = tokens.shape[0]
        if visible is not None:
            tokens = tokens[visible].reshape(b, -1, self.dim)
            centers = centers[visible].reshape(b, -1, 3)
        return self.norm(self.blocks(tokens, self.pos_embed(centers)))


def patch_chamfer_l2(pred: Tensor, target: Tensor) -> Tensor:
    """Chamfer-L2 of Point-MAE (§3.3): per patch, squared nearest-neighbour distances averaged in each
    direction and the two means summed; averaged over patches. ``(P, k, 3)`` each -> scalar.
    Computed in at least float32 whatever the autocast dtype: squared distances of patch points (~1e-4) lose
    most of their digits in bfloat16."""
    dtype = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    return chamfer_distance(pred.to(dtype), target.to(dtype), squared=True, reduction="sum").mean()


class PointMAE(nn.Module):
    """Point-MAE pretraining model (§3). ``forward(points (B, N, 3), generator)`` -> dict with
    ``loss`` (scalar Chamfer-L2 over masked patches), ``pred`` / ``target`` (B, M, k, 3) re-centred
    masked patches, ``mask`` (B, G) bool, ``patches`` (B, G, k, 3), ``centers`` (B, G, 3)."""

    def __init__(self, num_group: int = 64, group_size: int = 32, mask_ratio: float = 0.6, dim: int = 384,
                 depth: int = 12, heads: int = 6, decoder_depth: int = 4, decoder_heads: int = 6,
                 mlp_ratio: float = 4.0, drop_path: float = 0.1, embed_width: int = 128) -> None:
        super().__init__()
        self.num_group, self.group_size, self.mask_ratio = num_group, group_size, mask_ratio
        self.encoder = PointMAEEncoder(dim, depth, heads, mlp_ratio, drop_path, embed_width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.decoder_pos_embed = positional_mlp(dim)
        self.decoder = Transformer(dim, decoder_depth, decoder_heads, mlp_ratio, drop_path)
        self.decoder_norm = nn.LayerNorm(dim)
        self.increase_dim = nn.Linear(dim, 3 * group_size)  # the reference's Conv1d(C, 3k, 1) on tokens
        init_weights(self)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, points: Tensor, generator: torch.Generator | None = None,
                mask: Tensor | None = None) -> dict[str, Tensor]:
        patches, centers = group_points(points, self.num_group, self.group_size)
        b, g = centers.shape[:2]
        if mask is None:
            mask = random_patch_mask(b, g, self.mask_ratio, generator, points.device)
        visible = self.encoder(patches, centers, ~mask)
        m = int(mask[0].sum())
        dim = visible.shape[-1]
        pos = torch.cat([self.decoder_pos_embed(centers[~mask].reshape(b, -1, 3)),
                         self.decoder_pos_embed(centers[mask].reshape(b, m, 3))], 1)
        x = torch.cat([visible, self.mask_token.expand(b, m, dim)], 1)
        x = self.decoder_norm(self.decoder(x, pos)[:, -m:])
        pred = self.increase_dim(x).reshape(b, m, self.group_size, 3)
        target = patches[mask].reshape(b, m, self.group_size, 3)
        loss = patch_chamfer_l2(pred.reshape(b * m, -1, 3), target.reshape(b * m, -1, 3))
        return {"loss": loss, "pred": pred, "target": target, "mask": mask, "patches": patches, "centers": centers}


def nearest_visible_patch(patches: Tensor, centers: Tensor, mask: Tensor) -> Tensor:
    """The "learns nothing" baseline: each masked patch predicted as the re-centred patch of its nearest
    visible centre. ``patches (B, G, k, 3)``, ``centers (B, G, 3)``, ``mask (B, G)`` bool (same masked
    count per cloud) -> ``(B, M, k, 3)`` in masked-patch order."""
    b, g, k, _ = patches.shape
    m = int(mask[0].sum())
    vis_centers = centers[~mask].reshape(b, g - m, 3)
    vis_patches = patches[~mask].reshape(b, g - m, k * 3)
    nearest = knn_indices(centers[mask].reshape(b, m, 3), vis_centers, 1).squeeze(-1)  # (B, M)
    return index_points(vis_patches, nearest).reshape(b, m, k, 3)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
