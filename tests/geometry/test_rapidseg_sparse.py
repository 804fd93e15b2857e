"""spconv on CPU through threefold.geometry.rapid.sparse: convolutions against dense torch conv3d on
the densified grid (an independent reference), forward and backward in train and eval mode with bias,
and the torch-native depth-wise conv and voxeliser."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("spconv")

from threefold.geometry.rapid.sparse import DepthwiseSubMConv3d, SparseConv3d, sparse_tensor, voxelize  # noqa: E402


def _cloud(seed: int = 0, n: int = 300, extent: int = 8):
    g = torch.Generator().manual_seed(seed)
    ijk = torch.randint(0, extent, (n, 3), generator=g)
    b = torch.randint(0, 2, (n, 1), generator=g)
    idx = torch.unique(torch.cat([b, ijk], 1), dim=0).int()
    return idx, g


def _dense(features: torch.Tensor, idx: torch.Tensor, shape) -> torch.Tensor:
    """(B, C, *shape) grid with the features at their sites and zeros elsewhere."""
    b = int(idx[:, 0].max()) + 1
    grid = features.new_zeros(b, features.shape[1], *shape)
    i = idx.long()
    grid[i[:, 0], :, i[:, 1], i[:, 2], i[:, 3]] = features
    return grid


def _krsc_to_torch(w: torch.Tensor) -> torch.Tensor:
    # spconv stores (C_out, k0, k1, k2, C_in); torch's conv3d wants (C_out, C_in, k0, k1, k2)
    return w.permute(0, 4, 1, 2, 3)


@pytest.mark.parametrize("training", [True, False])
def test_subm_conv_matches_dense_conv_with_bias(training):
    idx, g = _cloud()
    feat = torch.randn(len(idx), 5, generator=g, dtype=torch.float32)
    conv = SparseConv3d(5, 7, 3, kind="subm", bias=True)
    with torch.no_grad():
        conv.bias.copy_(torch.randn(7, generator=g))
    conv.train(training)
    x = sparse_tensor(feat.clone().requires_grad_(True), idx, 2)
    out = conv(x)
    feat_ref = feat.clone().requires_grad_(True)
    dense = _dense(feat_ref, idx, x.spatial_shape)
    ref_grid = F.conv3d(dense, _krsc_to_torch(conv.conv.weight), conv.bias, padding=1)
    i = idx.long()
    ref = ref_grid[i[:, 0], :, i[:, 1], i[:, 2], i[:, 3]]
    # submanifold: output only at input sites, neighbours outside the set contribute zero
    torch.testing.assert_close(out.features, ref, atol=1e-5, rtol=1e-5)
    upstream = torch.randn(ref.shape, generator=g)
    (out.features * upstream).sum().backward()
    (ref * upstream).sum().backward()
    torch.testing.assert_close(x.features.grad, feat_ref.grad, atol=1e-5, rtol=1e-5)


def test_cpu_convs_are_exact_with_several_threads():
    """spconv 2.3.8's CPU ops race with more than one torch thread (identical calls up to 0.5 apart on
    this cloud); threefold runs them single-threaded (sparse.py, item 4). Repeated forward and backward
    passes with 2 torch threads must all equal the dense conv3d."""
    idx, g = _cloud(seed=3, n=2500, extent=12)
    feat = torch.randn(len(idx), 6, generator=g)
    conv = SparseConv3d(6, 8, 3, kind="subm").eval()
    dense_in = feat.clone().requires_grad_(True)
    ref_grid = F.conv3d(_dense(dense_in, idx, [12, 12, 12]), _krsc_to_torch(conv.conv.weight), padding=1)
    i = idx.long()
    ref = ref_grid[i[:, 0], :, i[:, 1], i[:, 2], i[:, 3]]
    upstream = torch.randn(ref.shape, generator=g)
    (ref * upstream).sum().backward()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for _ in range(8):
            x = sparse_tensor(feat.clone().requires_grad_(True), idx, 2)
            out = conv(x)
            torch.testing.assert_close(out.features, ref, atol=1e-5, rtol=1e-5)
            (out.features * upstream).sum().backward()
            torch.testing.assert_close(x.features.grad, dense_in.grad, atol=1e-5, rtol=1e-5)
        assert torch.get_num_threads() == 2  # the caller's setting is restored
    finally:
        torch.set_num_threads(threads)


def test_strided_and_inverse_conv_match_dense():
    idx, g = _cloud(1, extent=10)
    feat = torch.randn(len(idx), 3, generator=g)
    down = SparseConv3d(3, 4, 2, 2, kind="conv", indice_key="d1")
    up = SparseConv3d(4, 2, 2, kind="inverse", indice_key="d1", bias=True)
    x = sparse_tensor(feat, idx, 2)
    y = down(x)
    dense = _dense(feat, idx, x.spatial_shape)
    ref = F.conv3d(dense, _krsc_to_torch(down.conv.weight), stride=2)
    j = y.indices.long()
    torch.testing.assert_close(y.features, ref[j[:, 0], :, j[:, 1], j[:, 2], j[:, 3]], atol=1e-5, rtol=1e-5)
    # the coarse sites are exactly the 2×2×2 blocks holding at least one input site
    occupied = torch.unique(torch.cat([idx[:, :1], idx[:, 1:] // 2], 1).long(), dim=0)
    assert torch.equal(torch.unique(j, dim=0), occupied)
    z = up(y)
    assert torch.equal(z.indices.long(), idx.long())  # back onto the fine sites
    # transposed conv: fine site v receives w[v mod 2] applied to its coarse parent (no kernel flip)
    dense_y = _dense(y.features, y.indices, y.spatial_shape)
    w = _krsc_to_torch(up.conv.weight).transpose(0, 1)  # (C_in, C_out, k...) for conv_transpose
    ref_up = F.conv_transpose3d(dense_y, w, up.bias, stride=2)
    i = idx.long()
    torch.testing.assert_close(z.features, ref_up[i[:, 0], :, i[:, 1], i[:, 2], i[:, 3]], atol=1e-5, rtol=1e-5)
    z.features.sum().backward()  # CPU backward of strided + inverse convs (spconv's stream call)
    assert down.conv.weight.grad is not None and torch.isfinite(down.conv.weight.grad).all()


def test_depthwise_conv_matches_grouped_dense_conv():
    idx, g = _cloud(2)
    feat = torch.randn(len(idx), 6, generator=g)
    dw = DepthwiseSubMConv3d(6)
    with torch.no_grad():
        dw.bias.copy_(torch.randn(6, generator=g))
    out = dw(feat, idx)
    shape = (idx[:, 1:].max(0).values + 1).tolist()
    dense = _dense(feat, idx, shape)
    # weight rows follow the offsets (δ0, δ1, δ2) in meshgrid order: a (C, 1, 3, 3, 3) kernel
    w = dw.weight.T.reshape(6, 1, 3, 3, 3)
    ref = F.conv3d(dense, w, dw.bias, padding=1, groups=6)
    i = idx.long()
    torch.testing.assert_close(out, ref[i[:, 0], :, i[:, 1], i[:, 2], i[:, 3]], atol=1e-5, rtol=1e-5)


def test_voxelize_against_numpy():
    rng = np.random.default_rng(0)
    coord = rng.uniform(-3, 3, (500, 3)).astype(np.float32)
    batch = rng.integers(0, 3, 500)
    idx, inv = voxelize(torch.from_numpy(coord), torch.from_numpy(batch), 0.5)
    grid = np.floor(coord / 0.5).astype(np.int64)
    for b in range(3):
        grid[batch == b] -= grid[batch == b].min(0)
    keys = np.concatenate([batch[:, None], grid], 1)
    ref, ref_inv = np.unique(keys, axis=0, return_inverse=True)
    np.testing.assert_array_equal(idx.numpy(), ref)
    np.testing.assert_array_equal(inv.numpy(), ref_inv.ravel())
