"""3D SSIM against scikit-image, NCC against NumPy's corrcoef."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from threefold.datasets.errors import DataFormatError
from threefold.medical.similarity import ncc, ssim3d


def _pair(seed: int, shape) -> tuple[np.ndarray, np.ndarray]:
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(rng.random(shape), 1.0)
    y = x + 0.05 * rng.standard_normal(shape)
    return x, y


@pytest.mark.parametrize("data_range", [1.0, 4.0])
def test_ssim3d_matches_skimage(data_range):
    skm = pytest.importorskip("skimage.metrics")
    x, y = _pair(0, (2, 1, 12, 10, 9))
    ours = ssim3d(torch.from_numpy(x), torch.from_numpy(y), data_range=data_range)
    ref = [skm.structural_similarity(x[i, 0], y[i, 0], data_range=data_range) for i in range(2)]
    assert 0.0 < min(ref) < 0.999
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-10)
    # float32 input stays close to the float64 reference
    ours32 = ssim3d(torch.from_numpy(x).float(), torch.from_numpy(y).float(), data_range=data_range)
    np.testing.assert_allclose(ours32.numpy(), ref, rtol=1e-4)


def test_ssim3d_multichannel_and_unbatched():
    skm = pytest.importorskip("skimage.metrics")
    x, y = _pair(1, (1, 3, 9, 8, 8))
    ours = ssim3d(torch.from_numpy(x), torch.from_numpy(y), data_range=2.0)
    ref = skm.structural_similarity(
        np.moveaxis(x[0], 0, -1), np.moveaxis(y[0], 0, -1), data_range=2.0, channel_axis=-1
    )
    assert ours.shape == (1,)
    assert ours.item() == pytest.approx(ref, rel=1e-10)
    single = ssim3d(torch.from_numpy(x[0, 0]), torch.from_numpy(y[0, 0]), data_range=2.0)
    assert single.ndim == 0
    assert single.item() == pytest.approx(skm.structural_similarity(x[0, 0], y[0, 0], data_range=2.0), rel=1e-10)


def test_ssim3d_identity_and_gradient():
    x = torch.rand(1, 1, 8, 8, 8, dtype=torch.float64, requires_grad=True)
    assert ssim3d(x, x.detach(), data_range=1.0).item() == pytest.approx(1.0)
    y = torch.rand(1, 1, 8, 8, 8, dtype=torch.float64)
    ssim3d(x, y, data_range=1.0).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_ssim3d_rejects_bad_input():
    x = torch.rand(6, 8, 8)
    with pytest.raises(DataFormatError, match="win_size"):
        ssim3d(x, x, data_range=1.0)
    with pytest.raises(DataFormatError, match="data_range"):
        ssim3d(torch.rand(8, 8, 8), torch.rand(8, 8, 8), data_range=0.0)
    with pytest.raises(DataFormatError, match="shape"):
        ssim3d(torch.rand(8, 8, 8), torch.rand(8, 8, 9), data_range=1.0)


def test_ncc_matches_corrcoef():
    x, y = _pair(2, (3, 2, 6, 5, 4))
    y[1] = -0.5 * x[1] + 3.0
    ours = ncc(torch.from_numpy(x), torch.from_numpy(y))
    ref = [np.corrcoef(x[i].ravel(), y[i].ravel())[0, 1] for i in range(3)]
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-12)
    assert ours[1].item() == pytest.approx(-1.0)


def test_ncc_constant_volume_is_zero_with_finite_gradient():
    x = torch.full((1, 1, 4, 4, 4), 2.0, dtype=torch.float64, requires_grad=True)
    y = torch.rand(1, 1, 4, 4, 4, dtype=torch.float64)
    out = ncc(x, y)
    out.sum().backward()
    assert out.item() == 0.0
    assert torch.isfinite(x.grad).all()
