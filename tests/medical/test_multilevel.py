"""Multi-level activation (Hu et al. 2018): nesting for any z / thresholds, finite gradients, losses
against hand-computed values and against MONAI's Dice / Dice-CE losses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from threefold.datasets.errors import ConfigError
from threefold.medical.segmentation import (
    MultiLevelHead,
    SigmoidHead,
    SoftmaxHead,
    multilevel_activation,
    nesting_violations,
    ordinal_to_regions,
    region_probabilities,
    regions_to_ordinal,
)
from threefold.medical.segmentation.multilevel import MultiLevelLoss, OrderedThresholds

finite = st.floats(-50, 50, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(
    z=st.lists(st.floats(-1e4, 1e4, allow_nan=False), min_size=1, max_size=30),
    b=st.lists(finite, min_size=3, max_size=3, unique=True),
    s=st.floats(1e-3, 100),
)
def test_region_probabilities_nested_for_any_z_and_thresholds(z, b, s):
    b = torch.tensor(sorted(b), dtype=torch.float64)
    zt = torch.tensor(z, dtype=torch.float64).view(1, 1, -1, 1, 1)
    p = region_probabilities(zt, b, s)
    assert torch.all(p[:, 0] >= p[:, 1]) and torch.all(p[:, 1] >= p[:, 2])
    regions = p > 0.5
    assert int(nesting_violations(regions).sum()) == 0
    f = multilevel_activation(zt, b, s)
    assert torch.all((f >= 0) & (f <= 1))


@settings(max_examples=40, deadline=None)
@given(c=finite, d=st.lists(finite, min_size=2, max_size=2))
def test_learnable_thresholds_stay_ordered_for_any_parameters(c, d):
    th = OrderedThresholds(learnable=True)
    with torch.no_grad():
        th.first.fill_(c)
        th.raw_gaps.copy_(torch.tensor(d))
    b = th()
    # softplus(-50) is ~2e-22, below float32 resolution at |b| ~ 50: order holds non-strictly there
    assert b[1] >= b[0] and b[2] >= b[1]


def test_learnable_thresholds_start_at_init_and_get_gradients():
    th = OrderedThresholds((-1.0, 0.25, 3.0), learnable=True)
    assert torch.allclose(th(), torch.tensor([-1.0, 0.25, 3.0]), atol=1e-6)
    head = MultiLevelHead((-1.0, 0.25, 3.0), steepness=2.0, learnable_thresholds=True)
    z = torch.randn(2, 1, 4, 4, 4)
    y = torch.randint(0, 4, (2, 4, 4, 4))
    head.loss(z, y).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in head.parameters())


@pytest.mark.parametrize("bad", [(0.0, 0.0, 1.0), (2.0, 1.0, 3.0), (0.0, 1.0)])
def test_unordered_thresholds_rejected(bad):
    with pytest.raises(ConfigError, match="strictly increasing"):
        OrderedThresholds(bad)


def test_gradients_finite_for_extreme_z():
    z = torch.tensor([-1e6, -30.0, 0.0, 1.5, 30.0, 1e6]).view(1, 1, 6, 1, 1).requires_grad_()
    y = torch.tensor([0, 3, 1, 2, 0, 3]).view(1, 6, 1, 1)
    loss = MultiLevelLoss({"dice": 1.0, "bce": 1.0, "mse": 1.0})(z, y, torch.tensor([0.5, 1.5, 2.5]), 4.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_losses_equal_hand_computed_values():
    zs = [-0.3, 0.9, 1.7, 3.1, 2.2, 0.1]
    ys = [0, 1, 2, 3, 3, 1]
    b, s = (0.5, 1.5, 2.5), 2.0
    p = [[_sig(s * (z - bk)) for bk in b] for z in zs]  # p[i][k]
    t = [[1.0 if y >= k + 1 else 0.0 for k in range(3)] for y in ys]
    eps = 1e-5
    dice = 1 - sum(
        (2 * sum(p[i][k] * t[i][k] for i in range(6)) + eps)
        / (sum(p[i][k] for i in range(6)) + sum(t[i][k] for i in range(6)) + eps)
        for k in range(3)
    ) / 3
    bce = -sum(t[i][k] * math.log(p[i][k]) + (1 - t[i][k]) * math.log(1 - p[i][k]) for i in range(6) for k in range(3)) / 18
    mse = sum((sum(p[i]) / 3 - ys[i] / 3) ** 2 for i in range(6)) / 6
    # batch of 2, 3 voxels each: the Dice sums run over batch and voxels
    z = torch.tensor(zs, dtype=torch.float64).view(2, 1, 3, 1, 1)
    y = torch.tensor(ys).view(2, 3, 1, 1)
    bt = torch.tensor(b, dtype=torch.float64)
    for weights, expected in [
        ({"dice": 1.0}, dice),
        ({"bce": 1.0}, bce),
        ({"mse": 1.0}, mse),
        ({"dice": 0.5, "bce": 2.0, "mse": 3.0}, 0.5 * dice + 2.0 * bce + 3.0 * mse),
    ]:
        got = MultiLevelLoss(weights)(z, y, bt, s)
        assert float(got) == pytest.approx(expected, rel=1e-10), weights
    f = multilevel_activation(z, bt, s).flatten().tolist()
    assert f == pytest.approx([sum(pi) / 3 for pi in p], rel=1e-12)


def test_multilevel_dice_matches_monai():
    monai_losses = pytest.importorskip("monai.losses")
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 1, 5, 6, 7, generator=g) * 2 + 1.5
    y = torch.randint(0, 4, (2, 5, 6, 7), generator=g)
    head = MultiLevelHead(steepness=3.0, loss_weights={"dice": 1.0})
    ref = monai_losses.DiceLoss(batch=True, smooth_nr=1e-5, smooth_dr=1e-5)(head(z), ordinal_to_regions(y).float())
    assert float(head.loss(z, y)) == pytest.approx(float(ref), rel=1e-5)


def test_softmax_and_sigmoid_losses_match_monai():
    monai_losses = pytest.importorskip("monai.losses")
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 4, (2, 6, 5, 4), generator=g)
    logits4 = torch.randn(2, 4, 6, 5, 4, generator=g)
    ref4 = monai_losses.DiceCELoss(
        include_background=False, to_onehot_y=True, softmax=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5
    )(logits4, y.unsqueeze(1))
    assert float(SoftmaxHead().loss(logits4, y)) == pytest.approx(float(ref4), rel=1e-5)
    logits3 = torch.randn(2, 3, 6, 5, 4, generator=g)
    target = ordinal_to_regions(y).float()
    ref3 = monai_losses.DiceLoss(sigmoid=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5)(logits3, target)
    ref3 = ref3 + torch.nn.functional.binary_cross_entropy(torch.sigmoid(logits3), target)
    assert float(SigmoidHead().loss(logits3, y)) == pytest.approx(float(ref3), rel=1e-5)


def test_inference_thresholds_at_half():
    head = MultiLevelHead((0.5, 1.5, 2.5), steepness=4.0)
    z = torch.tensor([0.4, 0.6, 1.4, 1.6, 2.4, 2.6, -5.0, 9.0]).view(1, 1, 8, 1, 1)
    assert head.labels(z).flatten().tolist() == [0, 1, 1, 2, 2, 3, 0, 3]


def test_region_encoding_and_violation_count():
    y = torch.tensor([0, 1, 2, 3]).view(1, 4, 1, 1)
    assert ordinal_to_regions(y)[0, :, :, 0, 0].T.tolist() == [
        [False, False, False],
        [True, False, False],
        [True, True, False],
        [True, True, True],
    ]
    # WT TC ET per voxel; the sigmoid head can produce every combination
    combos = torch.tensor(
        [[0, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 1], [0, 0, 1], [1, 0, 1], [0, 1, 0], [0, 1, 1]], dtype=torch.bool
    )
    regions = combos.T.reshape(1, 3, 8, 1, 1)
    assert nesting_violations(regions).tolist() == [4]  # the last four break ET ⊆ TC ⊆ WT
    assert regions_to_ordinal(regions).flatten().tolist() == [0, 1, 2, 3, 3, 3, 2, 3]


def test_softmax_region_probabilities_and_sigmoid_can_violate():
    logits = torch.tensor([0.1, 2.0, -1.0, 0.5]).view(1, 4, 1, 1, 1)
    p = torch.softmax(logits, 1).flatten()
    got = SoftmaxHead()(logits).flatten()
    assert torch.allclose(got, torch.stack([p[1:].sum(), p[2:].sum(), p[3]]))
    sig = SigmoidHead()
    scores = sig.scores(torch.tensor([-3.0, -3.0, 3.0]).view(1, 3, 1, 1, 1))  # ET without WT / TC
    assert int(nesting_violations(sig.regions(scores)).sum()) == 1
    assert int(nesting_violations(SoftmaxHead().regions(torch.rand(2, 4, 3, 3, 3))).sum()) == 0


def test_heads_follow_input_device_and_dtype():
    head = MultiLevelHead(learnable_thresholds=True).double()
    z = torch.randn(1, 1, 2, 2, 2, dtype=torch.float64)
    assert head(z).dtype == torch.float64
    np.testing.assert_array_equal(head.labels(z).numpy(), (z[:, 0, None] > head.thresholds().view(1, 3, 1, 1, 1)).sum(1).numpy())
