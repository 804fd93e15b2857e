"""Probes against scikit-learn and analytic cases; baselines produce usable embeddings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from threefold.datasets.sbm import stochastic_block_model
from threefold.graphs.baselines import train_pyg_vgae, train_supervised_gcn
from threefold.graphs.probes import HadamardLinkProbe, dot_product_scores, linear_probe, mlp_probe, svm_probe


def _blobs(n: int = 300, d: int = 8, classes: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.normal(size=(n, d)) + 3.0 * np.eye(classes, d)[y]
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y)


def test_linear_probe_matches_sklearn_accuracy():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x, y = _blobs()
    tr, va, te = torch.arange(0, 150), torch.arange(150, 200), torch.arange(200, 300)
    ours = linear_probe(x, y, tr, va, te, cs=(1.0,))
    sc = StandardScaler().fit(x[tr].numpy())
    sk = LogisticRegression(C=1.0, max_iter=1000).fit(sc.transform(x[tr].numpy()), y[tr].numpy())
    assert ours["test_acc"] == pytest.approx(sk.score(sc.transform(x[te].numpy()), y[te].numpy()), abs=0.011)


def test_mlp_and_svm_probes_separable():
    # the reference MLP (4 hidden layers of D/2, batches of 512, early stopping) needs a few
    # thousand samples to take enough steps
    xl, yl = _blobs(n=3000, d=64)
    tr, va, te = torch.arange(0, 2000), torch.arange(2000, 2500), torch.arange(2500, 3000)
    res = mlp_probe(xl, yl, tr, va, te, torch.Generator().manual_seed(0))
    assert res["test_acc"] > 0.85
    again = mlp_probe(xl, yl, tr, va, te, torch.Generator().manual_seed(0))
    assert again == res  # seeded
    x, y = _blobs()
    xn, yn = x.numpy(), y.numpy()
    svm = svm_probe(xn[:150], yn[:150], xn[150:200], yn[150:200], xn[200:], yn[200:])
    from sklearn.svm import SVC
    from sklearn.preprocessing import StandardScaler

    sc = StandardScaler().fit(xn[:150])
    ref = SVC(C=svm["C"]).fit(sc.transform(xn[:150]), yn[:150]).score(sc.transform(xn[200:]), yn[200:])
    assert svm["test_acc"] == pytest.approx(ref)


def test_link_scores():
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    pairs = torch.tensor([[0, 0], [1, 2]])
    np.testing.assert_allclose(dot_product_scores(emb, pairs).numpy(), [1 / (1 + np.exp(-1)), 0.5], rtol=1e-6)
    # nodes linked iff same group: the Hadamard product separates that
    rng = torch.Generator().manual_seed(0)
    group = torch.arange(40) % 2
    emb = torch.nn.functional.one_hot(group, 2).float() + 0.05 * torch.randn(40, 2, generator=rng)
    u, v = torch.triu_indices(40, 40, 1)
    same = group[u] == group[v]
    pos, neg = torch.stack([u[same], v[same]]), torch.stack([u[~same], v[~same]])
    probe = HadamardLinkProbe(2, hidden=16).fit(emb, pos, neg, torch.Generator().manual_seed(1), epochs=200)
    with torch.no_grad():
        assert probe(emb, pos).min() > probe(emb, neg).max()


def test_baselines_learn_on_sbm():
    g = stochastic_block_model(seed=0)
    z = train_pyg_vgae(g.x, g.edge_index, seed=0, epochs=60)
    assert z.shape == (g.num_nodes, 16) and torch.isfinite(z).all()
    tr, va, te = (torch.nonzero(m).flatten() for m in (g.train_mask, g.val_mask, g.test_mask))
    assert linear_probe(z, g.y, tr, va, te)["test_acc"] > 0.8
    _, logits = train_supervised_gcn(g.x, g.edge_index, g.y, g.train_mask, seed=0, epochs=100)
    assert (logits.argmax(1) == g.y)[g.test_mask].float().mean() > 0.8
