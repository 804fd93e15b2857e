"""3D residual U-Net of Isensee et al. 2017.

Isensee, Kickingereder, Wick, Bendszus, Maier-Hein, "Brain tumor segmentation and radiomics survival
prediction: contribution to the BRATS 2017 challenge" (BrainLes 2017, arXiv 1802.10508), Fig. 1 — the
backbone Hu et al. 2018 (arXiv 1810.09488) put the multi-level activation on.

Context pathway, level l = 1..L with ``base * 2**(l-1)`` filters (16, 32, 64, 128, 256 by default):
a 3³ convolution (stride 2 from level 2 on) followed by a *context module* — a pre-activation
residual block ``norm → LeakyReLU → 3³ conv → dropout(0.3) → norm → LeakyReLU → 3³ conv`` whose
output is added to its input.
Localization pathway: *upsampling modules* (×2 nearest upsampling → 3³ conv halving the filters),
concatenation with the skip of the same level, *localization modules* (3³ conv → 1³ conv halving the
filters again); the finest level uses one 3³ conv instead, as in the paper's figure.
Deep supervision: 1³ segmentation layers on the three finest levels, the coarser one upsampled and
added to the next ("summing the three finest segmentation outputs"). Instance norm and
LeakyReLU(0.01) throughout.

Input (B, in_channels, D, H, W) float with D, H, W divisible by 2**(L-1); output (B, out_channels,
D, H, W) raw scores (the head applies its own activation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from threefold.datasets.errors import ConfigError


def _norm_act(channels: int) -> list[nn.Module]:
    return [nn.InstanceNorm3d(channels, affine=True), nn.LeakyReLU(0.01, inplace=True)]


def _conv_block(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    """conv → instance norm → LeakyReLU."""
    return nn.Sequential(nn.Conv3d(cin, cout, kernel, stride, padding=kernel // 2), *_norm_act(cout))


class ContextModule(nn.Module):
    """Pre-activation residual block: x + conv(act(norm(dropout(conv(act(norm(x)))))))."""

    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *_norm_act(channels),
            nn.Conv3d(channels, channels, 3, padding=1),
            nn.Dropout3d(dropout),
            *_norm_act(channels),
            nn.Conv3d(channels, channels, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class UpsamplingModule(nn.Module):
    """×2 nearest-neighbour upsampling then a 3³ conv from ``cin`` to ``cout`` filters."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = _conv_block(cin, cout)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Isensee2017UNet(nn.Module):
    """Residual 3D U-Net with deep-supervision summation (Isensee et al. 2017).

    ``in_channels`` 4 MRI modalities, ``out_channels`` 1 (multi-level), 3 (sigmoid) or 4 (softmax);
    ``base_filters`` 16 and ``levels`` 5 reproduce the paper (16…256 filters).
    """

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 1,
        base_filters: int = 16,
        levels: int = 5,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        if levels < 3:
            raise ConfigError(f"unet.levels must be >= 3 (deep supervision uses the three finest levels), got {levels}")
        widths = [base_filters * 2**i for i in range(levels)]
        self.levels = levels
        self.down = nn.ModuleList(
            [nn.Conv3d(in_channels, widths[0], 3, padding=1)]
            + [nn.Conv3d(widths[i - 1], widths[i], 3, stride=2, padding=1) for i in range(1, levels)]
        )
        self.context = nn.ModuleList([ContextModule(w, dropout) for w in widths])
        # decoder, coarse to fine: level i+1 -> level i for i = levels-2 ... 0
        self.up = nn.ModuleList([UpsamplingModule(widths[i + 1], widths[i]) for i in reversed(range(levels - 1))])
        self.localization = nn.ModuleList(
            [
                nn.Sequential(_conv_block(2 * widths[i], 2 * widths[i]), _conv_block(2 * widths[i], widths[i], kernel=1))
                for i in reversed(range(1, levels - 1))
            ]
        )
        self.final_conv = _conv_block(2 * widths[0], 2 * widths[0])
        # segmentation layers on levels 3, 2 and 1 (1-based), coarse to fine — on the decoder levels that
        # exist: with 3 levels the third is the bottleneck, which has no localization output, so only two
        # (a third layer would never run: dead weights, and DDP refuses unused parameters)
        self.n_seg = min(3, levels - 1)
        self.seg = nn.ModuleList(
            [nn.Conv3d(2 * widths[0] if lvl == 0 else widths[lvl], out_channels, 1) for lvl in reversed(range(self.n_seg))]
        )

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_channels, D, H, W) -> (B, out_channels, D, H, W); D, H, W divisible by 2**(levels-1)."""
        factor = 2 ** (self.levels - 1)
        if any(s % factor for s in x.shape[2:]):
            raise ConfigError(f"input spatial size {tuple(x.shape[2:])} must be divisible by {factor} for {self.levels} levels")
        skips = []
        for conv, ctx in zip(self.down, self.context):
            x = ctx(conv(x))
            skips.append(x)
        x = skips.pop()
        seg_sum = None
        for step, up in enumerate(self.up):
            x = torch.cat([up(x), skips.pop()], 1)
            level = self.levels - 2 - step  # 0-based level just reached
            x = self.localization[step](x) if level >= 1 else self.final_conv(x)
            if level < self.n_seg:
                seg = self.seg[self.n_seg - 1 - level](x)
                seg_sum = seg if seg_sum is None else seg + F.interpolate(seg_sum, scale_factor=2, mode="nearest")
        return seg_sum

