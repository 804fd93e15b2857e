"""The SemanticKITTI evaluation on a real labelled scan (issue #3, acceptance 3): the shared metric
with ground truth as prediction, and with a hand-made perturbation whose per-class IoUs are counted
here from the point counts in the test data's PROVENANCE.md."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from threefold.datasets.semantickitti import SEMANTICKITTI_CLASSES, read_labels, read_scan
from threefold.pipelines.metrics.segmentation import SemanticSegmentationMetrics

DATA = Path(os.environ.get("THREEFOLD_TEST_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
SCAN = DATA / "semantickitti" / "sequences" / "99"
pytestmark = pytest.mark.skipif(not (SCAN / "labels" / "000000.label").is_file(),
                                reason=f"real labelled SemanticKITTI scan absent under {SCAN}")

C = {name: i for i, name in enumerate(SEMANTICKITTI_CLASSES)}
# PROVENANCE.md raw counts mapped by the official learning map: car = 10 + 252, person = 30 + 254,
# ignored = 0 + 1 + 52 + 99
COUNTS = {"car": 544 + 990, "bicycle": 20, "person": 23 + 138, "road": 20975, "parking": 84, "sidewalk": 30092,
          "building": 2126, "fence": 531, "vegetation": 24514, "trunk": 3978, "terrain": 30925, "pole": 413,
          "traffic-sign": 1112}
IGNORED = 4458 + 5 + 809 + 1652


@pytest.fixture(scope="module")
def gt() -> np.ndarray:
    n = read_scan(SCAN / "velodyne" / "000000.bin")["coord"].shape[0]
    lab = read_labels(SCAN / "labels" / "000000.label", n)
    assert n == 123389 and int((lab == -1).sum()) == IGNORED
    assert {SEMANTICKITTI_CLASSES[c]: int(v) for c, v in enumerate(np.bincount(lab[lab >= 0], minlength=19)) if v} == COUNTS
    return lab


def evaluate(pred: np.ndarray, gt: np.ndarray, absent: str) -> dict[str, float]:
    metric = SemanticSegmentationMetrics(19, SEMANTICKITTI_CLASSES, absent=absent)
    # two updates, as an evaluation loop over chunks of a scan would do
    half = len(gt) // 2
    metric.update(torch.from_numpy(pred[:half]), torch.from_numpy(gt[:half]))
    metric.update(torch.from_numpy(pred[half:]), torch.from_numpy(gt[half:]))
    return {k: float(v) for k, v in metric.compute().items()}


def test_ground_truth_as_prediction(gt):
    res = evaluate(gt.copy(), gt, "skip")
    assert res["mIoU[absent=skip]"] == 1.0
    assert res["accuracy[overall]"] == 1.0
    for name in COUNTS:
        assert res[f"IoU/{name}"] == 1.0
    # over all 19 classes the 6 absent ones count 0
    assert evaluate(gt.copy(), gt, "zero")["mIoU[absent=zero]"] == pytest.approx(13 / 19, abs=1e-12)


def test_hand_computed_perturbation(gt):
    pred = gt.copy()
    terrain = np.flatnonzero(gt == C["terrain"])
    pred[gt == C["trunk"]] = C["vegetation"]        # every trunk point called vegetation
    pred[terrain[:1000]] = C["road"]                # the first 1000 terrain points (file order) called road
    pred[gt == C["parking"]] = -1                   # parking left unpredicted: false negatives
    pred[gt == -1] = C["car"]                       # predictions on ignored points do not count
    expected = {name: 1.0 for name in COUNTS}
    expected.update({
        "vegetation": 24514 / (24514 + 3978),       # TP 24514, FP 3978 (trunk)
        "trunk": 0.0,                               # TP 0, FN 3978
        "terrain": (30925 - 1000) / 30925,          # FN 1000
        "road": 20975 / (20975 + 1000),             # FP 1000
        "parking": 0.0,                             # FN 84
    })
    res = evaluate(pred, gt, "skip")
    for name, iou in expected.items():
        assert res[f"IoU/{name}"] == pytest.approx(iou, abs=1e-12), name
    assert res["mIoU[absent=skip]"] == pytest.approx(sum(expected.values()) / 13, abs=1e-12)
    valid = len(gt) - IGNORED
    assert res["accuracy[overall]"] == pytest.approx((valid - 3978 - 1000 - 84) / valid, abs=1e-12)
