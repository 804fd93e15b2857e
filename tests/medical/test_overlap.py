"""Dice and HD95 against MONAI (where both are defined), brute-force NumPy and the BraTS empty rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from threefold.datasets.errors import DataFormatError
from threefold.medical.overlap import BRATS_EMPTY_HD95_MM, dice, hausdorff95, hausdorff95_pooled


# MONAI 1.6 warns about its own internal use of a deprecated argument
pytestmark = pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")

def _blobs(seed: int, shape=(2, 18, 16, 14)) -> tuple[torch.Tensor, torch.Tensor]:
    """Two overlapping, irregular masks: thresholded smoothed noise."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    n1, n2 = rng.standard_normal(shape), rng.standard_normal(shape)
    a = ndimage.gaussian_filter(n1 + 0.7 * n2, sigma=(0, 2, 2, 2)) > 0.05
    b = ndimage.gaussian_filter(n1, sigma=(0, 2, 2, 2)) > 0.05
    return torch.from_numpy(a), torch.from_numpy(b)


def _brute_boundary(m: np.ndarray) -> np.ndarray:
    """Voxels of m with at least one 6-neighbour outside m (outside the array counts as outside)."""
    padded = np.pad(m, 1, constant_values=False)
    inner = np.ones_like(m)
    for axis in range(3):
        for shift in (-1, 1):
            inner &= np.roll(padded, shift, axis=axis)[1:-1, 1:-1, 1:-1]
    return m & ~inner


def _brute_directed(a: np.ndarray, b: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    pa = np.argwhere(_brute_boundary(a)) * np.asarray(spacing)
    pb = np.argwhere(_brute_boundary(b)) * np.asarray(spacing)
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return d.min(axis=1), d.min(axis=0)


def test_brats_constant_is_the_volume_diagonal():
    assert BRATS_EMPTY_HD95_MM == pytest.approx(373.13, abs=5e-3)


def test_dice_matches_monai_and_counts():
    monai_metrics = pytest.importorskip("monai.metrics")
    pred, target = _blobs(0)
    ours = dice(pred, target)
    ref = monai_metrics.DiceMetric(include_background=True, reduction="none")(
        pred[:, None].float(), target[:, None].float()
    )[:, 0]
    torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=1e-6)
    p, t = pred.numpy(), target.numpy()
    counts = 2 * (p & t).sum((1, 2, 3)) / (p.sum((1, 2, 3)) + t.sum((1, 2, 3)))
    np.testing.assert_allclose(ours.numpy(), counts, rtol=1e-6)


def test_soft_dice_is_differentiable():
    pred = torch.rand(1, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    target = torch.rand(1, 4, 4, 4, dtype=torch.float64) > 0.5
    assert torch.autograd.gradcheck(lambda p: dice(p, target), (pred,))
    empty = torch.zeros(1, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    dice(empty, torch.zeros(1, 3, 3, 3, dtype=torch.bool)).sum().backward()
    assert torch.isfinite(empty.grad).all()


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.5, 0.8, 2.0)])
def test_hausdorff95_matches_monai(spacing):
    monai_metrics = pytest.importorskip("monai.metrics")
    pred, target = _blobs(1)
    ours = hausdorff95(pred, target, spacing)
    ref = monai_metrics.HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(
        pred[:, None].float(), target[:, None].float(), spacing=list(spacing)
    )[:, 0]
    assert (ours > 0).all()
    torch.testing.assert_close(ours, ref.double(), rtol=1e-5, atol=1e-5)


def test_hausdorff95_both_conventions_against_brute_force():
    pred, target = _blobs(2)
    spacing = np.array([[1.0, 2.0, 0.5], [0.7, 0.7, 3.0]])
    directed = hausdorff95(pred, target, torch.from_numpy(spacing))
    pooled = hausdorff95_pooled(pred, target, spacing)
    for i in range(2):
        d_pt, d_tp = _brute_directed(pred[i].numpy(), target[i].numpy(), spacing[i])
        assert directed[i].item() == pytest.approx(max(np.percentile(d_pt, 95), np.percentile(d_tp, 95)), rel=1e-9)
        assert pooled[i].item() == pytest.approx(np.percentile(np.concatenate([d_pt, d_tp]), 95), rel=1e-9)
    # the conventions must really differ on this input, or the test could not tell them apart
    assert not torch.allclose(directed, pooled)


def test_single_voxel_shift_is_spacing():
    pred = torch.zeros(9, 9, 9, dtype=torch.bool)
    target = torch.zeros(9, 9, 9, dtype=torch.bool)
    pred[4, 4, 4] = True
    target[4, 4, 6] = True
    assert hausdorff95(pred, target, (1.0, 1.0, 2.5)).item() == pytest.approx(5.0)
    assert hausdorff95_pooled(pred, target, (1.0, 1.0, 2.5)).item() == pytest.approx(5.0)
    assert dice(pred, target).item() == 0.0


def test_brats_empty_rules():
    empty = torch.zeros(2, 5, 5, 5, dtype=torch.bool)
    full = empty.clone()
    full[:, 1:3, 1:3, 1:3] = True
    assert dice(empty, empty).tolist() == [1.0, 1.0]
    assert dice(full, empty).tolist() == [0.0, 0.0]
    assert dice(empty, full).tolist() == [0.0, 0.0]
    for fn in (hausdorff95, hausdorff95_pooled):
        assert fn(empty, empty).tolist() == [0.0, 0.0]
        assert fn(full, empty).tolist() == pytest.approx([373.13] * 2, abs=5e-3)
        assert fn(empty, full).tolist() == pytest.approx([373.13] * 2, abs=5e-3)
        assert fn(full, full).tolist() == [0.0, 0.0]
    assert math.isclose(dice(full, full)[0].item(), 1.0)


def test_errors_name_the_problem():
    m = torch.zeros(2, 4, 4, 4, dtype=torch.bool)
    with pytest.raises(DataFormatError, match="shape"):
        dice(m, m[:1])
    with pytest.raises(DataFormatError, match="spacing"):
        hausdorff95(m, m, (1.0, 1.0))
    with pytest.raises(DataFormatError, match="spacing"):
        hausdorff95(m, m, (1.0, 0.0, 1.0))
    with pytest.raises(DataFormatError, match="torch.bool"):
        hausdorff95(m.float(), m)
