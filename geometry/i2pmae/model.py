"""I2P-MAE pretraining model (Zhang et al., "Learning 3D Representations from 2D Pre-trained Models via
Image-to-Point Masked Autoencoders", CVPR 2023, §3; reference ``I2P_MAE`` in ZrrSkywalker/I2P-MAE
``models/I2P_MAE.py``, config ``cfgs/pre-training/i2p-mae.yaml``).

``I2PMAE(points (B, N, 3))``:

1. multi-scale tokens (:func:`hierarchical_groups`, 512 / 256 / 64 × 16 / 8 / 8);
2. the cloud's three depth views (:func:`project_views`) go through the frozen 2D teacher ->
   patch features (3, B, C, 14, 14) and [CLS] attention (3, B, 14, 14);
3. 2D-guided masking of the top scale (ratio 0.8), propagated down the hierarchy;
4. the hierarchical encoder on visible tokens; a decoder of ``decoder_depths = [1, 1]`` blocks at the
   64- and 256-token scales (dims 384 → 192), the 64-scale output carried to the 256 scale by
   PointNet++ feature propagation next to the encoder's visible 256-scale tokens;
5. targets at the 256-token scale: every masked token predicts its 8 members' re-centred coordinates
   (Chamfer-L2: sum of the two mean squared nearest-neighbour distances, averaged over masked tokens),
   every visible token predicts the teacher features at its 8 members' pixels in the 3 views
   (8 × 3 × C values, MSE); ``loss = loss_3d + loss_2d``.

The teacher is held outside the state dict (a frozen 86 M-parameter CLIP would otherwise be written into
every checkpoint); it follows the input's device. :func:`nearest_visible_members` is the
"learns nothing" baseline of the masked Chamfer-L2.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from threefold.datasets.errors import ConfigError
from threefold.geometry.i2pmae.encoder import (
    FeaturePropagation,
    HierarchicalEncoder,
    MaskedTransformer,
    Scale,
    centre_mlp,
    hierarchical_groups,
    pack_visible,
)
from threefold.geometry.i2pmae.masking import center_saliency, guided_mask, propagate_mask
from threefold.geometry.i2pmae.projection import VIEW_AXES, project_views, sample_view_map, view_coordinates
from threefold.geometry.i2pmae.teacher import Teacher2D
from threefold.geometry.neighbors import index_points
from threefold.geometry.pointmae.model import patch_chamfer_l2


class I2PMAE(nn.Module):
    """Pretraining model. ``forward(points (B, N, 3), generator)`` -> dict with ``loss``, ``loss_3d``,
    ``loss_2d`` (scalars), ``masks`` (one (B, G_s) bool per scale, True = masked), ``scales``
    (:class:`Scale` list), ``pred_3d`` / ``target_3d`` ``(M, k, 3)`` over the masked target-scale
    tokens of the batch (row-major), ``pred_2d`` / ``target_2d`` ``(V, k, 3·C)`` over the visible
    ones (views concatenated: xyz, zxy, yzx), ``saliency (B, G_top)``."""

    def __init__(self, teacher: Teacher2D, num_groups: Sequence[int] = (512, 256, 64),
                 group_sizes: Sequence[int] = (16, 8, 8), dims: Sequence[int] = (96, 192, 384),
                 depths: Sequence[int] = (5, 5, 5), heads: int = 6, mask_ratio: float = 0.8,
                 decoder_depths: Sequence[int] = (1, 1), decoder_up_blocks: Sequence[int] = (1,),
                 drop_path: float = 0.1, mlp_ratio: float = 4.0, embed_width: int = 128) -> None:
        super().__init__()
        n = len(dims)
        if not 1 <= len(decoder_depths) <= n or len(decoder_up_blocks) != len(decoder_depths) - 1:
            raise ConfigError(f"decoder_depths {list(decoder_depths)} / decoder_up_blocks {list(decoder_up_blocks)}: "
                              f"expected 1..{n} decoder stages and one up-block count between consecutive stages")
        self.num_groups, self.group_sizes, self.mask_ratio = list(num_groups), list(group_sizes), mask_ratio
        self.encoder = HierarchicalEncoder(dims, depths, heads, mlp_ratio, drop_path, embed_width)
        self.target_scale = n - len(decoder_depths)  # 1: the 256-token scale
        for s in range(self.target_scale):  # the decoder never reads these scales' norms (DDP: no unused parameters)
            self.encoder.norms[s] = nn.Identity()
        dec_dims = list(dims)[::-1][: len(decoder_depths)]
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dims[0]))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        rates = torch.linspace(0, drop_path, sum(decoder_depths)).tolist()
        starts = [sum(decoder_depths[:i]) for i in range(len(decoder_depths))]
        self.decoder = nn.ModuleList(MaskedTransformer(d, heads, rates[s:s + k], mlp_ratio)
                                     for d, s, k in zip(dec_dims, starts, decoder_depths))
        for m in self.decoder.modules():  # the reference's Decoder_Block initialisation
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.decoder_pos_embeds = nn.ModuleList(centre_mlp(d) for d in dec_dims)
        self.propagation = nn.ModuleList(
            FeaturePropagation(dec_dims[i] + dec_dims[i - 1], dec_dims[i], decoder_up_blocks[i - 1])
            for i in range(1, len(dec_dims)))
        self.decoder_norm = nn.LayerNorm(dec_dims[-1])
        k = group_sizes[self.target_scale]
        self.feature_dim = teacher.feature_dim
        self.rec_head_3d = nn.Linear(dec_dims[-1], 3 * k)  # the reference's Conv1d(C, 3k, 1) on tokens
        self.rec_head_2d = nn.Linear(dec_dims[-1], len(VIEW_AXES) * k * teacher.feature_dim)
        self._teacher = [teacher]  # not a submodule: kept out of state_dict / parameters()

    @property
    def teacher(self) -> Teacher2D:
        return self._teacher[0]

    def _teach(self, points: Tensor) -> tuple[Tensor, Tensor, list]:
        teacher = self.teacher
        ref = next(teacher.parameters(), None)
        if ref is not None and ref.device != points.device:
            teacher.to(points.device)
        images, geoms = project_views(points)  # (3, B, 3, 224, 224)
        v, b = images.shape[:2]
        with torch.no_grad():
            feats, attn = teacher(images.flatten(0, 1))
        feats = feats.float().reshape(v, b, *feats.shape[1:])
        attn = attn.float().reshape(v, b, *attn.shape[1:])
        return feats, attn, geoms

    def masks_from_saliency(self, scales: list[Scale], saliency: Tensor,
                            generator: torch.Generator | None) -> list[Tensor]:
        """Top-scale 2D-guided mask propagated down: one ``(B, G_s)`` bool per scale."""
        masks = [guided_mask(saliency, self.mask_ratio, generator)]
        for s in range(len(scales) - 1, 0, -1):
            masks.append(propagate_mask(masks[-1], scales[s].members, scales[s - 1].centers.shape[1]))
        return masks[::-1]

    def forward(self, points: Tensor, generator: torch.Generator | None = None) -> dict[str, object]:
        scales = hierarchical_groups(points, self.num_groups, self.group_sizes)
        feats, attn, geoms = self._teach(points)
        saliency = center_saliency(attn, scales[-1].centers, geoms)
        masks = self.masks_from_saliency(scales, saliency, generator)
        encoded = self.encoder(scales, masks)
        norms = self.encoder.norms
        top = len(scales) - 1

        # Decoder, top scale: visible tokens (the same count in every cloud) then one mask token per masked one.
        enc = encoded[top]
        b, g_top = masks[top].shape
        order_all = torch.argsort(masks[top].to(torch.int8), dim=1, stable=True)  # visible first
        centers_prev = index_points(scales[top].centers, order_all)
        visible_tokens = norms[top](enc.tokens)
        x = torch.cat([visible_tokens, self.mask_token.expand(b, g_top - visible_tokens.shape[1], -1)], 1)
        x = self.decoder[0](x, self.decoder_pos_embeds[0](centers_prev))
        for j in range(1, len(self.decoder)):
            s = top - j
            enc = encoded[s]
            fine = visible_tokens.new_zeros(b, scales[s].centers.shape[1], enc.tokens.shape[-1])
            fine[enc.visible] = norms[s](enc.tokens)[enc.valid].to(fine.dtype)
            x = self.propagation[j - 1](scales[s].centers, centers_prev, fine, x)
            x = self.decoder[j](x, self.decoder_pos_embeds[j](scales[s].centers))
            centers_prev = scales[s].centers
        x = self.decoder_norm(x)  # (B, G_t, C)

        t = self.target_scale
        mask_t = masks[t]
        k = self.group_sizes[t]
        pred_3d = self.rec_head_3d(x[mask_t]).reshape(-1, k, 3)
        target_3d = scales[t].neighborhood[mask_t]
        loss_3d = patch_chamfer_l2(pred_3d, target_3d)

        # 2D targets: teacher features at each visible token's members, in every view. Only visible tokens'
        # members are sampled (packed per cloud, as the views' geometry is per cloud).
        vis_t = ~mask_t
        order, valid = pack_visible(vis_t)
        members = index_points(scales[t].neighborhood_abs.reshape(b, -1, k * 3), order).reshape(b, -1, 3)
        c3 = len(geoms) * self.feature_dim
        target_2d = torch.cat([sample_view_map(feats[v], view_coordinates(members, v), geoms[v])
                               for v in range(len(geoms))], -1).reshape(b, -1, k, c3)[valid]
        pred_2d = self.rec_head_2d(x[vis_t]).reshape(-1, k, c3)
        loss_2d = nn.functional.mse_loss(pred_2d.float(), target_2d.float())
        return {"loss": loss_3d + loss_2d, "loss_3d": loss_3d, "loss_2d": loss_2d, "masks": masks,
                "scales": scales, "pred_3d": pred_3d, "target_3d": target_3d, "pred_2d": pred_2d,
                "target_2d": target_2d, "saliency": saliency}


def nearest_visible_members(scale: Scale, mask: Tensor) -> Tensor:
    """The "learns nothing" baseline at one scale: each masked token's re-centred members predicted as
    those of the nearest visible token. ``mask (B, G)`` bool (at least one visible per cloud) ->
    ``(M, k, 3)`` over the masked tokens, row-major (the order of :class:`I2PMAE`'s ``pred_3d``)."""
    d = torch.cdist(scale.centers, scale.centers)
    d = d.masked_fill(mask.unsqueeze(1), float("inf"))  # only visible tokens may be the answer
    nearest = d.argmin(-1)  # (B, G)
    b, g, k, _ = scale.neighborhood.shape
    guess = index_points(scale.neighborhood.reshape(b, g, k * 3), nearest).reshape(b, g, k, 3)
    return guess[mask]
