"""NestedMorph: deformable registration with a transformer encoder and nested attention fusion.

Marthi, Kumar, Chen, Sridhar, Bhattacharya, "NestedMorph: Enhancing Deformable Medical Image
Registration with Nested Attention Mechanisms", WACV 2025 (arXiv 2410.02550); reference code
AS-Lab/Marthi-et-al-2024-NestedMorph-Deformable-Medical-Image-Registration (MIT). Written from the
paper and the reference's structure; blocks in :mod:`threefold.medical.registration.blocks`.

Architecture (input ``concat(moving, fixed)``, 2 channels, spatial size ``S`` a multiple of 32)::

    stage 1  OverlapPatchEmbed k7 s4 → 48 ch @ S/4   → DualTransformerBlock → e1
    stage 2  OverlapPatchEmbed k3 s2 → 96 ch @ S/8   → DualTransformerBlock → e2
    stage 3  OverlapPatchEmbed k3 s2 → 192 ch @ S/16 → DualTransformerBlock → e3
    stage 4  OverlapPatchEmbed k3 s2 → 384 ch @ S/32 → DualTransformerBlock → e4
    decoder  d3 = PatchExpand(e4)                                       192 @ S/16
             d2 = PatchExpand(2 × DualTransformer(LN(g + NAF(e3, g))))  96 @ S/8,  g = Linear(d3)
             d1 = PatchExpand(2 × LKABlock(LN(g + NAF(e2, g))))         48 @ S/4,  g = Linear(d2)
             d0 = PatchExpand×4(2 × LKABlock(LN(g + NAF(e1, g))))       48 @ S,    g = Linear(d1)
    head     Conv3d(48 → 3, 3³), weights N(0, 1e-5), bias 0 → displacement (voxels)

Differences from the reference code, and why:

- The reference builds transformer blocks and a fusion module at 384 channels for the deepest
  decoder stage but never calls them (that stage only expands); they hold about 10 M of its
  21.96 M parameters. They are not built here (:data:`REFERENCE_PARAMETERS` and the docs give
  both counts).
- The reference ends the decoder in a 1-channel 1×1 convolution and predicts the 3-channel flow
  from that single map; here the flow head reads all 48 channels (the paper's figure shows no such
  bottleneck; a 1-channel map cannot encode three independent displacement components locally).
- The reference reshapes channel-first skips to tokens with ``view`` in the LKA decoder stages,
  scrambling channels and voxels; every block here stays channel-first.
- The reference's training loop applies the smoothness penalty to the warped *image*; threefold
  penalises the *flow* (:func:`threefold.medical.registration.losses.diffusion_loss`), the
  VoxelMorph objective the paper states.
- Optional diffeomorphic mode (not in the reference): the head predicts a stationary velocity field
  integrated by scaling and squaring (7 steps, as MONAI ``DVF2DDF``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from threefold.datasets.errors import ConfigError, DataFormatError
from threefold.medical.registration.blocks import (
    ChannelLayerNorm,
    DualTransformerBlock,
    LKABlock,
    NestedAttentionFusion,
    OverlapPatchEmbed,
    PatchExpand,
)
from threefold.medical.registration.warp import integrate_velocity, warp

WIDTHS: tuple[int, int, int, int] = (48, 96, 192, 384)
"""Encoder widths at 1/4, 1/8, 1/16, 1/32 resolution (paper, reference ``MultiScaleLight``)."""

SIZE_MULTIPLE = 32
"""Every spatial size must be a multiple of the total encoder stride 4 · 2 · 2 · 2."""

REFERENCE_PARAMETERS = {"README March 2025": 19.76e6, "README / code 2025-07": 21.96e6}
"""Parameter counts the reference repository states (its architecture changed after the paper)."""


class RegistrationOutput(NamedTuple):
    """``warped`` (B, C, D, H, W) moving image resampled onto the fixed grid; ``ddf`` (B, 3, D, H, W)
    float displacement in voxels (MONAI ``Warp`` convention, ``warped(x) = moving(x + ddf(x))``);
    ``velocity`` the stationary velocity field before integration (diffeomorphic mode) or ``None``."""

    warped: Tensor
    ddf: Tensor
    velocity: Tensor | None


def check_registration_shape(shape: tuple[int, ...], name: str = "NestedMorph") -> None:
    """Raise :class:`ConfigError` unless every spatial size of ``(..., D, H, W)`` is a positive
    multiple of 32 (NestedMorph's total encoder stride)."""
    spatial = tuple(int(s) for s in shape[-3:])
    if len(shape) < 3 or any(s <= 0 or s % SIZE_MULTIPLE for s in spatial):
        padded = tuple(-(-s // SIZE_MULTIPLE) * SIZE_MULTIPLE for s in spatial)
        raise ConfigError(
            f"{name}: spatial size {spatial} is not a multiple of {SIZE_MULTIPLE} along every axis "
            f"(the encoder downsamples by 4·2·2·2); resample or pad the volumes to e.g. {padded} "
            "(size=64, 96 or 128 in the pipeline config)"
        )


class NestedMorph(nn.Module):
    """NestedMorph registration network (WACV 2025), see the module docstring for the layout.

    Args:
        in_channels: channels of ``moving`` plus ``fixed`` (2 for two single-channel volumes).
        widths: encoder widths, default ``(48, 96, 192, 384)``.
        heads: efficient-attention heads (2 in the reference).
        diffeomorphic: predict a stationary velocity field and integrate it by scaling and squaring.
        integration_steps: scaling-and-squaring steps in diffeomorphic mode (7, as MONAI).

    ``forward(moving, fixed)``: two ``(B, 1, D, H, W)`` float volumes in [0, 1] with every spatial
    size a multiple of 32 → :class:`RegistrationOutput` (``warped`` trilinear, border padding).
    """

    def __init__(
        self,
        in_channels: int = 2,
        widths: tuple[int, int, int, int] = WIDTHS,
        heads: int = 2,
        diffeomorphic: bool = False,
        integration_steps: int = 7,
    ) -> None:
        super().__init__()
        w1, w2, w3, w4 = widths
        if (w2, w3, w4) != (2 * w1, 4 * w1, 8 * w1):
            raise ConfigError(f"NestedMorph: widths {widths}; each stage must double the previous (48, 96, 192, 384)")
        if diffeomorphic and integration_steps < 1:
            raise ConfigError(f"NestedMorph: integration_steps={integration_steps}; need >= 1 in diffeomorphic mode")
        self.diffeomorphic = diffeomorphic
        self.integration_steps = integration_steps
        self.embed = nn.ModuleList(
            [
                OverlapPatchEmbed(in_channels, w1, kernel=7, stride=4),
                OverlapPatchEmbed(w1, w2, kernel=3, stride=2),
                OverlapPatchEmbed(w2, w3, kernel=3, stride=2),
                OverlapPatchEmbed(w3, w4, kernel=3, stride=2),
            ]
        )
        self.encoder = nn.ModuleList([DualTransformerBlock(w, heads) for w in widths])
        self.encoder_norm = nn.ModuleList([ChannelLayerNorm(w) for w in widths])
        self.up4 = PatchExpand(w4, 2)
        # decoder stages at 1/16 (transformer), 1/8 and 1/4 (large-kernel attention)
        self.gate_in = nn.ModuleList([nn.Conv3d(w, w, 1) for w in (w3, w2, w1)])
        self.fusion = nn.ModuleList([NestedAttentionFusion(w) for w in (w3, w2, w1)])
        self.fusion_norm = nn.ModuleList([ChannelLayerNorm(w) for w in (w3, w2, w1)])
        self.decoder = nn.ModuleList(
            [
                nn.Sequential(DualTransformerBlock(w3, heads), DualTransformerBlock(w3, heads)),
                nn.Sequential(LKABlock(w2), LKABlock(w2)),
                nn.Sequential(LKABlock(w1), LKABlock(w1)),
            ]
        )
        self.up = nn.ModuleList([PatchExpand(w3, 2), PatchExpand(w2, 2), PatchExpand(w1, 4)])
        self.flow = nn.Conv3d(w1, 3, 3, padding=1)
        # near-zero initial field: training starts from the identity transform (VoxelMorph)
        nn.init.normal_(self.flow.weight, 0.0, 1e-5)
        nn.init.zeros_(self.flow.bias)

    def field(self, moving: Tensor, fixed: Tensor) -> Tensor:
        """Raw head output ``(B, 3, D, H, W)``: the displacement, or the velocity in diffeomorphic mode."""
        if moving.ndim != 5 or moving.shape != fixed.shape:
            raise DataFormatError(
                f"NestedMorph: moving {tuple(moving.shape)} and fixed {tuple(fixed.shape)}; "
                "expected two (B, C, D, H, W) volumes of the same shape"
            )
        check_registration_shape(tuple(moving.shape))
        x = torch.cat([moving, fixed], dim=1)
        skips = []
        for embed, block, norm in zip(self.embed, self.encoder, self.encoder_norm):
            x = norm(block(embed(x)))
            skips.append(x)
        y = self.up4(skips[3])
        for skip, gate_in, fusion, fnorm, decode, up in zip(
            skips[2::-1], self.gate_in, self.fusion, self.fusion_norm, self.decoder, self.up
        ):
            g = gate_in(y)
            y = up(decode(fnorm(g + fusion(skip, g))))
        return self.flow(y)

    def forward(self, moving: Tensor, fixed: Tensor) -> RegistrationOutput:
        out = self.field(moving, fixed)
        if self.diffeomorphic:
            ddf = integrate_velocity(out, steps=self.integration_steps)
            return RegistrationOutput(warp(moving, ddf), ddf, out)
        return RegistrationOutput(warp(moving, out), out, None)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
