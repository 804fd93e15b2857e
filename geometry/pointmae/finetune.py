"""Point-MAE fine-tuning classifier and frozen features (Pang et al., ECCV 2022, §4.1-4.2; reference
``PointTransformer`` in Pang-Yatian/Point-MAE ``models/Point_MAE.py``).

``PointMAEClassifier(points (B, N, 3))`` -> ``logits (B, num_classes)``: the pretrained encoder on all
patches (no mask) with a learned class token and class position prepended, then the class-token output
concatenated with the max-pooled patch tokens (2·dim) into the head Linear(2C, 256)-BN-ReLU-Dropout(0.5)-
Linear(256, 256)-BN-ReLU-Dropout(0.5)-Linear(256, classes) of the paper's fine-tuning recipe.

:func:`max_pooled_features` gives the frozen features of the linear-SVM protocol: the max over the
encoder's output tokens of every patch, ``(B, dim)``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from threefold.geometry.encoder_weights import load_encoder_weights
from threefold.geometry.pointmae.model import PointMAEEncoder, group_points, init_weights


class PointMAEClassifier(nn.Module):
    """Fine-tuning model; ``encoder`` has the same parameter names as :attr:`PointMAE.encoder`."""

    def __init__(self, num_classes: int, num_group: int = 64, group_size: int = 32, dim: int = 384,
                 depth: int = 12, heads: int = 6, mlp_ratio: float = 4.0, drop_path: float = 0.1,
                 embed_width: int = 128, head_dropout: float = 0.5) -> None:
        super().__init__()
        self.num_group, self.group_size = num_group, group_size
        self.encoder = PointMAEEncoder(dim, depth, heads, mlp_ratio, drop_path, embed_width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, dim))
        self.head = nn.Sequential(
            nn.Linear(2 * dim, 256), nn.BatchNorm1d(256), nn.ReLU(inplace=True), nn.Dropout(head_dropout),
            nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU(inplace=True), nn.Dropout(head_dropout),
            nn.Linear(256, num_classes),
        )
        init_weights(self)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.cls_pos, std=0.02)

    def features(self, points: Tensor) -> Tensor:
        """``(B, N, 3)`` -> ``(B, 2·dim)``: class-token output and max-pooled patch tokens."""
        patches, centers = group_points(points, self.num_group, self.group_size)
        enc = self.encoder
        tokens = enc.patch_embed(patches)
        b = tokens.shape[0]
        x = torch.cat([self.cls_token.expand(b, -1, -1), tokens], 1)
        pos = torch.cat([self.cls_pos.expand(b, -1, -1), enc.pos_embed(centers)], 1)
        x = enc.norm(enc.blocks(x, pos))
        return torch.cat([x[:, 0], x[:, 1:].max(1).values], -1)

    def forward(self, points: Tensor) -> Tensor:
        return self.head(self.features(points))

    def load_encoder(self, state: Mapping[str, Tensor], source: str) -> int:
        """Copy the ``encoder.*`` entries of a pretraining state dict (a :class:`PointMAE` state or a
        Lightning ``state_dict`` with a ``model.`` prefix); returns the number of tensors loaded.
        Missing, extra or mis-shaped encoder tensors raise :class:`ConfigError` naming ``source``."""
        return load_encoder_weights(self.encoder, state, source, "Point-MAE")


@torch.no_grad()
def max_pooled_features(encoder: PointMAEEncoder, points: Tensor, num_group: int, group_size: int) -> Tensor:
    """Frozen features for the linear-SVM protocol: encoder on every patch (no mask), max over tokens.
    ``points (B, N, 3)`` -> ``(B, dim)`` float32."""
    patches, centers = group_points(points, num_group, group_size)
    return encoder(patches, centers).max(1).values.float()
