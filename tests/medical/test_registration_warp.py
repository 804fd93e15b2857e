"""warp / integrate_velocity / compose against MONAI's Warp and DVF2DDF, and on analytic shifts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from threefold.datasets.errors import ConfigError, DataFormatError
from threefold.medical.registration.warp import compose, integrate_velocity, warp

monai_warp = pytest.importorskip("monai.networks.blocks.warp")


def _smooth(shape, scale, seed, sigma=2.0):
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal(shape), (0, 0, sigma, sigma, sigma))
    return torch.from_numpy(scale * field / np.abs(field).max()).float()


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_warp_equals_monai(mode, padding):
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 9, 11, 13, generator=gen)
    ddf = 3.0 * torch.randn(2, 3, 9, 11, 13, generator=gen)  # large: many samples fall outside
    ours = warp(image, ddf, mode=mode, padding_mode=padding)
    with pytest.warns(UserWarning, match="native grid_sample"):
        ref = monai_warp.Warp(mode=mode, padding_mode=padding)(image, ddf)
    if mode == "bilinear":
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    else:  # a sample point exactly half-way between voxels may round either way; allow a few
        assert (ours != ref).float().mean() < 1e-3


def test_warp_default_padding_is_monai_default():
    image = torch.rand(1, 1, 6, 7, 8)
    ddf = torch.full((1, 3, 6, 7, 8), 2.5)
    with pytest.warns(UserWarning):
        ref = monai_warp.Warp()(image, ddf)
    torch.testing.assert_close(warp(image, ddf), ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_integer_shift_moves_image_exactly(mode):
    image = torch.rand(1, 2, 10, 12, 14, dtype=torch.float64)
    shift = (2, -3, 1)
    ddf = torch.tensor(shift, dtype=torch.float64).view(1, 3, 1, 1, 1).expand(1, 3, 10, 12, 14)
    out = warp(image, ddf, mode=mode)
    # warped[x] = image[x + s] wherever x + s lies inside the volume
    expected = image[:, :, 2:, :12 - 3, 1:]
    got = out[:, :, :10 - 2, 3:, :14 - 1]
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)


def test_nearest_keeps_integer_labels():
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 5, (1, 1, 8, 8, 8), generator=gen)
    ddf = 1.7 * torch.randn(1, 3, 8, 8, 8, generator=gen)
    out = warp(labels, ddf, mode="nearest")
    assert out.dtype == torch.int64
    # brute force: round every sample point and clamp it to the volume (border padding)
    idx = torch.stack(torch.meshgrid(*[torch.arange(8.0)] * 3, indexing="ij")) + ddf[0]
    idx = idx.round().clamp(0, 7).long()
    ref = labels[0, 0][idx[0], idx[1], idx[2]]
    assert (out[0, 0] != ref).float().mean() < 1e-2  # .5 ties only
    with pytest.raises(DataFormatError, match="nearest"):
        warp(labels, ddf, mode="bilinear")


def test_integrate_velocity_equals_monai_dvf2ddf():
    svf = _smooth((2, 3, 12, 10, 14), 4.0, seed=2)
    with pytest.warns(UserWarning):
        ref = monai_warp.DVF2DDF(num_steps=7)(svf)
    torch.testing.assert_close(integrate_velocity(svf, steps=7), ref, atol=1e-5, rtol=0)


def test_integrated_field_is_diffeomorphic_and_invertible():
    from threefold.medical.deformation import jacobian_determinant

    svf = _smooth((1, 3, 24, 24, 24), 5.0, seed=3, sigma=4.0)
    fwd = integrate_velocity(svf)
    inv = integrate_velocity(-svf)
    assert jacobian_determinant(fwd).min() > 0
    # exp(v) ∘ exp(-v) = id: the composed displacement is ~0 away from the border
    resid = compose(fwd, inv)[..., 4:-4, 4:-4, 4:-4].norm(dim=1)
    assert resid.max() < 0.1 * fwd.norm(dim=1).max()


def test_compose_integer_shift_is_exact_and_matches_successive_warps():
    image = torch.rand(1, 1, 16, 16, 16, dtype=torch.float64)
    a = _smooth((1, 3, 16, 16, 16), 2.0, seed=4).double()
    b = torch.tensor([1.0, -2.0, 0.0], dtype=torch.float64).view(1, 3, 1, 1, 1).expand(1, 3, 16, 16, 16)
    c = compose(a, b)
    # c(x) = b + a(x + b) exactly for an integer shift: compare with indexing (inside the volume)
    torch.testing.assert_close(c[:, :, :15, 2:, :], b[:, :, :15, 2:, :] + a[:, :, 1:, :14, :], atol=1e-12, rtol=0)
    inner = (slice(None), slice(None), slice(3, 12), slice(4, 12), slice(3, 13))
    torch.testing.assert_close(warp(image, c)[inner], warp(warp(image, a), b)[inner], atol=1e-10, rtol=0)


def test_compose_linear_fields_analytic():
    # linear displacements are reproduced exactly by trilinear interpolation, so inside the volume
    # compose(a, b)(x) = b(x) + a(x + b(x)) = B x + s + A (x + B x + s) + t holds to rounding
    rng = np.random.default_rng(5)
    A, B = 0.05 * rng.standard_normal((2, 3, 3))
    t, s = rng.uniform(-1, 1, (2, 3))
    x = np.stack(np.meshgrid(*[np.arange(20.0)] * 3, indexing="ij"))
    lin = lambda M, v: torch.from_numpy(np.einsum("ij,j...->i...", M, x) + v[:, None, None, None])[None]
    a, b = lin(A, t), lin(B, s)
    expected = lin(B + A + A @ B, s + A @ s + t)
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4), slice(4, -4))
    torch.testing.assert_close(compose(a, b)[inner], expected[inner], atol=1e-10, rtol=0)
    assert (compose(b, a)[inner] - expected[inner]).abs().max() > 1e-3  # the order matters


def test_bad_inputs():
    with pytest.raises(DataFormatError, match=r"\(B, 3, D, H, W\)"):
        warp(torch.rand(1, 1, 4, 4, 4), torch.rand(1, 2, 4, 4, 4))
    with pytest.raises(DataFormatError, match="spatial"):
        warp(torch.rand(1, 1, 4, 4, 5), torch.rand(1, 3, 4, 4, 4))
    with pytest.raises(ConfigError, match="mode"):
        warp(torch.rand(1, 1, 4, 4, 4), torch.rand(1, 3, 4, 4, 4), mode="bicubic")
    with pytest.raises(ConfigError, match="steps"):
        integrate_velocity(torch.rand(1, 3, 4, 4, 4), steps=0)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(7)
    image = torch.rand(2, 1, 16, 18, 20, generator=gen)
    svf = _smooth((2, 3, 16, 18, 20), 3.0, seed=8)
    cpu = warp(image, integrate_velocity(svf))
    gpu = warp(image.cuda(), integrate_velocity(svf.cuda()))
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)
    labels = torch.randint(0, 4, (2, 1, 16, 18, 20), generator=gen)
    ddf = torch.round(svf)  # integer shifts: no rounding ties between devices
    assert torch.equal(warp(labels.cuda(), ddf.cuda(), mode="nearest").cpu(), warp(labels, ddf, mode="nearest"))
