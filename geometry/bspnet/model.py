"""BSP-Net: the voxel encoder, the plane decoder and the three BSP layers.

Chen, Tagliasacchi and Zhang, "BSP-Net: Generating Compact Meshes via Binary Space Partitioning",
CVPR 2020 (Sec. 3, Fig. 2), and the TPAMI extension "Learning Mesh Representations via Binary Space
Partitioning Tree Networks". Coordinates are in the IM-NET unit cube ``[-0.5, 0.5]^3`` (no units).

Sign convention (as in the paper): a plane ``P_j = (a, b, c, d)`` is evaluated as
``a x + b y + c z + d``; a point is *inside* the half-space when that value is ``<= 0``.

Layers, with ``x_h = [x, y, z, 1]``:

- L1: ``h1 = relu(x_h @ P)``, (B, N, p), zero inside a half-space, the distance-like value outside;
- L2: convexes through the shared binary-ish connection matrix ``T`` (p, c):
  phase 0 ``h2 = clamp(1 - h1 @ T, 0, 1)`` (1 inside), phases 1-2 ``h2 = h1 @ (T > 0.01)``,
  phases 3-4 ``h2 = h1 @ T`` (0 inside);
- L3: phase 0 ``h3 = clamp(h2 @ W, 0, 1)`` (1 inside), later phases ``h3 = min_j h2_j`` (0 inside).

``T`` and ``W`` are weights of the network shared by every shape, not predicted per shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Connections of ``T`` above this value count as "plane j belongs to convex i" (paper, Sec. 3.3).
T_THRESHOLD = 0.01


def homogeneous(points: torch.Tensor) -> torch.Tensor:
    """Append a 1 to each point: (..., 3) -> (..., 4), same dtype and device."""
    return torch.cat([points, torch.ones_like(points[..., :1])], dim=-1)


def bsp_layers(
    points: torch.Tensor,
    planes: torch.Tensor,
    T: torch.Tensor,
    W: torch.Tensor,
    phase: int,
    convex_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluate the BSP layers L1-L3 (paper Sec. 3.1-3.3) at query points.

    Args:
        points: (B, N, 3) float, query coordinates in ``[-0.5, 0.5]^3``.
        planes: (B, 4, p) float, per-shape planes ``(a, b, c, d)`` from the plane decoder.
        T: (p, c) float, plane-to-convex connections.
        W: (c, 1) float, the phase-0 convex-to-shape weights.
        phase: 0-4, selects the L2/L3 formulation (see the module docstring).
        convex_mask: optional (c,) or (B, 1, c) float added to ``h2`` before the min of L3 in phases
            1-4, e.g. a large value for convexes removed as redundant.

    Returns:
        ``h2`` (B, N, c) and ``h3`` (B, N, 1). Phase 0: 1 = inside; phases 1-4: 0 = inside.
    """
    h1 = torch.relu(torch.matmul(homogeneous(points), planes))
    if phase == 0:
        h2 = torch.clamp(1 - torch.matmul(h1, T), 0, 1)
        return h2, torch.clamp(torch.matmul(h2, W), 0, 1)
    if phase in (1, 2):
        h2 = torch.matmul(h1, (T > T_THRESHOLD).to(h1.dtype))
    elif phase in (3, 4):
        h2 = torch.matmul(h1, T)
    else:
        raise ValueError(f"BSP-Net phase must be 0..4, got {phase}")
    masked = h2 if convex_mask is None else h2 + convex_mask
    return h2, masked.min(dim=-1, keepdim=True).values


class BSPEncoder(nn.Module):
    """3D CNN voxel encoder (paper Sec. 4 / reference ``encoder``): 64^3 occupancy -> code.

    Five 3D convolutions of kernel 4 (stride 2 x4 with padding 1, then stride 1 without padding),
    channels ``ef, 2ef, 4ef, 8ef, 8ef``, leaky ReLU 0.01; the code ``(B, 8 ef)`` goes through a
    sigmoid as in the reference implementation. Input ``(B, 1, 64, 64, 64)`` float in [0, 1].
    """

    def __init__(self, ef_dim: int = 32) -> None:
        super().__init__()
        chans = [1, ef_dim, ef_dim * 2, ef_dim * 4, ef_dim * 8]
        self.convs = nn.ModuleList(nn.Conv3d(chans[i], chans[i + 1], 4, stride=2, padding=1) for i in range(4))
        self.last = nn.Conv3d(ef_dim * 8, ef_dim * 8, 4, stride=1, padding=0)
        for conv in [*self.convs, self.last]:
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)
        self.code_dim = ef_dim * 8

    def forward(self, voxels: torch.Tensor) -> torch.Tensor:
        if voxels.dim() != 5 or voxels.shape[1] != 1 or tuple(voxels.shape[2:]) != (64, 64, 64):
            raise ValueError(f"BSPEncoder expects voxels (B, 1, 64, 64, 64), got {tuple(voxels.shape)}")
        x = voxels
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.01)
        return torch.sigmoid(self.last(x).flatten(1))


class BSPPlaneDecoder(nn.Module):
    """MLP code -> ``p`` planes: ``8ef -> 16ef -> 32ef -> 64ef -> 4p`` (256 -> ... -> 4*4096 for ef=32).

    Output (B, 4, p) float: rows are ``a, b, c, d`` of each plane.
    """

    def __init__(self, ef_dim: int = 32, p_dim: int = 4096) -> None:
        super().__init__()
        widths = [ef_dim * 8, ef_dim * 16, ef_dim * 32, ef_dim * 64]
        self.hidden = nn.ModuleList(nn.Linear(widths[i], widths[i + 1]) for i in range(3))
        self.out = nn.Linear(widths[-1], p_dim * 4)
        for lin in [*self.hidden, self.out]:
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        self.p_dim = p_dim

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        x = code
        for lin in self.hidden:
            x = F.leaky_relu(lin(x), 0.01)
        return self.out(x).view(-1, 4, self.p_dim)


class BSPNet(nn.Module):
    """BSP-Net auto-encoder: voxels -> planes -> (h2, h3) at query points.

    Args:
        ef_dim: encoder width (32 in the paper); the code has ``8 ef_dim`` entries.
        p_dim: number of planes per shape (4096 in the paper).
        c_dim: number of convexes (256 in the paper).
        phase: training phase 0-4 (settable: ``model.phase = 1`` between stages).

    ``T`` (p, c) is initialised N(0, 0.02) and ``W`` (c, 1) N(1e-5, 0.02) as in the reference code.
    """

    def __init__(self, ef_dim: int = 32, p_dim: int = 4096, c_dim: int = 256, phase: int = 0) -> None:
        super().__init__()
        self.encoder = BSPEncoder(ef_dim)
        self.decoder = BSPPlaneDecoder(ef_dim, p_dim)
        self.T = nn.Parameter(torch.randn(p_dim, c_dim) * 0.02)
        self.W = nn.Parameter(torch.randn(c_dim, 1) * 0.02 + 1e-5)
        self.phase = phase

    def planes(self, voxels: torch.Tensor) -> torch.Tensor:
        """(B, 1, 64, 64, 64) occupancy -> (B, 4, p) planes."""
        return self.decoder(self.encoder(voxels))

    def forward(
        self, voxels: torch.Tensor, points: torch.Tensor, convex_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Encode ``voxels`` (B, 1, 64, 64, 64) and evaluate at ``points`` (B, N, 3).

        Returns ``planes`` (B, 4, p), ``h2`` (B, N, c) and ``h3`` (B, N, 1) (see :func:`bsp_layers`).
        """
        planes = self.planes(voxels)
        h2, h3 = bsp_layers(points, planes, self.T, self.W, self.phase, convex_mask)
        return {"planes": planes, "h2": h2, "h3": h3}
