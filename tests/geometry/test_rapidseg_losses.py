"""RAPiD-Seg losses against independent references: Lovász-softmax vs the Lovász extension written
from its definition (brute force over the sorted prefix sets) and vs scikit-learn's Jaccard on hard
predictions; the class-aware contrastive loss vs a per-anchor NumPy loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import jaccard_score

from threefold.geometry.rapid.autoencoder import voxel_majority_label
import torch.nn.functional as F

from threefold.geometry.rapid.losses import class_aware_contrastive, lovasz_softmax, segmentation_loss, weighted_cross_entropy


def _jaccard_loss_of_set(mispredicted: np.ndarray, fg: np.ndarray) -> float:
    """Berman et al. eq. (5): Δ_J(M) = |M| / |F ∪ M| for the set M of mispredicted points."""
    union = np.logical_or(fg, mispredicted).sum()
    return float(mispredicted.sum() / union) if union else 0.0


def _lovasz_extension_reference(probs: np.ndarray, labels: np.ndarray) -> float:
    """f̄(m) = Σ_i m_π(i) [Δ({π(1..i)}) − Δ({π(1..i−1)})] per present class, averaged (Berman eq. 8)."""
    losses = []
    for c in range(probs.shape[1]):
        fg = labels == c
        if not fg.any():
            continue
        m = np.abs(fg.astype(float) - probs[:, c])
        order = np.argsort(-m, kind="stable")
        total, prev, chosen = 0.0, 0.0, np.zeros(len(m), bool)
        for i in order:
            chosen[i] = True
            cur = _jaccard_loss_of_set(chosen, fg)
            total += m[i] * (cur - prev)
            prev = cur
        losses.append(total)
    return float(np.mean(losses))


def test_lovasz_softmax_matches_definition_on_soft_probabilities():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(60, 4))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = rng.integers(0, 3, 60)  # class 3 absent: not averaged ("present")
    labels[:5] = -1
    keep = labels >= 0
    ref = _lovasz_extension_reference(probs[keep], labels[keep])
    got = lovasz_softmax(torch.from_numpy(probs), torch.from_numpy(labels))
    assert float(got) == pytest.approx(ref, rel=1e-10, abs=1e-12)


def test_lovasz_softmax_on_hard_predictions_is_one_minus_iou():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, 200)
    pred = np.where(rng.random(200) < 0.3, rng.integers(0, 5, 200), labels)
    onehot = np.eye(5)[pred]
    present = np.unique(labels)
    iou = jaccard_score(labels, pred, labels=present, average=None)
    got = lovasz_softmax(torch.from_numpy(onehot), torch.from_numpy(labels))
    assert float(got) == pytest.approx(float(np.mean(1 - iou)), abs=1e-12)


def test_segmentation_loss_gradients_and_ignore():
    logits = torch.randn(50, 19, requires_grad=True)
    labels = torch.randint(0, 19, (50,))
    labels[:10] = -1
    loss, parts = segmentation_loss(logits, labels, torch.rand(19) + 0.5)
    loss.backward()
    assert torch.isfinite(loss) and set(parts) == {"ce", "lovasz"}
    assert logits.grad[:10].abs().sum() == 0  # ignored points get no gradient
    empty, _ = segmentation_loss(logits, torch.full((50,), -1))
    assert float(empty.detach()) == 0.0


def test_weighted_cross_entropy_matches_torch():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(80, 19, generator=g, dtype=torch.float64)
    labels = torch.randint(-1, 19, (80,), generator=g)
    w = torch.rand(19, generator=g, dtype=torch.float64) + 0.1
    ref = F.cross_entropy(logits, labels, weight=w, ignore_index=-1)
    torch.testing.assert_close(weighted_cross_entropy(logits, labels, w).double(), ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(weighted_cross_entropy(logits, labels).double(), F.cross_entropy(logits, labels, ignore_index=-1),
                               rtol=1e-6, atol=1e-7)


def test_class_aware_contrastive_matches_loop():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(40, 8))
    y = rng.integers(0, 4, 40)
    y[:3] = -1
    y[3] = 9  # a class with a single row: no positive term for it
    zn = z / np.linalg.norm(z, axis=1, keepdims=True)
    terms = []
    for a in range(40):
        if y[a] < 0:
            continue
        pos = [float(zn[a] @ zn[p]) for p in range(40) if p != a and y[p] == y[a]]
        neg = [float(zn[a] @ zn[n]) for n in range(40) if y[n] >= 0 and y[n] != y[a]]
        t = max(0.0, 0.9 - min(pos)) if pos else 0.0
        t += max(0.0, max(neg) - 0.5) if neg else 0.0
        terms.append(t)
    got = class_aware_contrastive(torch.from_numpy(z), torch.from_numpy(y))
    assert float(got) == pytest.approx(np.mean(terms), rel=1e-10)
    # the anchor budget draws a subset: the loss is that subset's loss
    sub = class_aware_contrastive(torch.from_numpy(z), torch.from_numpy(y), max_anchors=10,
                                  generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(sub)


def test_voxel_majority_label_against_numpy():
    rng = np.random.default_rng(3)
    inv = rng.integers(0, 30, 400)
    lab = rng.integers(-1, 5, 400)
    got = voxel_majority_label(torch.from_numpy(lab), torch.from_numpy(inv), 30, 5).numpy()
    for v in range(30):
        l = lab[(inv == v) & (lab >= 0)]
        if l.size == 0:
            assert got[v] == -1
        else:
            counts = np.bincount(l, minlength=5)
            assert counts[got[v]] == counts.max()
