"""Segmentation accumulator on a hand-computed confusion matrix and against a transcription of the
SemanticKITTI ``np_ioueval`` evaluator and scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from threefold.datasets.errors import ConfigError, DataFormatError
from threefold.pipelines.metrics.segmentation import SemanticSegmentationMetrics, confusion_matrix


def _np_ioueval(pred: np.ndarray, target: np.ndarray, n_classes: int) -> tuple[np.ndarray, float]:
    """semantic-kitti-api np_ioueval with class 0 ignored: our label l is their l + 1."""
    conf = np.zeros((n_classes + 1, n_classes + 1), dtype=np.int64)
    np.add.at(conf, (pred + 1, target + 1), 1)  # [pred, gt], as addBatch
    conf[:, [0]] = 0
    tp = np.diag(conf)
    fp = conf.sum(axis=1) - tp
    fn = conf.sum(axis=0) - tp
    include = np.arange(1, n_classes + 1)
    iou = tp / (tp + fp + fn + 1e-15)
    return iou[include], float(iou[include].mean())


def test_hand_computed_matrix():
    # 3 classes; class 2 never appears. Points (target, pred):
    target = torch.tensor([0, 0, 0, 1, 1, -1, -1, 0, 1])
    pred = torch.tensor([0, 0, 1, 1, -1, 2, 0, -1, 1])
    conf = confusion_matrix(pred, target, 3)
    expected = torch.tensor(
        [
            [2, 1, 0, 1],  # class 0: 2 right, 1 as class 1, 1 predicted ignored
            [0, 2, 0, 1],  # class 1: 2 right, 1 predicted ignored
            [0, 0, 0, 0],
        ]
    )
    assert torch.equal(conf, expected)
    m = SemanticSegmentationMetrics(3, class_names=["car", "road", "tree"])
    m.update(pred[:4], target[:4])
    m.update(pred[4:], target[4:])
    out = m.compute()
    # class 0: TP 2, FP 0, FN 2 -> 2/4; class 1: TP 2, FP 1, FN 1 -> 2/4; class 2 absent -> 0
    assert out["IoU/car"].item() == pytest.approx(0.5)
    assert out["IoU/road"].item() == pytest.approx(0.5)
    assert out["IoU/tree"].item() == 0.0
    assert out["mIoU[absent=zero]"].item() == pytest.approx(1 / 3)
    assert out["accuracy[overall]"].item() == pytest.approx(4 / 7)
    skip = SemanticSegmentationMetrics(3, absent="skip")
    skip.update(pred, target)
    assert skip.compute()["mIoU[absent=skip]"].item() == pytest.approx(0.5)


@pytest.mark.parametrize("seed", [0, 1])
def test_random_against_np_ioueval_and_sklearn(seed):
    from sklearn.metrics import accuracy_score, jaccard_score

    rng = np.random.default_rng(seed)
    c = 6
    target = rng.integers(-1, c - 1, 3000)  # class c-1 never in ground truth
    pred = np.where(rng.random(3000) < 0.6, target, rng.integers(-1, c, 3000))
    pred[target == 2] = np.where(rng.random((target == 2).sum()) < 0.5, -1, 2)
    m = SemanticSegmentationMetrics(c)
    for chunk in np.array_split(np.arange(3000), 7):
        m.update(torch.from_numpy(pred[chunk]), torch.from_numpy(target[chunk]))
    out = m.compute()
    iou_ref, miou_ref = _np_ioueval(pred, target, c)
    np.testing.assert_allclose([out[f"IoU/{i}"].item() for i in range(c)], iou_ref, rtol=1e-12)
    assert out["mIoU[absent=zero]"].item() == pytest.approx(miou_ref, rel=1e-12)
    keep = target != -1
    # sklearn with -1 as a label of its own: a -1 prediction is a miss of the true class
    sk = jaccard_score(target[keep], pred[keep], labels=list(range(c)), average=None, zero_division=0)
    np.testing.assert_allclose(iou_ref, sk, rtol=1e-12)
    assert out["accuracy[overall]"].item() == pytest.approx(accuracy_score(target[keep], pred[keep]))


def test_absent_class_conventions_differ():
    target = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 1, 1, 1])
    zero = SemanticSegmentationMetrics(4)
    skip = SemanticSegmentationMetrics(4, absent="skip")
    zero.update(pred, target)
    skip.update(pred, target)
    iou0, iou1 = 1 / 2, 2 / 3
    assert zero.compute()["mIoU[absent=zero]"].item() == pytest.approx((iou0 + iou1) / 4)
    assert skip.compute()["mIoU[absent=skip]"].item() == pytest.approx((iou0 + iou1) / 2)


def test_rejects_bad_labels():
    m = SemanticSegmentationMetrics(3)
    with pytest.raises(DataFormatError, match="target labels span"):
        m.update(torch.tensor([0, 1]), torch.tensor([0, 3]))
    with pytest.raises(DataFormatError, match="pred labels span"):
        m.update(torch.tensor([-2, 1]), torch.tensor([0, 1]))
    with pytest.raises(DataFormatError, match="integer"):
        m.update(torch.tensor([0.0, 1.0]), torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match="absent"):
        SemanticSegmentationMetrics(3, absent="nan")
