"""Classification / link-prediction accumulators against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, average_precision_score, f1_score, roc_auc_score

from threefold.datasets.errors import DataFormatError
from threefold.pipelines.metrics.classification import (
    BinaryRankingMetrics,
    ClassificationMetrics,
    MulticlassAccuracy,
    binary_average_precision,
    binary_roc_auc,
)


@pytest.mark.parametrize("seed", [0, 1])
def test_accuracy_and_macro_f1_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    c = 5
    target = rng.integers(0, c - 1, 500)  # class 4 never a target
    pred = np.where(rng.random(500) < 0.5, target, rng.integers(0, c - 1, 500))
    pred[:3] = 4  # but sometimes predicted
    m, acc = ClassificationMetrics(c), MulticlassAccuracy()
    for chunk in np.array_split(np.arange(500), 6):
        m.update(torch.from_numpy(pred[chunk]), torch.from_numpy(target[chunk]))
        acc.update(torch.from_numpy(pred[chunk]), torch.from_numpy(target[chunk]))
    out = m.compute()
    assert out["accuracy"].item() == pytest.approx(accuracy_score(target, pred), rel=1e-12)
    assert acc.compute().item() == pytest.approx(accuracy_score(target, pred), rel=1e-12)
    assert out["macroF1[present]"].item() == pytest.approx(f1_score(target, pred, average="macro"), rel=1e-12)


def test_macro_f1_skips_classes_absent_from_both():
    m = ClassificationMetrics(4)
    m.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
    ref = f1_score([0, 1, 0], [0, 1, 1], average="macro")
    assert m.compute()["macroF1[present]"].item() == pytest.approx(ref)
    assert ref == pytest.approx((2 / 3 + 2 / 3) / 2)


def test_scores_input_takes_argmax():
    logits = torch.tensor([[0.1, 0.9, 0.0], [2.0, 0.0, 0.1], [0.0, 0.0, 3.0]])
    m = ClassificationMetrics(3)
    m.update(logits, torch.tensor([1, 1, 2]))
    assert m.compute()["accuracy"].item() == pytest.approx(2 / 3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_auc_and_ap_match_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    target = rng.integers(0, 2, 400)
    scores = np.round(rng.normal(target * 0.8, 1.0), 1)  # rounding makes many ties
    assert len(np.unique(scores)) < 200
    m = BinaryRankingMetrics()
    for chunk in np.array_split(np.arange(400), 5):
        m.update(torch.from_numpy(scores[chunk]).float(), torch.from_numpy(target[chunk]))
    out = m.compute()
    scores32 = scores.astype(np.float32)  # the metric sees float32 scores
    assert out["ROC-AUC"].item() == pytest.approx(roc_auc_score(target, scores32), rel=1e-12)
    assert out["AP"].item() == pytest.approx(average_precision_score(target, scores32), rel=1e-12)


def test_ranking_edge_cases():
    s = torch.tensor([0.3, 0.3, 0.3])
    assert binary_roc_auc(s, torch.tensor([1, 0, 1])).item() == pytest.approx(0.5)
    assert binary_average_precision(s, torch.tensor([1, 0, 1])).item() == pytest.approx(2 / 3)
    assert torch.isnan(binary_roc_auc(s, torch.tensor([1, 1, 1])))
    assert torch.isnan(binary_average_precision(s, torch.tensor([0, 0, 0])))
    perfect = torch.tensor([0.9, 0.8, 0.1])
    assert binary_roc_auc(perfect, torch.tensor([1, 1, 0])).item() == 1.0
    assert binary_average_precision(perfect, torch.tensor([1, 1, 0])).item() == 1.0


def test_rejects_bad_input():
    with pytest.raises(DataFormatError, match="target labels span"):
        ClassificationMetrics(3).update(torch.tensor([0, 1]), torch.tensor([0, -1]))
    with pytest.raises(DataFormatError, match="0 and 1"):
        BinaryRankingMetrics().update(torch.tensor([0.1, 0.2]), torch.tensor([0, 2]))
