"""RAPiD-Seg network (Li, Shum, Breckon, "RAPiD-Seg: Range-Aware Pointwise Distance Distribution
Networks for 3D LiDAR Segmentation", ECCV 2024, arXiv 2407.10159).

Per batch of points (``coord (N, 3)`` float32 metres, ``remission (N,)`` float32, ``batch (N,)``
int64, RAPiD rows ``rapid (N, k_max)`` float32 from :func:`~threefold.geometry.rapid.features.rapid_features`):

1. voxelise at ``voxel_size`` metres (default 0.05);
2. three streams, each a per-voxel embedding: **coordinates** (point xyz / 50 m and the offset inside
   the voxel) and **intensity** (remission) through voxel set attention encoders
   (:class:`~threefold.geometry.rapid.vsa.VSAEncoder`), **RAPiD** through the double-nested
   autoencoder (:class:`~threefold.geometry.rapid.autoencoder.DoubleNestedAutoencoder`, ``l·d' = 128``
   channels); **C-RAPiD-Seg** adds a fourth stream, C-RAPiD rows (class RoIs) through a second
   autoencoder;
3. channel-wise attention fusion: squeeze-and-excitation (Hu et al., CVPR 2018) over the
   concatenated embeddings, squeezed per sample (mean over its voxels), reduction 8;
4. the MinkUNet34 backbone (:class:`~threefold.geometry.rapid.minkunet.MinkUNet34`) and a linear
   head on each point's voxel feature → ``logits (N, num_classes)``.

``variant="none"`` is the plain MinkUNet baseline of the paper's ablation (70.04 mIoU on
SemanticKITTI val vs 72.32 for R-RAPiD-Seg, 73.02 for R+C): per-voxel means of ``[x, y, z, remission]``
straight into the backbone.

C-RAPiD-Seg infers in two passes: an R-RAPiD-Seg model labels the scan, C-RAPiD rows are computed with
those pseudo-labels as RoIs, then the C model runs (:func:`two_pass_c_rapid`). In training the C rows
come from the ground truth.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from threefold.datasets.errors import ConfigError, DataFormatError
from threefold.geometry.rapid.autoencoder import DoubleNestedAutoencoder
from threefold.geometry.rapid.minkunet import MINKUNET34_CHANNELS, MINKUNET34_LAYERS, MinkUNet34
from threefold.geometry.rapid.sparse import DepthwiseSubMConv3d, sparse_tensor, voxelize
from threefold.geometry.rapid.vsa import VSAEncoder
from threefold.geometry.scatter import scatter_mean

VARIANTS = ("r", "c", "none")
PRECISIONS = ("fp32", "fp16")
"""Inference precisions of :meth:`RAPiDSeg.predict`. bf16 is absent: spconv 2.3's torch interface maps
only float32 / float16 / float64 features to its kernels (``spconv.pytorch.cppcore``), and its
autocast hook casts sparse-conv inputs to float16 whatever the autocast dtype."""
COORD_SCALE = 50.0  # metres: brings LiDAR coordinates (|x| ≲ 50 m after cropping) to O(1)


@dataclass
class VoxelGrid:
    """One batch's voxels: ``indices (M, 4)`` int32 ``[b, i, j, k]``, ``inverse (N,)`` int64,
    ``offset (N, 3)`` float32 (point inside its voxel, voxel units, in [-0.5, 0.5)), ``table (27, M)``
    int64 neighbour table of the depth-wise convs, ``batch_size``."""

    indices: Tensor
    inverse: Tensor
    offset: Tensor
    table: Tensor
    batch_size: int

    @property
    def num_voxels(self) -> int:
        return self.indices.shape[0]


class SqueezeExcitation(nn.Module):
    """Channel-wise attention: ``x · σ(W₂ ReLU(W₁ mean_sample(x)))``, reduction ``r`` (Hu et al. 2018)."""

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels), nn.Sigmoid())

    def forward(self, x: Tensor, voxel_batch: Tensor, batch_size: int) -> Tensor:
        w = self.fc(scatter_mean(x, voxel_batch, batch_size))  # (B, C)
        return x * w[voxel_batch]


class RAPiDSeg(nn.Module):
    """R-RAPiD-Seg (``variant="r"``), C-RAPiD-Seg (``"c"``) or the MinkUNet baseline (``"none"``).

    Args:
        num_classes: 19 for SemanticKITTI.
        variant: see the module docstring.
        voxel_size: metres.
        width, layers, channels, stem_kernel: the MinkUNet34 backbone.
        stream_channels: width of the coordinate and intensity embeddings.
        latents, dim, inner_dim: VSA / autoencoder sizes l, d, d'.
        rapid_channels: k_max of the RAPiD rows.
        se_reduction: reduction of the fusion's squeeze-and-excitation.
        ae_kwargs: further :class:`DoubleNestedAutoencoder` options (λ, margins, anchors).
    """

    def __init__(self, num_classes: int = 19, variant: str = "r", voxel_size: float = 0.05, width: float = 1.0,
                 layers: Sequence[int] = MINKUNET34_LAYERS, channels: Sequence[int] = MINKUNET34_CHANNELS,
                 stem_kernel: int = 5, stream_channels: int = 32, latents: int = 8, dim: int = 64, inner_dim: int = 16,
                 rapid_channels: int = 10, se_reduction: int = 8, ae_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ConfigError(f"RAPiDSeg variant={variant!r}: expected one of {VARIANTS}")
        self.variant, self.voxel_size, self.rapid_channels = variant, voxel_size, rapid_channels
        if variant == "none":
            fused = 4
        else:
            self.coord_stream = VSAEncoder(6, stream_channels, latents, dim)
            self.intensity_stream = VSAEncoder(1, stream_channels, latents, dim)
            self.rapid_ae = DoubleNestedAutoencoder(rapid_channels, latents, dim, inner_dim, **(ae_kwargs or {}))
            fused = 2 * stream_channels + self.rapid_ae.out_channels
            if variant == "c":
                self.crapid_ae = DoubleNestedAutoencoder(rapid_channels, latents, dim, inner_dim, **(ae_kwargs or {}))
                fused += self.crapid_ae.out_channels
            self.fusion = SqueezeExcitation(fused, se_reduction)
        self.backbone = MinkUNet34(fused, width, layers, channels, stem_kernel)
        self.head = nn.Linear(self.backbone.out_channels, num_classes)
        self.in_channels = fused

    def autoencoders(self) -> list[DoubleNestedAutoencoder]:
        return [m for m in (getattr(self, "rapid_ae", None), getattr(self, "crapid_ae", None)) if m is not None]

    def voxelize(self, coord: Tensor, batch: Tensor) -> VoxelGrid:
        indices, inverse = voxelize(coord, batch, self.voxel_size)
        scaled = coord * (1.0 / self.voxel_size)  # as in `voxelize`: the same cell on CPU and CUDA
        offset = scaled - torch.floor(scaled) - 0.5
        table = DepthwiseSubMConv3d.neighbour_table(indices, _OFFSETS.to(coord.device)) if self.variant != "none" \
            else indices.new_zeros((0, indices.shape[0]), dtype=torch.long)
        return VoxelGrid(indices, inverse, offset, table, int(batch.max()) + 1 if batch.numel() else 0)

    def embed(self, grid: VoxelGrid, coord: Tensor, remission: Tensor, rapid: Tensor | None = None,
              crapid: Tensor | None = None, frozen_ae: bool = False) -> Tensor:
        """Fused per-voxel embedding ``(M, in_channels)``; ``frozen_ae`` runs the autoencoders without gradients."""
        m, inv = grid.num_voxels, grid.inverse
        point4 = torch.cat([coord, remission[:, None]], 1)
        if self.variant == "none":
            return scatter_mean(point4, inv, m)
        if rapid is None or rapid.shape != (coord.shape[0], self.rapid_channels):
            got = None if rapid is None else tuple(rapid.shape)
            raise DataFormatError(f"RAPiDSeg: expected rapid rows ({coord.shape[0]}, {self.rapid_channels}), got {got}")
        parts = [
            self.coord_stream(torch.cat([coord / COORD_SCALE, grid.offset], 1), inv, m),
            self.intensity_stream(remission[:, None], inv, m),
        ]
        streams: list[tuple[DoubleNestedAutoencoder, Tensor | None]] = [(self.rapid_ae, rapid)]
        if self.variant == "c":
            if crapid is None or crapid.shape != rapid.shape:
                raise DataFormatError(f"C-RAPiD-Seg: expected C-RAPiD rows {tuple(rapid.shape)}, got "
                                      f"{None if crapid is None else tuple(crapid.shape)}")
            streams.append((self.crapid_ae, crapid))
        for ae, rows in streams:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen_ae):
                parts.append(ae.encode(rows, inv, grid.indices, grid.table))
        x = torch.cat(parts, 1)
        return self.fusion(x, grid.indices[:, 0].long(), grid.batch_size)

    def forward(self, coord: Tensor, remission: Tensor, batch: Tensor, rapid: Tensor | None = None,
                crapid: Tensor | None = None, frozen_ae: bool = False, grid: VoxelGrid | None = None) -> Tensor:
        """Point logits ``(N, num_classes)``."""
        grid = self.voxelize(coord, batch) if grid is None else grid
        x = self.embed(grid, coord, remission, rapid, crapid, frozen_ae)
        y = self.backbone(sparse_tensor(x, grid.indices, grid.batch_size))
        return self.head(y.features)[grid.inverse]

    def predict(self, coord: Tensor, remission: Tensor, batch: Tensor, rapid: Tensor | None = None,
                crapid: Tensor | None = None, precision: str = "fp32", grid: VoxelGrid | None = None) -> Tensor:
        """Inference logits ``(N, num_classes)`` float32, under ``torch.inference_mode``; eval mode only.

        ``precision="fp32"`` (default; the only choice on CPU) is :meth:`forward`. ``"fp16"`` (CUDA) runs
        the network under ``torch.autocast(float16)``: the sparse convs take float16 features and weights
        (tensor-core implicit GEMM; spconv's float32 kernels are SIMT, see
        :mod:`~threefold.geometry.rapid.sparse`), linear layers run in float16, while autocast keeps
        LayerNorm, softmax, exp and sums in float32; BatchNorm uses its float32 statistics.
        Labels agree with fp32 on all but a small fraction of points (benchmarks/rapidseg.py reports the
        fraction; tests/geometry/test_rapidseg_model.py, gpu marker, bounds it).
        """
        if precision not in PRECISIONS:
            raise ConfigError(f"RAPiDSeg.predict precision={precision!r}: expected one of {PRECISIONS}")
        if precision == "fp16" and coord.device.type != "cuda":
            raise ConfigError(f"RAPiDSeg.predict precision='fp16' needs CUDA (input on {coord.device}): spconv's CPU "
                              "kernels are float32; use precision='fp32'")
        if self.training:
            raise ConfigError("RAPiDSeg.predict: call .eval() first (BatchNorm would use the batch's statistics)")
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=precision == "fp16"):
            logits = self(coord, remission, batch, rapid, crapid, grid=grid)
        return logits.float()


_OFFSETS = torch.stack(torch.meshgrid(*[torch.arange(-1, 2)] * 3, indexing="ij"), -1).reshape(-1, 3)


@torch.no_grad()
def two_pass_c_rapid(r_model: RAPiDSeg, c_model: RAPiDSeg, coord: Tensor, remission: Tensor, batch: Tensor,
                     rapid: Tensor, c_rapid_fn: Callable[[Tensor, Tensor, Tensor], Tensor],
                     precision: str | None = None) -> Tensor:
    """C-RAPiD-Seg inference: pass 1 labels the points with ``r_model``; ``c_rapid_fn(coord, remission,
    pseudo_labels)`` gives the C-RAPiD rows ``(N, k_max)`` of one scan with those labels as RoIs
    (called per sample of the batch); pass 2 runs ``c_model``. Returns logits ``(N, C)``.
    ``precision`` (``"fp32"`` / ``"fp16"``) runs both passes through :meth:`RAPiDSeg.predict` (eval
    mode); None calls the models directly, in whatever mode they are."""
    def run(model: RAPiDSeg, crapid: Tensor | None = None) -> Tensor:
        if precision is None:
            return model(coord, remission, batch, rapid, crapid)
        return model.predict(coord, remission, batch, rapid, crapid, precision=precision)

    pseudo = run(r_model).argmax(1)
    crapid = torch.empty_like(rapid)
    for b in torch.unique(batch).tolist():  # one feature computation per scan
        sel = batch == b
        crapid[sel] = c_rapid_fn(coord[sel], remission[sel], pseudo[sel]).to(rapid)
    return run(c_model, crapid)
