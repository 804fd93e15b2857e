"""Registration losses against MONAI and brute-force NumPy references, and the proof that the
smoothness penalty acts on the flow."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from threefold.datasets.errors import ConfigError, DataFormatError
from threefold.medical.registration.losses import (
    diffusion_loss,
    local_ncc,
    local_ncc_loss,
    mutual_information_parzen,
    registration_loss,
)

monai = pytest.importorskip("monai")


def _smooth_pair(seed: int, shape=(2, 1, 14, 12, 13)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(shape, generator=g, dtype=torch.float64)
    b = 0.6 * a + 0.4 * torch.rand(shape, generator=g, dtype=torch.float64)
    return a, b


def test_local_ncc_equals_monai_squared_lncc():
    """MONAI's rectangular LNCC returns −mean(cross² / (var_p var_t)): our local_ncc is that value."""
    from monai.losses import LocalNormalizedCrossCorrelationLoss

    a, b = _smooth_pair(0)
    ours = local_ncc(a, b, window=9, eps=0.0)
    ref = LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=9, kernel_type="rectangular", smooth_nr=0.0, smooth_dr=1e-12)(a, b)
    torch.testing.assert_close(ours, -ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(local_ncc_loss(a, b), ref, rtol=1e-4, atol=1e-6)  # default eps 1e-5


def test_local_ncc_brute_force_numpy():
    """Window sums with zero padding and fixed n = 9³, one voxel at a time."""
    a, b = _smooth_pair(1, shape=(1, 1, 10, 11, 9))
    p, t = a[0, 0].numpy(), b[0, 0].numpy()
    pp, tp = np.pad(p, 4), np.pad(t, 4)
    n = 9**3
    cc = np.zeros_like(p)
    for i, j, k in np.ndindex(p.shape):
        wp, wt = pp[i : i + 9, j : j + 9, k : k + 9], tp[i : i + 9, j : j + 9, k : k + 9]
        cross = (wp * wt).sum() - wp.sum() * wt.sum() / n
        vp = (wp * wp).sum() - wp.sum() ** 2 / n
        vt = (wt * wt).sum() - wt.sum() ** 2 / n
        cc[i, j, k] = cross**2 / (vp * vt + 1e-5)
    assert float(local_ncc(a, b)) == pytest.approx(cc.mean(), rel=1e-10)


def test_local_ncc_is_one_for_scaled_intensities_and_invariant_to_contrast_inversion():
    # a pure scale keeps the zero padding consistent, so every window correlates exactly
    a, _ = _smooth_pair(2)
    assert float(local_ncc(a, 3.0 * a, eps=0.0)) == pytest.approx(1.0, abs=1e-9)
    assert float(local_ncc(a, -0.5 * a, eps=0.0)) == pytest.approx(1.0, abs=1e-9)  # squared: sign-free
    # an offset is invisible in the interior (windows inside the volume) but not at the padded border
    inner = local_ncc(a, a + 1.0, eps=0.0)
    assert 0.5 < float(inner) < 1.0


def test_diffusion_loss_central_equals_monai():
    from monai.losses import DiffusionLoss

    g = torch.Generator().manual_seed(3)
    u = torch.randn(2, 3, 9, 8, 10, generator=g, dtype=torch.float64)
    torch.testing.assert_close(diffusion_loss(u, "central"), DiffusionLoss()(u), rtol=1e-12, atol=1e-12)


def test_diffusion_loss_forward_brute_force_and_linear_field():
    g = torch.Generator().manual_seed(4)
    u = torch.randn(1, 3, 6, 7, 5, generator=g, dtype=torch.float64)
    x = u.numpy()
    ref = np.mean([np.mean(np.diff(x, axis=d) ** 2) for d in (2, 3, 4)])
    assert float(diffusion_loss(u)) == pytest.approx(ref, rel=1e-12)
    # linear field u_c(x) = Σ_d A[c, d] x_d: forward = Σ A² / 9, central (MONAI) = Σ A² / 3
    a = torch.tensor([[0.1, -0.2, 0.05], [0.3, 0.0, 0.1], [-0.1, 0.2, 0.4]], dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in (7, 8, 9)], indexing="ij"))
    lin = torch.einsum("cd,dijk->cijk", a, grid)[None]
    assert float(diffusion_loss(lin)) == pytest.approx(float((a**2).sum() / 9), rel=1e-12)
    assert float(diffusion_loss(lin, "central")) == pytest.approx(float((a**2).sum() / 3), rel=1e-12)


def test_mutual_information_parzen_equals_monai():
    from monai.losses import GlobalMutualInformationLoss

    a, b = _smooth_pair(5)
    ours = mutual_information_parzen(a.float(), b.float())
    ref = GlobalMutualInformationLoss(kernel_type="gaussian", num_bins=23, sigma_ratio=0.5, reduction="none")(a.float(), b.float())
    torch.testing.assert_close(ours, -ref.reshape(-1), rtol=1e-5, atol=1e-6)
    # MI of a volume with itself exceeds MI with an independent volume
    assert float(mutual_information_parzen(a, a).mean()) > float(mutual_information_parzen(a, torch.rand_like(a)).mean()) + 0.5


def test_smoothness_term_acts_on_the_flow_not_the_image():
    """∂smoothness/∂ddf is nonzero and the smoothness value does not change when the images do."""
    g = torch.Generator().manual_seed(6)
    warped, fixed = torch.rand(1, 1, 12, 12, 12, generator=g), torch.rand(1, 1, 12, 12, 12, generator=g)
    ddf = torch.randn(1, 3, 12, 12, 12, generator=g).requires_grad_(True)
    out = registration_loss(warped, fixed, ddf)
    (grad,) = torch.autograd.grad(out["smoothness"], ddf)
    assert grad.abs().sum() > 0
    other = registration_loss(torch.rand(1, 1, 12, 12, 12, generator=g), fixed, ddf)
    assert other["smoothness"].item() == out["smoothness"].item()
    # a constant (rigid-shift) field costs nothing, whatever the image
    const = torch.full((1, 3, 12, 12, 12), 2.5, requires_grad=True)
    assert float(registration_loss(warped, fixed, const)["smoothness"]) == 0.0
    # the image gets no gradient from the smoothness term
    w = warped.clone().requires_grad_(True)
    s = registration_loss(w, fixed, ddf)["smoothness"]
    assert torch.autograd.grad(s, w, allow_unused=True)[0] is None


def test_bad_inputs():
    with pytest.raises(DataFormatError):
        local_ncc(torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 7))
    with pytest.raises(ConfigError):
        local_ncc(torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 8), window=4)
    with pytest.raises(DataFormatError):
        diffusion_loss(torch.rand(1, 2, 8, 8, 8))
    with pytest.raises(ConfigError):
        registration_loss(torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 8), torch.rand(1, 3, 8, 8, 8), similarity="mse")
