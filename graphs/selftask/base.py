"""The interface every SelfTask pretext task implements (Jin et al., "Self-supervised Learning on
Graphs: Deep Insights and New Direction", arXiv 2006.10141).

A task owns its head (a linear layer on the backbone's first hidden layer, ``(N, hidden)``), computes
its targets once in :meth:`PretextTask.prepare` from the graph and the labelled nodes, may change
what the backbone sees during training (:meth:`PretextTask.training_input`), and returns its loss for
the current hidden representation in :meth:`PretextTask.loss`. Random choices use the
``torch.Generator`` handed in (a CPU generator; indices move to the data's device).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn
from torch_geometric.data import Data


def seed_from(generator: torch.Generator) -> int:
    """A numpy / scikit-learn seed drawn from ``generator`` (keeps one source of randomness)."""
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))


def random_subset(pool: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """``min(count, len(pool))`` distinct entries of ``pool`` (1-D), chosen with ``generator``."""
    perm = torch.randperm(pool.numel(), generator=generator)[:count]
    return pool[perm.to(pool.device)]


class PretextTask(nn.Module):
    """Base class; subclasses set ``name`` and implement :meth:`prepare` and :meth:`loss`."""

    name: ClassVar[str]

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden

    def prepare(self, data: Data, generator: torch.Generator) -> None:
        """Compute targets from ``data`` (x, edge_index, y, train_mask); labels outside
        ``train_mask`` are never read."""
        raise NotImplementedError

    def training_input(self, x: Tensor, edge_index: Tensor) -> tuple[Tensor, Tensor]:
        """Features and edges the backbone sees while training with this task (default: unchanged)."""
        return x, edge_index

    def loss(self, hidden: Tensor, generator: torch.Generator) -> Tensor:
        raise NotImplementedError
