"""BSP-Net layers and per-phase losses on hand-built planes, T, W and points (values worked out by hand
from the paper's definitions, Chen et al. CVPR 2020 Sec. 3)."""

from __future__ import annotations

import pytest
import torch

from threefold.geometry.bspnet.losses import bspnet_loss, overlap_loss
from threefold.geometry.bspnet.model import bsp_layers

# Two planes: x - 0.1 <= 0 and -x - 0.1 <= 0 (the slab |x| <= 0.1), and y - 0.2 <= 0.
PLANES = torch.tensor([[[1.0, -1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0], [-0.1, -0.1, -0.2]]])  # (1, 4, 3)
POINTS = torch.tensor([[[0.0, 0.0, 0.0], [0.3, 0.0, 0.0], [0.0, 0.5, 0.0], [-0.4, 0.4, 0.0]]])  # (1, 4, 3)
# h1 (distance outside each plane): p0 [0, 0, 0]; p1 [0.2, 0, 0]; p2 [0, 0, 0.3]; p3 [0, 0.3, 0.2]


def test_layers_phase1_hand_values():
    # convex 0 = slab (planes 0, 1), convex 1 = half-space y <= 0.2 (plane 2); 0.005 is below threshold.
    T = torch.tensor([[1.0, 0.005], [0.7, 0.0], [0.0, 0.9]])
    W = torch.ones(2, 1)
    h2, h3 = bsp_layers(POINTS, PLANES, T, W, phase=1)
    expected_h2 = torch.tensor([[0.0, 0.0], [0.2, 0.0], [0.0, 0.3], [0.3, 0.2]])
    torch.testing.assert_close(h2[0], expected_h2)
    torch.testing.assert_close(h3[0, :, 0], torch.tensor([0.0, 0.0, 0.0, 0.2]))
    # phases 3-4 use T itself: convex 0 gets 1.0*h1_0 + 0.7*h1_1, and the 0.005 connection counts.
    h2, h3 = bsp_layers(POINTS, PLANES, T, W, phase=3)
    torch.testing.assert_close(h2[0], torch.tensor([[0.0, 0.0], [0.2, 0.001], [0.0, 0.27], [0.21, 0.18]]))
    torch.testing.assert_close(h3[0, :, 0], torch.tensor([0.0, 0.001, 0.0, 0.18]))
    # a convex mask removes convex 1 from the union
    _, h3 = bsp_layers(POINTS, PLANES, T, W, phase=1, convex_mask=torch.tensor([0.0, 10.0]))
    torch.testing.assert_close(h3[0, :, 0], torch.tensor([0.0, 0.2, 0.0, 0.3]))


def test_layers_phase0_hand_values():
    T = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 5.0]])
    W = torch.tensor([[0.6], [0.6]])
    h2, h3 = bsp_layers(POINTS, PLANES, T, W, phase=0)
    # h2 = clamp(1 - h1 T, 0, 1)
    torch.testing.assert_close(h2[0], torch.tensor([[1.0, 1.0], [0.6, 1.0], [1.0, 0.0], [0.4, 0.0]]))
    # h3 = clamp(h2 W, 0, 1)
    torch.testing.assert_close(h3[0, :, 0], torch.tensor([1.0, 0.96, 0.6, 0.24]))


def test_phase0_loss():
    h3 = torch.tensor([[[1.0], [0.5], [0.0]]])
    values = torch.tensor([[[1.0], [0.0], [1.0]]])
    T = torch.tensor([[1.5, -0.2], [0.5, 1.0]])  # penalty: (1.5 - 1) + 0.2 = 0.7
    W = torch.tensor([[0.5], [2.0]])  # |W - 1|: 0.5 + 1.0 = 1.5
    loss = bspnet_loss(torch.zeros(1, 3, 2), h3, values, T, W, phase=0)
    assert loss.recon.item() == pytest.approx((0 + 0.25 + 1) / 3)
    assert loss.total.item() == pytest.approx((0 + 0.25 + 1) / 3 + 1.5 + 0.7)


def test_phase1_recon_is_hinge():
    # inside points pay max(h3, 0); outside points pay 1 - min(h3, 1)
    h3 = torch.tensor([[[0.0], [0.2], [0.2], [1.5], [-0.1]]])
    values = torch.tensor([[[1.0], [1.0], [0.0], [0.0], [1.0]]])
    loss = bspnet_loss(torch.zeros(1, 5, 1), h3, values, torch.zeros(2, 1), torch.zeros(1, 1), phase=1)
    assert loss.recon.item() == pytest.approx((0 + 0.2 + 0.8 + 0 + 0) / 5)
    assert loss.total.item() == pytest.approx(loss.recon.item())


def test_phase3_T_term():
    T = torch.tensor([[0.005, -0.3], [0.6, 1.2]])  # 0.005 + 0.3 + 0.4 + 0.2
    h3, values = torch.zeros(1, 1, 1), torch.ones(1, 1, 1)
    loss = bspnet_loss(torch.zeros(1, 1, 2), h3, values, T, torch.zeros(2, 1), phase=3)
    assert loss.recon.item() == 0.0
    assert loss.total.item() == pytest.approx(0.905)


def test_overlap_loss_phases_2_and_4():
    # point 0 (inside shape) lies in convexes 0 and 1 -> masked; point 1 (inside) only in convex 0;
    # point 2 (outside the shape) in convexes 0 and 1 -> weighted by F* = 0.
    h2 = torch.tensor([[[0.0, 0.005, 0.5], [0.0, 0.3, 0.4], [0.002, 0.003, 0.9]]])
    values = torch.tensor([[[1.0], [1.0], [0.0]]])
    expected = -(0.0 + 0.005) / 9
    assert overlap_loss(h2, values).item() == pytest.approx(expected)
    h3 = h2.min(-1, keepdim=True).values
    T = torch.tensor([[1.0, 1.0, 1.0]])
    p1 = bspnet_loss(h2, h3, values, T, torch.zeros(3, 1), phase=1)
    p2 = bspnet_loss(h2, h3, values, T, torch.zeros(3, 1), phase=2)
    p4 = bspnet_loss(h2, h3, values, T, torch.zeros(3, 1), phase=4)
    assert p2.total.item() == pytest.approx(p1.total.item() + expected)
    assert p4.total.item() == pytest.approx(p1.total.item() + expected)  # T entries at 1: no T term


def test_gradients_reach_T_only_where_the_paper_says():
    T = torch.tensor([[1.0, 0.005], [0.7, 0.0], [0.0, 0.9]], requires_grad=True)
    W = torch.ones(2, 1, requires_grad=True)
    values = torch.tensor([[[1.0], [1.0], [0.0], [1.0]]])
    planes = PLANES.clone().requires_grad_()
    for phase, expect_grad in ((1, False), (2, False), (3, True)):
        T.grad = None
        h2, h3 = bsp_layers(POINTS, planes, T, W, phase)
        bspnet_loss(h2, h3, values, T, W, phase).recon.backward()
        assert (T.grad is not None and T.grad.abs().sum() > 0) == expect_grad


def test_bad_phase():
    with pytest.raises(ValueError, match="phase"):
        bsp_layers(POINTS, PLANES, torch.zeros(3, 1), torch.zeros(1, 1), phase=5)
    with pytest.raises(ValueError, match="phase"):
        bspnet_loss(torch.zeros(1, 1, 1), torch.zeros(1, 1, 1), torch.zeros(1, 1, 1), torch.zeros(1, 1), torch.zeros(1, 1), 7)
