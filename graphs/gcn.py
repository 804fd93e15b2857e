"""The two-layer graph convolutional network of Kipf & Welling, "Semi-Supervised Classification with
Graph Convolutional Networks" (ICLR 2017), eq. 9:

    Z = softmax(Â · ReLU(Â X W⁽⁰⁾) W⁽¹⁾),   Â = D̃^{-1/2} (A + I) D̃^{-1/2}

with dropout on the input of both layers. The paper applies L2 weight decay (5e-4) to the first layer
only; :meth:`GCN.parameter_groups` returns the two groups so an optimizer can do that.
Built on ``torch_geometric.nn.GCNConv``, which runs on torch's native scatter ops (no torch-scatter).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch_geometric.nn import GCNConv


class GCN(nn.Module):
    """x (N, F) float32, edge_index (2, E) int64 → logits (N, C); :meth:`embed` gives the hidden layer (N, hidden)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, dropout: float = 0.5) -> None:
        super().__init__()
        self.conv1 = GCNConv(in_dim, hidden, cached=False)
        self.conv2 = GCNConv(hidden, out_dim, cached=False)
        self.dropout = dropout

    def embed(self, x: Tensor, edge_index: Tensor) -> Tensor:
        x = nn.functional.dropout(x, self.dropout, self.training)
        return torch.relu(self.conv1(x, edge_index))

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        h = nn.functional.dropout(self.embed(x, edge_index), self.dropout, self.training)
        return self.conv2(h, edge_index)

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """First layer with ``weight_decay``, second layer without (as in the paper)."""
        return [
            {"params": self.conv1.parameters(), "weight_decay": weight_decay},
            {"params": self.conv2.parameters(), "weight_decay": 0.0},
        ]
