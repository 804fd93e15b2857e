"""I2P-MAE fine-tuning classifier and frozen SVM features (Zhang et al., CVPR 2023, §4; reference
``I2P_MAE_ModelNet40`` / ``I2P_MAE_ScanObjectNN`` in ZrrSkywalker/I2P-MAE ``models/I2P_MAE_Finetune.py``).

``I2PMAEClassifier(points (B, N, 3))`` -> ``logits (B, classes)``: the hierarchical encoder on every
token with local attention (a token attends only to tokens of its scale closer than that scale's
radius: [0.24, 0.48, 0.96] for ModelNet40, [0.48, 0.96, 1.92] for ScanObjectNN), a LayerNorm on the
top-scale tokens, their mean and max pooled — summed for ModelNet40 (``pooling="sum"``), concatenated
for ScanObjectNN (``pooling="concat"``), as the two reference heads — then Linear-BN-ReLU-Dropout(0.5)
×2 and a Linear to the classes.

:func:`i2pmae_features`: the linear-SVM features, max over the LayerNorm-ed top-scale tokens of the
pretraining encoder with nothing masked and global attention (the reference's ``eval=True`` path).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from threefold.datasets.errors import ConfigError
from threefold.geometry.encoder_weights import load_encoder_weights
from threefold.geometry.i2pmae.encoder import HierarchicalEncoder, hierarchical_groups


class I2PMAEClassifier(nn.Module):
    """Fine-tuning model; ``encoder`` has the pretraining encoder's parameter names except the per-scale
    norms (the reference fine-tunes with a fresh top LayerNorm, :attr:`norm`)."""

    def __init__(self, num_classes: int, num_groups: Sequence[int] = (512, 256, 64),
                 group_sizes: Sequence[int] = (32, 16, 16), dims: Sequence[int] = (96, 192, 384),
                 depths: Sequence[int] = (5, 5, 5), heads: int = 6, radii: Sequence[float] = (0.48, 0.96, 1.92),
                 drop_path: float = 0.1, mlp_ratio: float = 4.0, embed_width: int = 128, pooling: str = "concat",
                 head_dropout: float = 0.5) -> None:
        super().__init__()
        if pooling not in ("sum", "concat"):
            raise ConfigError(f"pooling={pooling!r}, expected 'sum' (ModelNet40) or 'concat' (ScanObjectNN)")
        if len(radii) != len(dims):
            raise ConfigError(f"radii {list(radii)} must give one radius per scale ({len(dims)})")
        self.num_groups, self.group_sizes, self.radii, self.pooling = list(num_groups), list(group_sizes), list(radii), pooling
        self.encoder = HierarchicalEncoder(dims, depths, heads, mlp_ratio, drop_path, embed_width)
        del self.encoder.norms  # unused here; kept out so that every parameter gets a gradient (DDP)
        dim = dims[-1]
        self.norm = nn.LayerNorm(dim)
        width = 2 * dim if pooling == "concat" else dim
        self.head = nn.Sequential(
            nn.Linear(width, 256), nn.BatchNorm1d(256), nn.ReLU(inplace=True), nn.Dropout(head_dropout),
            nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU(inplace=True), nn.Dropout(head_dropout),
            nn.Linear(256, num_classes),
        )

    def features(self, points: Tensor) -> Tensor:
        """``(B, N, 3)`` -> pooled top-scale features ``(B, C)`` (sum) or ``(B, 2C)`` (concat)."""
        scales = hierarchical_groups(points, self.num_groups, self.group_sizes)
        x = self.norm(self.encoder(scales, None, self.radii)[-1].tokens)
        if self.pooling == "sum":
            return x.mean(1) + x.max(1).values
        return torch.cat([x.mean(1), x.max(1).values], -1)

    def forward(self, points: Tensor) -> Tensor:
        return self.head(self.features(points))

    def load_encoder(self, state: Mapping[str, Tensor], source: str) -> int:
        """Copy the ``encoder.*`` tensors of an I2P-MAE pretraining state dict (plain or a Lightning
        ``state_dict`` with a ``model.`` prefix; the per-scale norms are skipped). Returns the number
        loaded; missing, extra or mis-shaped tensors raise :class:`ConfigError` naming ``source``."""
        return load_encoder_weights(self.encoder, state, source, "I2P-MAE", skip=("norms.",))


@torch.no_grad()
def i2pmae_features(encoder: HierarchicalEncoder, points: Tensor, num_groups: Sequence[int],
                    group_sizes: Sequence[int]) -> Tensor:
    """Linear-SVM features: ``points (B, N, 3)`` -> ``(B, C_top)`` float32, the max over the normalised
    top-scale tokens of the pretraining encoder (no mask, global attention)."""
    scales = hierarchical_groups(points, num_groups, group_sizes)
    top = encoder(scales)[-1].tokens
    return encoder.norms[-1](top).max(1).values.float()
