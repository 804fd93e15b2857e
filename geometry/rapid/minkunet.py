"""MinkUNet34 on spconv: the sparse residual U-Net backbone of RAPiD-Seg.

Choy, Gwak, Savarese, "4D Spatio-Temporal ConvNets: Minkowski Convolutional Neural Networks" (CVPR
2019), ``MinkUNet34C``: basic residual blocks (two 3×3×3 submanifold convs + BN + ReLU, a 1×1
projection when the width changes), a stem conv (kernel 5) at full resolution, four stride-2 levels
with ``layers[0:4] = (2, 3, 4, 6)`` blocks of ``channels[0:4] = (32, 64, 128, 256)``, and four
decoder levels (stride-2 transposed conv, concatenation with the encoder skip, ``layers[4:8] =
(2, 2, 2, 2)`` blocks of ``channels[4:8] = (256, 128, 96, 96)``). RAPiD-Seg (Li, Shum, Breckon, ECCV
2024, arXiv 2407.10159) uses it as the backbone after the fused embedding.

Differences from MinkowskiEngine: spconv's "conv" downsampling creates a coarse site for every
occupied 2×2×2 block (ME's generalised conv does the same); the transposed conv returns exactly onto
the fine sites of its encoder level (ME's ``MinkowskiConvolutionTranspose`` also does, through the
shared coordinate manager). ``width`` scales every channel count (the CI model uses 0.25–0.5).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from threefold.datasets.errors import ConfigError
from threefold.geometry.rapid.sparse import SparseConv3d

MINKUNET34_LAYERS = (2, 3, 4, 6, 2, 2, 2, 2)
MINKUNET34_CHANNELS = (32, 64, 128, 256, 256, 128, 96, 96)


class _ConvBNReLU(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, kind: str = "subm", key: str | None = None,
                 relu: bool = True) -> None:
        super().__init__()
        self.conv = SparseConv3d(cin, cout, kernel, stride, kind=kind, indice_key=key)
        self.bn = nn.BatchNorm1d(cout)
        self.relu = relu

    def forward(self, x: Any) -> Any:
        x = self.conv(x)
        f = self.bn(x.features)
        return x.replace_feature(f.relu() if self.relu else f)


class BasicBlock(nn.Module):
    """Residual block: conv3-BN-ReLU-conv3-BN (+ 1×1 conv-BN projection of the input) → ReLU."""

    def __init__(self, cin: int, cout: int, key: str) -> None:
        super().__init__()
        self.conv1 = _ConvBNReLU(cin, cout, 3, key=key)
        self.conv2 = _ConvBNReLU(cout, cout, 3, key=key, relu=False)
        self.project = _ConvBNReLU(cin, cout, 1, relu=False) if cin != cout else None

    def forward(self, x: Any) -> Any:
        identity = self.project(x).features if self.project is not None else x.features
        out = self.conv2(self.conv1(x))
        return out.replace_feature((out.features + identity).relu())


class MinkUNet34(nn.Module):
    """Sparse residual U-Net.

    Args:
        in_channels: width of the input voxel features.
        width: multiplier of every channel count (1.0 = MinkUNet34C).
        layers: blocks per level, 8 entries (4 encoder, 4 decoder).
        channels: widths per level, 8 entries; the stem has ``channels[0]``.
        stem_kernel: kernel of the full-resolution stem conv (5 in MinkUNet34C).

    Input: ``spconv.SparseConvTensor`` with features ``(M, in_channels)`` float32.
    Output: the same sites with features ``(M, out_channels)``, ``out_channels = round(width·channels[7])``.
    """

    def __init__(self, in_channels: int, width: float = 1.0, layers: Sequence[int] = MINKUNET34_LAYERS,
                 channels: Sequence[int] = MINKUNET34_CHANNELS, stem_kernel: int = 5) -> None:
        super().__init__()
        if len(layers) != 8 or len(channels) != 8 or width <= 0:
            raise ConfigError(f"MinkUNet34: expected 8 layers and 8 channels and width > 0, got {list(layers)}, {list(channels)}, {width}")
        ch = [max(4, int(round(c * width))) for c in channels]
        init = ch[0]
        self.stem = _ConvBNReLU(in_channels, init, stem_kernel, key=f"stem{stem_kernel}")
        self.down, self.enc = nn.ModuleList(), nn.ModuleList()
        skips = [init]
        cin = init
        for level in range(4):
            self.down.append(_ConvBNReLU(cin, cin, 2, 2, kind="conv", key=f"down{level + 1}"))
            blocks = [BasicBlock(cin if b == 0 else ch[level], ch[level], f"subm{level + 1}") for b in range(layers[level])]
            self.enc.append(nn.Sequential(*blocks))
            cin = ch[level]
            skips.append(cin)
        self.up, self.dec = nn.ModuleList(), nn.ModuleList()
        for j in range(4):
            level = 3 - j  # decoder j goes from stride 2^(level+1) back to 2^level
            self.up.append(_ConvBNReLU(cin, ch[4 + j], 2, kind="inverse", key=f"down{level + 1}"))
            cat = ch[4 + j] + skips[level]
            blocks = [BasicBlock(cat if b == 0 else ch[4 + j], ch[4 + j], f"subm{level}")
                      for b in range(layers[4 + j])]
            self.dec.append(nn.Sequential(*blocks))
            cin = ch[4 + j]
        self.out_channels = cin

    def forward(self, x: Any) -> Any:
        x = self.stem(x)
        skips = [x]
        for down, enc in zip(self.down, self.enc):
            x = enc(down(x))
            skips.append(x)
        for j, (up, dec) in enumerate(zip(self.up, self.dec)):
            x = up(x)
            skip = skips[3 - j]
            x = dec(x.replace_feature(torch.cat([x.features, skip.features], 1)))
        return x
