"""I2P-MAE 2D-guided masking: counts, the softmax-weighted draw, saliency read-back and the
propagation of the mask down the hierarchy against brute-force loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from threefold.datasets.errors import ConfigError
from threefold.geometry.i2pmae.masking import center_saliency, guided_mask, propagate_mask
from threefold.geometry.i2pmae.projection import project_views


def test_guided_mask_counts_seeding_and_salient_centres_stay_visible():
    sal = torch.zeros(4, 64)
    m = guided_mask(sal, 0.8, torch.Generator().manual_seed(0))
    assert m.dtype == torch.bool and m.sum(1).tolist() == [51] * 4  # int(0.8 * 64) masked, 13 visible
    assert torch.equal(m, guided_mask(sal, 0.8, torch.Generator().manual_seed(0)))
    assert not torch.equal(m, guided_mask(sal, 0.8, torch.Generator().manual_seed(1)))
    sal[:, 5] = 30.0  # softmax weight ~1: drawn first, always among the visible
    for seed in range(20):
        assert not guided_mask(sal, 0.8, torch.Generator().manual_seed(seed))[:, 5].any()
    with pytest.raises(ConfigError, match="ratio"):
        guided_mask(sal, 1.0)


def test_guided_mask_follows_the_softmax_in_its_first_draw():
    # With 1 visible out of 4, the visible centre is the first draw: P = softmax(saliency).
    sal = torch.tensor([[0.0, 1.0, 2.0, 0.5]]).expand(4000, 4)
    vis = ~guided_mask(sal, 0.75, torch.Generator().manual_seed(0))
    assert vis.sum(1).eq(1).all()
    freq = vis.float().mean(0).numpy()
    np.testing.assert_allclose(freq, torch.softmax(sal[0], 0).numpy(), atol=0.025)


def test_propagate_mask_equals_a_loop():
    rng = np.random.default_rng(0)
    b, gp, k, gc = 3, 10, 4, 25
    members = torch.tensor(rng.integers(0, gc, size=(b, gp, k)))
    parent = torch.tensor(rng.random((b, gp)) < 0.6)
    got = propagate_mask(parent, members, gc)
    for i in range(b):
        visible = set()
        for p in range(gp):
            if not parent[i, p]:
                visible |= set(members[i, p].tolist())
        assert [c not in visible for c in range(gc)] == got[i].tolist()


def test_center_saliency_averages_the_three_views():
    pts = torch.rand(2, 100, 3)
    _, geoms = project_views(pts)
    attn = torch.stack([torch.full((2, 14, 14), v) for v in (0.3, 0.6, 1.5)])  # constant per view
    sal = center_saliency(attn, pts[:, :7], geoms)
    torch.testing.assert_close(sal, torch.full((2, 7), 0.8))
