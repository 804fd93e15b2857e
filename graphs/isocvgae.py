"""IsoC-VGAE: isomorphic-consistent variational graph auto-encoder with the Inverse-GNN decoder.

Paper: "Isomorphic-Consistent Variational Graph Auto-Encoders for Multi-Level Graph Representation
Learning", arXiv 2312.05519 (TKDE). Re-implemented from the paper and the issue #9 description; the
reference code (upperr/IsoC-VGAE, no licence) was read, not copied.

Encoder (``L`` = 2 layers of 512): ``h_ℓ = act(norm(GNN_ℓ(h_{ℓ-1})))`` with GCN (node / link tasks) or
GIN (graph tasks); ReLU and BatchNorm / PairNorm between layers, the last layer linear. The
embedding used downstream is ``h_L`` (N, 512) float32.

Inverse-GNN decoder, top-down for ℓ = L … 1, reconstructing the layer below (``h_0 = x``):

    μ_ℓ    = MLP_self(h_ℓ) + MLP_prior(z_{ℓ+1})          (no prior term at the top layer)
    log σ_ℓ = MLP_σ(h_ℓ),   z_ℓ = μ_ℓ + σ_ℓ ⊙ ε,  ε ~ N(0, I)
    L_self  = MSE(h_{ℓ-1}, z_ℓ)
    L_nbr   = KL(N(μ_ℓ, σ_ℓ²) ‖ N(m_ℓ, I)),  m_ℓ(v) = mean of h_{ℓ-1} over {v} ∪ N(v)
    L_deg   = MSE(ReLU(MLP_deg(h_ℓ)), deg(v))

each averaged over the layers; loss = λ_self·L_self + λ_nbr·L_nbr + λ_deg·L_deg with (1, 0.1, 1) as
the reference's node / link scripts. KL is the element-mean of
½(σ² + (μ − m)² − 1 − 2 log σ), as the reference computes it.

Differences from the reference code, on purpose:
- the reference passes ``act=lambda x: x if layer == L-1 else nn.ReLU()``; Python binds ``layer``
  late, so every layer of the reference is linear. Here the hidden layers use ReLU as the paper's
  equations state.
- neighbour means use torch's native ``index_add_`` (no Python loop over nodes).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch_geometric.nn import GCNConv, GINConv

from threefold.datasets.errors import ConfigError


class PairNorm(nn.Module):
    """PairNorm (Zhao & Akoglu, ICLR 2020), the scale-and-center-simultaneously variant (PN-SCS)
    with scale 20 that the reference uses: ``x ← s·x/‖x‖ − mean_nodes(x)``. x (N, D)."""

    def __init__(self, scale: float = 20.0) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        norm = (1e-6 + x.pow(2).sum(dim=1, keepdim=True)).sqrt()
        return self.scale * x / norm - x.mean(dim=0)


def mlp(in_dim: int, hidden: int, out_dim: int, num_hidden: int) -> nn.Sequential:
    """``num_hidden`` × (Linear → BatchNorm → ReLU), then a bias-free Linear (the reference's MLP)."""
    layers: list[nn.Module] = []
    for _ in range(num_hidden):
        layers += [nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU()]
        in_dim = hidden
    layers.append(nn.Linear(in_dim, out_dim, bias=False))
    return nn.Sequential(*layers)


def neighbourhood_mean(h: Tensor, edge_index: Tensor) -> Tensor:
    """Mean of ``h (N, D)`` over each node and its in-neighbours (``edge_index (2, E)``, messages
    j → i for column (j, i)); self loops in ``edge_index`` are ignored, the node itself counts once."""
    src, dst = edge_index
    keep = src != dst
    src, dst = src[keep], dst[keep]
    total = h.clone().index_add_(0, dst, h[src])
    count = torch.ones(h.shape[0], device=h.device, dtype=h.dtype).index_add_(
        0, dst, torch.ones_like(dst, dtype=h.dtype)
    )
    return total / count.unsqueeze(1)


def node_degree(edge_index: Tensor, num_nodes: int) -> Tensor:
    """In-degree without self loops, ``(N,) float32`` — the degree the decoder reconstructs."""
    src, dst = edge_index
    dst = dst[src != dst]
    return torch.zeros(num_nodes, device=edge_index.device).index_add_(0, dst, torch.ones_like(dst, dtype=torch.float32))


def gaussian_kl_to_unit_variance(mu: Tensor, log_sigma: Tensor, target_mean: Tensor) -> Tensor:
    """Element-mean of KL(N(mu, σ²) ‖ N(target_mean, 1)) = ½(σ² + (mu − m)² − 1 − 2 log σ)."""
    return 0.5 * torch.mean(torch.exp(2 * log_sigma) + (mu - target_mean) ** 2 - 1 - 2 * log_sigma)


class IsoCEncoder(nn.Module):
    """x (N, F) float32, edge_index (2, E) → list of ``L`` layer outputs, each (N, hidden[ℓ])."""

    def __init__(
        self, in_dim: int, hidden: tuple[int, ...] = (512, 512), conv: str = "gcn", norm: str = "batch", dropout: float = 0.0
    ) -> None:
        super().__init__()
        if conv not in ("gcn", "gin"):
            raise ConfigError(f"model.conv={conv!r}: expected 'gcn' or 'gin'")
        if norm not in ("batch", "pair", "none"):
            raise ConfigError(f"model.norm={norm!r}: expected 'batch', 'pair' or 'none'")
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        dims = (in_dim, *hidden)
        for i in range(len(hidden)):
            if conv == "gcn":
                self.convs.append(GCNConv(dims[i], dims[i + 1], bias=False))
            else:
                self.convs.append(GINConv(mlp(dims[i], dims[i + 1], dims[i + 1], num_hidden=2), aggr="add"))
            last = i == len(hidden) - 1
            if last or norm == "none":
                self.norms.append(nn.Identity())
            else:
                self.norms.append(nn.BatchNorm1d(dims[i + 1]) if norm == "batch" else PairNorm())
        self.dropout = dropout

    def forward(self, x: Tensor, edge_index: Tensor) -> list[Tensor]:
        out = []
        h = x
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            if i > 0:
                h = nn.functional.dropout(h, self.dropout, self.training)
            h = norm(conv(h, edge_index))
            if i < len(self.convs) - 1:
                h = torch.relu(h)
            out.append(h)
        return out


class InvGNNDecoder(nn.Module):
    """Top-down Inverse-GNN decoder; ``dims = (F, hidden_1, …, hidden_L)``."""

    def __init__(self, dims: tuple[int, ...], weights: tuple[float, float, float] = (1.0, 0.1, 1.0)) -> None:
        super().__init__()
        num_layers = len(dims) - 1
        # index k = 0 is the top layer L (decodes h_L → h_{L-1}), k = L-1 decodes h_1 → x
        self.self_mlp = nn.ModuleList()
        self.sigma_mlp = nn.ModuleList()
        self.prior_mlp = nn.ModuleList()
        self.degree_mlp = nn.ModuleList()
        for k in range(num_layers):
            layer = num_layers - k
            d_in, d_out = dims[layer], dims[layer - 1]
            self.self_mlp.append(mlp(d_in, d_in, d_out, num_hidden=2))
            self.sigma_mlp.append(mlp(d_in, d_in, d_out, num_hidden=2))
            self.degree_mlp.append(mlp(d_in, d_in, 1, num_hidden=3))
            if k > 0:  # maps z_{ℓ+1} (width dims[layer]) to the width of h_{ℓ-1}
                self.prior_mlp.append(mlp(d_in, d_in, d_out, num_hidden=2))
        self.weights = weights

    def forward(
        self, h: list[Tensor], x: Tensor, edge_index: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """h: encoder outputs ``[h_1 … h_L]``; x: ``h_0``. Returns (weighted loss, {self, neighbour, degree})."""
        targets = [x, *h[:-1]]
        degree = node_degree(edge_index, x.shape[0]).unsqueeze(1)
        num_layers = len(h)
        loss_self = loss_nbr = loss_deg = x.new_zeros(())
        z = None
        for k in range(num_layers):
            layer = num_layers - 1 - k  # index into h
            h_l, target = h[layer], targets[layer]
            mu = self.self_mlp[k](h_l)
            if k > 0:
                mu = mu + self.prior_mlp[k - 1](z)
            log_sigma = self.sigma_mlp[k](h_l)
            eps = torch.randn(mu.shape, device=mu.device, dtype=mu.dtype, generator=generator)
            z = mu + eps * log_sigma.exp()
            loss_self = loss_self + nn.functional.mse_loss(z, target)
            loss_nbr = loss_nbr + gaussian_kl_to_unit_variance(mu, log_sigma, neighbourhood_mean(target, edge_index))
            loss_deg = loss_deg + nn.functional.mse_loss(torch.relu(self.degree_mlp[k](h_l)), degree)
        terms = {"self": loss_self / num_layers, "neighbour": loss_nbr / num_layers, "degree": loss_deg / num_layers}
        w_self, w_nbr, w_deg = self.weights
        return w_self * terms["self"] + w_nbr * terms["neighbour"] + w_deg * terms["degree"], terms


class IsoCVGAE(nn.Module):
    """Encoder + Inv-GNN decoder. ``forward(x, edge_index)`` → (loss, terms, embedding (N, hidden[-1]))."""

    def __init__(
        self,
        in_dim: int,
        hidden: tuple[int, ...] = (512, 512),
        conv: str = "gcn",
        norm: str = "batch",
        dropout: float = 0.0,
        weights: tuple[float, float, float] = (1.0, 0.1, 1.0),
    ) -> None:
        super().__init__()
        self.encoder = IsoCEncoder(in_dim, tuple(hidden), conv, norm, dropout)
        self.decoder = InvGNNDecoder((in_dim, *hidden), weights)

    def embed(self, x: Tensor, edge_index: Tensor) -> Tensor:
        return self.encoder(x, edge_index)[-1]

    def forward(
        self, x: Tensor, edge_index: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        h = self.encoder(x, edge_index)
        loss, terms = self.decoder(h, x, edge_index, generator)
        return loss, terms, h[-1]

    def parameter_groups(self, lr: float = 5e-6, degree_lr: float = 1e-2, weight_decay: float = 3e-4) -> list[dict]:
        """Adam groups as the reference: the degree MLPs at ``degree_lr``, everything else at ``lr``."""
        degree = {id(p) for p in self.decoder.degree_mlp.parameters()}
        return [
            {"params": [p for p in self.parameters() if id(p) not in degree], "lr": lr, "weight_decay": weight_decay},
            {"params": list(self.decoder.degree_mlp.parameters()), "lr": degree_lr, "weight_decay": weight_decay},
        ]
