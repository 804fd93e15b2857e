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

Inference on CUDA folds each BatchNorm (and its ReLU) into the preceding sparse conv
(:data:`FUSE_BN_INFERENCE`): the same function in eval mode, one kernel per layer instead of three.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from threefold.datasets.errors import ConfigError
from threefold.geometry.rapid.sparse import SparseConv3d

MINKUNET34_LAYERS = (2, 3, 4, 6, 2, 2, 2, 2)
MINKUNET34_CHANNELS = (32, 64, 128, 256, 256, 128, 96, 96)


#: At inference on CUDA, fold each BatchNorm (and the ReLU after it) into its sparse conv: one spconv
#: kernel with a per-channel bias and activation in its epilogue, instead of conv, BN and ReLU kernels
#: (about 70 layers). Eval mode only, where BN is a fixed affine map; training and the CPU are unchanged.
FUSE_BN_INFERENCE = True

#: The stem conv under a float16 CUDA autocast: "fp16" (like every other layer; spconv's heuristic picks
#: the accumulator), "fp16acc" (float16 with float16 accumulation forced) or "fp32" (float32 features
#: and weights; the rest stays float16). The stem is the one layer whose shape differs between
#: MinkUNet34 (4 input channels) and R-RAPiD-Seg (192 fused channels, a 5×5×5 kernel: 24,000-term
#: reductions, for which spconv's heuristic switches to float32 accumulation). On an H100 R-RAPiD-Seg's
#: backbone took ~28 ms in fp16 against MinkUNet34's ~15 ms (docs/gpu-runs/2026-11-26-h100-rapidseg-fp16.txt);
#: benchmarks/rapidseg.py times each setting (rows "fp16+stem32", "fp16+stemacc16") and the stem alone,
#: so that the fastest can become the default.
STEM_UNDER_FP16 = "fp16"
STEM_MODES = ("fp16", "fp16acc", "fp32")


class _ConvBNReLU(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, kind: str = "subm", key: str | None = None,
                 relu: bool = True) -> None:
        super().__init__()
        self.conv = SparseConv3d(cin, cout, kernel, stride, kind=kind, indice_key=key)
        self.bn = nn.BatchNorm1d(cout)
        self.relu = relu
        self._fold: tuple[tuple, Tensor, Tensor] | None = None

    def forward(self, x: Any) -> Any:
        if FUSE_BN_INFERENCE and not self.training and x.features.is_cuda:
            try:
                return self.conv.forward_with(x, *self.folded(_inference_dtype(x.features)), relu=self.relu)
            except Exception as err:  # an spconv without this epilogue: the unfused layers, said once
                _disable_fusion(err)
        x = self.conv(x)
        f = self.bn(x.features)
        return x.replace_feature(f.relu() if self.relu else f)

    def folded(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Weight ``W·γ/√(σ²+ε)`` (scaled per output channel, KRSC) and bias ``β - μγ/√(σ²+ε)`` (plus the
        conv's own bias, scaled) of conv + eval-mode BatchNorm, in ``dtype``; cached until a parameter,
        a running statistic or the dtype changes."""
        bn, w = self.bn, self.conv.conv.weight
        tensors = (w, bn.weight, bn.bias, bn.running_mean, bn.running_var, self.conv.bias)
        key = (dtype, *((t.data_ptr(), t._version) for t in tensors if t is not None))
        if self._fold is None or self._fold[0] != key:
            with torch.no_grad():
                scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
                shift = bn.bias.double() - bn.running_mean.double() * scale
                if self.conv.bias is not None:
                    shift = shift + self.conv.bias.double() * scale
                if self.conv.conv.conv1x1:  # spconv multiplies by weight.view(C_in, C_out) there
                    weight = (w.double().reshape(-1, w.shape[0]) * scale).reshape(w.shape)
                else:  # KRSC: output channels first
                    weight = w.double() * scale.view(-1, *([1] * (w.dim() - 1)))
                self._fold = (key, weight.to(dtype).contiguous(), shift.to(dtype).contiguous())
        return self._fold[1], self._fold[2]


def _inference_dtype(features: Tensor) -> torch.dtype:
    if torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.float16:
        return torch.float16
    return features.dtype


def _disable_fusion(err: Exception) -> None:
    global FUSE_BN_INFERENCE
    FUSE_BN_INFERENCE = False
    import warnings

    warnings.warn(f"MinkUNet34: folding BatchNorm into spconv failed ({type(err).__name__}: {err}); running the "
                  "layers unfused", RuntimeWarning, stacklevel=3)


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

    def run_stem(self, x: Any) -> Any:
        """The stem conv; under a float16 autocast in eval mode as :data:`STEM_UNDER_FP16` says."""
        if STEM_UNDER_FP16 not in STEM_MODES:
            raise ConfigError(f"minkunet.STEM_UNDER_FP16={STEM_UNDER_FP16!r}: expected one of {STEM_MODES}")
        if STEM_UNDER_FP16 == "fp16" or self.training or _inference_dtype(x.features) != torch.float16:
            return self.stem(x)
        if STEM_UNDER_FP16 == "fp32":
            with torch.autocast("cuda", enabled=False):  # float32 features and folded weights
                return self.stem(x.replace_feature(x.features.float()))
        conv = self.stem.conv.conv  # spconv reads fp32_accum at each call; the layer's own setting after
        saved, conv.fp32_accum = conv.fp32_accum, False
        try:
            out = self.stem(x)
        finally:
            conv.fp32_accum = saved
        return out

    def forward(self, x: Any) -> Any:
        x = self.run_stem(x)
        skips = [x]
        for down, enc in zip(self.down, self.enc):
            x = enc(down(x))
            skips.append(x)
        for j, (up, dec) in enumerate(zip(self.up, self.dec)):
            x = up(x)
            skip = skips[3 - j]
            x = dec(x.replace_feature(torch.cat([x.features, skip.features], 1)))
        return x
