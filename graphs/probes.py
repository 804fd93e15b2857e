"""Probes that score frozen embeddings (the evaluation layer of issue #9).

- :class:`LogisticRegression` — the linear probe: multinomial logistic regression with
  scikit-learn's objective ``Σ CE + ||W||²/(2C)``, fitted full-batch by L-BFGS in torch.
- :func:`mlp_probe` — the IsoC-VGAE reference's node classifier: an MLP with 4 hidden layers of
  width D/2 (BatchNorm, ReLU), input dropout 0.5, Adam (lr 1e-3), mini-batches of 512, up to 50
  epochs with early stopping on validation accuracy (patience 10); test accuracy at the best epoch;
  inputs standardised by default (see the function).
- :func:`svm_probe` — scikit-learn SVC (RBF) with C chosen on the validation set (graph classification).
- :class:`HadamardLinkProbe` / :func:`dot_product_scores` — link scoring from ``h_u ⊙ h_v`` with an
  MLP (the reference's LinkPredictor) or the inner product (the VGAE decoder).
Random choices take a ``torch.Generator`` or a seed.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn


class LogisticRegression(nn.Module):
    """Multinomial logistic regression ``x (N, F) float32 → probabilities (N, C)``, sklearn's
    objective (bias not penalised), fitted full-batch with L-BFGS."""

    def __init__(self, in_dim: int, num_classes: int, c: float = 1.0) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, num_classes)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.c = c

    def fit(self, x: Tensor, y: Tensor, max_iter: int = 200) -> "LogisticRegression":
        self.to(x.device)
        opt = torch.optim.LBFGS(self.parameters(), lr=1.0, max_iter=max_iter, tolerance_grad=1e-7,
                                tolerance_change=1e-10, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(self.linear(x), y, reduction="sum")
            loss = loss + self.linear.weight.pow(2).sum() / (2 * self.c)
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        return self

    @torch.no_grad()
    def predict_proba(self, x: Tensor) -> Tensor:
        return torch.softmax(self.linear(x), dim=1)


def _standardise(train: Tensor, *others: Tensor) -> list[Tensor]:
    mean, std = train.mean(0), train.std(0).clamp(min=1e-6)
    return [(t - mean) / std for t in (train, *others)]


def linear_probe(emb: Tensor, y: Tensor, train: Tensor, val: Tensor, test: Tensor, cs: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)) -> dict[str, float]:
    """Standardised features, C chosen on validation accuracy; returns val / test accuracy."""
    xtr, xva, xte = _standardise(emb[train].detach(), emb[val].detach(), emb[test].detach())
    best = (-1.0, 0.0, 0.0)
    for c in cs:
        clf = LogisticRegression(emb.shape[1], int(y.max()) + 1, c).fit(xtr, y[train])
        va = (clf.predict_proba(xva).argmax(1) == y[val]).float().mean().item()
        te = (clf.predict_proba(xte).argmax(1) == y[test]).float().mean().item()
        if va > best[0]:
            best = (va, te, c)
    return {"val_acc": best[0], "test_acc": best[1], "C": best[2]}


def _mlp(in_dim: int, hidden: int, out_dim: int, num_hidden: int, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Dropout(dropout)]
    for _ in range(num_hidden):
        layers += [nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU()]
        in_dim = hidden
    layers.append(nn.Linear(in_dim, out_dim, bias=False))
    return nn.Sequential(*layers)


def mlp_probe(
    emb: Tensor, y: Tensor, train: Tensor, val: Tensor, test: Tensor, generator: torch.Generator,
    epochs: int = 50, patience: int = 10, batch_size: int = 512, dropout: float = 0.5, standardise: bool = True,
) -> dict[str, float]:
    """The reference's MLP node classifier (see module docstring). ``train/val/test`` are index
    tensors. Initialisation and dropout draw from torch's global RNG inside a fork seeded from
    ``generator``, so the probe is reproducible and leaves the caller's RNG state untouched.

    ``standardise`` z-scores the embedding with the training nodes' statistics first (the reference
    feeds raw embeddings; then an embedding of small scale, e.g. an untrained encoder's, meets
    BatchNorm running statistics that have not caught up after a few dozen steps, and the eval-mode
    classifier collapses to one class — a probe artefact, not a property of the embedding)."""
    emb = emb.detach()
    if standardise:
        emb = _standardise(emb[train], emb)[1]
    d = emb.shape[1]
    devices = [emb.device] if emb.is_cuda else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        clf = _mlp(d, max(d // 2, 2), int(y.max()) + 1, 4, dropout).to(emb.device)
        opt = torch.optim.Adam(clf.parameters())
        best_val, test_at_best, since = -1.0, 0.0, 0
        for _ in range(epochs):
            clf.train()
            order = train[torch.randperm(train.numel(), generator=generator).to(train.device)]
            for lo in range(0, order.numel(), batch_size):
                idx = order[lo : lo + batch_size]
                if idx.numel() < 2:  # BatchNorm needs two samples
                    continue
                loss = nn.functional.cross_entropy(clf(emb[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            clf.eval()
            with torch.no_grad():
                va = (clf(emb[val]).argmax(1) == y[val]).float().mean().item()
                if va > best_val:
                    best_val, since = va, 0
                    test_at_best = (clf(emb[test]).argmax(1) == y[test]).float().mean().item()
                else:
                    since += 1
            if since > patience:
                break
    return {"val_acc": best_val, "test_acc": test_at_best}


def svm_probe(
    train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
    cs: tuple[float, ...] = (1e-2, 1e-1, 1.0, 10.0, 100.0),
) -> dict[str, float]:
    """RBF SVC on standardised features, C chosen on validation accuracy (scikit-learn)."""
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    scaler = StandardScaler().fit(train_x)
    tr, va, te = scaler.transform(train_x), scaler.transform(val_x), scaler.transform(test_x)
    best = (-1.0, 0.0, 0.0)
    for c in cs:
        clf = SVC(C=c, kernel="rbf", gamma="scale").fit(tr, train_y)
        v = clf.score(va, val_y)
        if v > best[0]:
            best = (v, clf.score(te, test_y), c)
    return {"val_acc": float(best[0]), "test_acc": float(best[1]), "C": float(best[2])}


def dot_product_scores(emb: Tensor, pairs: Tensor) -> Tensor:
    """Inner-product decoder ``σ(h_u · h_v)`` for ``pairs (2, P)`` → ``(P,)``."""
    return torch.sigmoid((emb[pairs[0]] * emb[pairs[1]]).sum(1))


class HadamardLinkProbe(nn.Module):
    """MLP on ``h_u ⊙ h_v`` (one hidden layer, as the reference's LinkPredictor) → link probability.

    ``standardise`` z-scores the embedding with its per-dimension statistics over all nodes (taken
    in :meth:`fit`) so that the probe does not depend on the embedding's overall scale."""

    def __init__(self, dim: int, hidden: int = 256, standardise: bool = True) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.standardise = standardise
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def forward(self, emb: Tensor, pairs: Tensor) -> Tensor:
        emb = (emb - self.mean) / self.std
        return torch.sigmoid(self.mlp(emb[pairs[0]] * emb[pairs[1]]).squeeze(1))

    def fit(
        self, emb: Tensor, pos: Tensor, neg: Tensor, generator: torch.Generator, epochs: int = 100, lr: float = 1e-2
    ) -> "HadamardLinkProbe":
        """Full-batch BCE on positive / negative training pairs ``(2, P)``."""
        emb = emb.detach()
        if self.standardise:
            self.mean = emb.mean(0)
            self.std = emb.std(0).clamp(min=1e-6)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
            for layer in self.mlp:
                if isinstance(layer, nn.Linear):
                    layer.reset_parameters()
        self.to(emb.device)
        opt = torch.optim.Adam(self.parameters(), lr=lr)
        pairs = torch.cat([pos, neg], 1)
        target = torch.cat([torch.ones(pos.shape[1]), torch.zeros(neg.shape[1])]).to(emb.device)
        for _ in range(epochs):
            loss = nn.functional.binary_cross_entropy(self(emb, pairs), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return self
