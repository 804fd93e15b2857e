"""Joint training of a GCN with a SelfTask pretext task (Jin et al. 2020, eq. 5):

    L = CE(GCN(X, A)[train], y[train]) + λ · L_ssl(h¹)

where h¹ (N, 128) is the backbone's first hidden layer (after ReLU) and the pretext head is the
task's linear layer on it. The backbone is :class:`threefold.graphs.gcn.GCN` (Kipf & Welling 2017).
The two-stage variant pretrains with ``L_ssl`` alone, then fine-tunes with CE alone.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch_geometric.data import Data

from threefold.graphs.gcn import GCN
from threefold.graphs.selftask.base import PretextTask


class SelfTaskGCN(nn.Module):
    """GCN backbone + optional pretext task. ``task=None`` is the plain GCN baseline."""

    def __init__(self, in_dim: int, hidden: int, num_classes: int, dropout: float, task: PretextTask | None) -> None:
        super().__init__()
        self.backbone = GCN(in_dim, hidden, num_classes, dropout)
        self.task = task

    def forward(self, x: Tensor, edge_index: Tensor) -> tuple[Tensor, Tensor]:
        """(logits (N, C), hidden (N, hidden))."""
        h = self.backbone.embed(x, edge_index)
        logits = self.backbone.conv2(nn.functional.dropout(h, self.backbone.dropout, self.training), edge_index)
        return logits, h

    def losses(self, data: Data, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(cross-entropy on ``train_mask``, pretext loss) on the task's training input."""
        x, edge_index = (data.x, data.edge_index) if self.task is None else self.task.training_input(data.x, data.edge_index)
        logits, h = self(x, edge_index)
        ce = nn.functional.cross_entropy(logits[data.train_mask], data.y[data.train_mask])
        ssl = h.new_zeros(()) if self.task is None else self.task.loss(h, generator)
        return ce, ssl
