"""Volume accumulators against MONAI's own streaming metrics, scikit-image and the BraTS rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from threefold.datasets.errors import DataFormatError
from threefold.pipelines.metrics.volume import ImageSimilarityMetrics, SegmentationOverlapMetrics


# MONAI 1.6 warns about its own internal use of a deprecated argument
pytestmark = pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")

def _masks(seed: int, shape=(3, 2, 14, 12, 10)) -> tuple[torch.Tensor, torch.Tensor]:
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    n1, n2 = rng.standard_normal(shape), rng.standard_normal(shape)
    sigma = (0, 0, 2, 2, 2)
    return (
        torch.from_numpy(ndimage.gaussian_filter(n1 + 0.7 * n2, sigma) > 0.05),
        torch.from_numpy(ndimage.gaussian_filter(n1, sigma) > 0.05),
    )


def test_overlap_matches_monai_streaming():
    monai_metrics = pytest.importorskip("monai.metrics")
    spacing = [1.2, 0.9, 2.0]
    ours = SegmentationOverlapMetrics(["WT", "TC"], spacing=spacing)
    ref_dice = monai_metrics.DiceMetric(include_background=True, reduction="mean_batch")
    ref_hd = monai_metrics.HausdorffDistanceMetric(include_background=True, percentile=95, reduction="mean_batch")
    for seed in (0, 1):
        pred, target = _masks(seed)
        ours.update(pred, target)
        ref_dice(pred.float(), target.float())
        ref_hd(pred.float(), target.float(), spacing=spacing)
    out = ours.compute()
    dice_ref, hd_ref = ref_dice.aggregate(), ref_hd.aggregate()
    for i, region in enumerate(["WT", "TC"]):
        assert out[f"Dice/{region}"].item() == pytest.approx(dice_ref[i].item(), rel=1e-6)
        assert out[f"HD95[max-directed]/{region}"].item() == pytest.approx(hd_ref[i].item(), rel=1e-5)
    assert all(v.item() > 0 for k, v in out.items() if k.startswith("HD95"))


def test_overlap_empty_rules_and_per_volume_spacing():
    pred = torch.zeros(2, 1, 6, 6, 6, dtype=torch.bool)
    target = pred.clone()
    pred[0, 0, 2, 2, 2] = True  # volume 0: only the prediction has the region
    pred[1, 0, 2, 2, 2] = True
    target[1, 0, 2, 2, 4] = True  # volume 1: two voxels 2 apart along W
    m = SegmentationOverlapMetrics(["ET"], hd95="pooled")
    m.update(pred, target, spacing=[[1.0, 1.0, 1.0], [1.0, 1.0, 3.0]])
    empty = torch.zeros(1, 1, 6, 6, 6, dtype=torch.bool)
    m.update(empty, empty)  # both empty: Dice 1, HD95 0
    out = m.compute()
    as_tensor = SegmentationOverlapMetrics(["ET"], hd95="pooled")
    as_tensor.update(pred, target, spacing=torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 3.0]]))
    assert as_tensor.hd95_sum.item() == pytest.approx(373.13 + 6.0, abs=2e-3)
    assert out["Dice/ET"].item() == pytest.approx((0 + 0 + 1) / 3)
    assert out["HD95[pooled]/ET"].item() == pytest.approx((373.13 + 6.0 + 0.0) / 3, abs=2e-3)


def test_similarity_matches_skimage():
    skm = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(0)
    x = rng.random((3, 1, 9, 9, 8))
    y = np.clip(x + 0.1 * rng.standard_normal(x.shape), 0, 1)
    m = ImageSimilarityMetrics(data_range=1.0)
    m.update(torch.from_numpy(x[:2]), torch.from_numpy(y[:2]))
    m.update(torch.from_numpy(x[2:]), torch.from_numpy(y[2:]))
    out = m.compute()
    ssim_ref = np.mean([skm.structural_similarity(x[i, 0], y[i, 0], data_range=1.0) for i in range(3)])
    ncc_ref = np.mean([np.corrcoef(x[i].ravel(), y[i].ravel())[0, 1] for i in range(3)])
    assert out["SSIM3D[win=7,data_range=1]"].item() == pytest.approx(ssim_ref, rel=1e-10)
    assert out["NCC[global]"].item() == pytest.approx(ncc_ref, rel=1e-10)


def test_region_count_is_checked():
    with pytest.raises(DataFormatError, match="regions"):
        SegmentationOverlapMetrics(["WT", "TC", "ET"]).update(
            torch.zeros(1, 2, 4, 4, 4, dtype=torch.bool), torch.zeros(1, 2, 4, 4, 4, dtype=torch.bool)
        )
