"""The baselines every issue-#9 table carries next to IsoC-VGAE and SelfTask:

- :func:`train_pyg_vgae` — PyG's ``VGAE`` (Kipf & Welling, "Variational Graph Auto-Encoders",
  NeurIPS-W 2016) with its paper recipe: GCN encoder 32 → 16, Adam lr 0.01, 200 full-batch epochs,
  reconstruction loss with PyG's negative sampling + KL / N. Embedding = μ (N, 16).
- :func:`train_supervised_gcn` — the 2-layer GCN of :mod:`threefold.graphs.gcn` trained with
  cross-entropy on the training nodes (Kipf & Welling, ICLR 2017), the model after the last epoch.

Seeds fix parameter initialisation, dropout and PyG's negative sampling (which draws from torch's
global generator, so it runs inside ``torch.random.fork_rng``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from threefold.graphs.gcn import GCN


class _VGAEEncoder(nn.Module):
    def __init__(self, in_dim: int, hidden: int, latent: int) -> None:
        super().__init__()
        from torch_geometric.nn import GCNConv

        self.conv = GCNConv(in_dim, hidden)
        self.mu = GCNConv(hidden, latent)
        self.logstd = GCNConv(hidden, latent)

    def forward(self, x: Tensor, edge_index: Tensor) -> tuple[Tensor, Tensor]:
        h = torch.relu(self.conv(x, edge_index))
        return self.mu(h, edge_index), self.logstd(h, edge_index)


def train_pyg_vgae(
    x: Tensor, edge_index: Tensor, seed: int, epochs: int = 200, lr: float = 0.01, hidden: int = 32, latent: int = 16
) -> Tensor:
    """Train PyG's VGAE on ``edge_index`` and return the mean embedding ``(N, latent) float32``."""
    from torch_geometric.nn import VGAE

    with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
        torch.manual_seed(seed)
        model = VGAE(_VGAEEncoder(x.shape[1], hidden, latent)).to(x.device)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        model.train()
        for _ in range(epochs):
            z = model.encode(x, edge_index)
            loss = model.recon_loss(z, edge_index) + model.kl_loss() / x.shape[0]
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            return model.encode(x, edge_index)  # eval mode: μ


def train_supervised_gcn(
    x: Tensor, edge_index: Tensor, y: Tensor, train_mask: Tensor, seed: int, hidden: int = 16, dropout: float = 0.5,
    lr: float = 0.01, weight_decay: float = 5e-4, epochs: int = 200,
) -> tuple[GCN, Tensor]:
    """Train the GCN on ``train_mask``; returns (model, logits (N, C) of the last epoch, eval mode)."""
    with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
        torch.manual_seed(seed)
        model = GCN(x.shape[1], hidden, int(y.max()) + 1, dropout).to(x.device)
        opt = torch.optim.Adam(model.parameter_groups(weight_decay), lr=lr)
        for _ in range(epochs):
            model.train()
            loss = nn.functional.cross_entropy(model(x, edge_index)[train_mask], y[train_mask])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            return model, model(x, edge_index)
