"""Jacobian determinant, folding and SDlogJ on analytic fields and against NumPy / the Learn2Reg recipe."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from threefold.datasets.errors import ConfigError, DataFormatError
from threefold.medical.deformation import folding_percentage, jacobian_determinant, sdlogj


def _linear_field(a: np.ndarray, shape=(7, 6, 8)) -> np.ndarray:
    """u(x) = A x on a voxel grid: (3, D, H, W), channel i along axis i."""
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"))
    return np.einsum("ij,j...->i...", a, grid)


def _numpy_jacobian(disp: np.ndarray) -> np.ndarray:
    """det(I + ∇u) with numpy.gradient and numpy.linalg.det, voxel by voxel."""
    grads = np.stack([np.stack(np.gradient(disp[i]), axis=0) for i in range(3)])  # (i, j, D, H, W)
    mats = np.moveaxis(grads, (0, 1), (-2, -1)) + np.eye(3)
    return np.linalg.det(mats)


def _learn2reg_reference(disp: np.ndarray) -> float:
    """The Learn2Reg evaluation recipe: [-0.5, 0, 0.5] correlation, crop 2, log(clip(J + 3)), std."""
    from scipy import ndimage

    kernels = [np.array([-0.5, 0.0, 0.5]).reshape(s) for s in ((3, 1, 1), (1, 3, 1), (1, 1, 3))]
    grad = np.stack([np.stack([ndimage.correlate(disp[i], k, mode="constant") for k in kernels]) for i in range(3)])
    jac = grad + np.eye(3).reshape(3, 3, 1, 1, 1)
    jac = jac[:, :, 2:-2, 2:-2, 2:-2]
    det = (
        jac[0, 0] * (jac[1, 1] * jac[2, 2] - jac[1, 2] * jac[2, 1])
        - jac[1, 0] * (jac[0, 1] * jac[2, 2] - jac[2, 1] * jac[0, 2])
        + jac[2, 0] * (jac[0, 1] * jac[1, 2] - jac[1, 1] * jac[0, 2])
    )
    return float(np.log(np.clip(det + 3, 1e-9, 1e9)).std())


def test_identity_field():
    jac = jacobian_determinant(torch.zeros(2, 3, 5, 6, 7))
    assert jac.shape == (2, 5, 6, 7)
    assert torch.equal(jac, torch.ones_like(jac))
    assert folding_percentage(jac).tolist() == [0.0, 0.0]
    for convention in ("positive", "learn2reg"):
        result = sdlogj(jac, convention)
        assert result.convention == convention
        assert result.value.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("seed", [0, 1])
def test_linear_field_has_constant_det(seed):
    a = np.random.default_rng(seed).uniform(-0.3, 0.3, (3, 3))
    disp = torch.from_numpy(_linear_field(a))
    jac = jacobian_determinant(disp)
    np.testing.assert_allclose(jac.numpy(), np.linalg.det(np.eye(3) + a), rtol=1e-12)


def test_folding_linear_field():
    a = np.array([[-1.5, 0.2, 0.0], [0.0, 0.1, 0.4], [0.3, 0.0, 0.0]])
    jac = jacobian_determinant(torch.from_numpy(_linear_field(a)))
    assert np.linalg.det(np.eye(3) + a) < 0
    assert folding_percentage(jac).item() == 100.0
    assert torch.isnan(sdlogj(jac, "positive").value)


def test_random_field_matches_numpy_gradient():
    rng = np.random.default_rng(3)
    disp = rng.normal(0, 0.4, (2, 3, 9, 8, 10))
    ours = jacobian_determinant(torch.from_numpy(disp))
    ref = np.stack([_numpy_jacobian(d) for d in disp])
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-10, atol=1e-12)
    assert (ref <= 0).any() and (ref > 0).any()
    np.testing.assert_allclose(folding_percentage(ours).numpy(), 100 * (ref <= 0).mean(axis=(1, 2, 3)))
    pos = [np.log(r[r > 0]).std() for r in ref]
    np.testing.assert_allclose(sdlogj(ours, "positive").value.numpy(), pos, rtol=1e-10)
    l2r = [_learn2reg_reference(d) for d in disp]
    np.testing.assert_allclose(sdlogj(ours, "learn2reg").value.numpy(), l2r, rtol=1e-10)
    assert not np.allclose(pos, l2r)


def test_jacobian_is_differentiable():
    disp = (0.1 * torch.randn(1, 3, 4, 4, 4, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda d: jacobian_determinant(d).sum(), (disp,))


def test_errors():
    with pytest.raises(DataFormatError, match="expected"):
        jacobian_determinant(torch.zeros(2, 5, 5, 5))
    with pytest.raises(DataFormatError, match="crop"):
        sdlogj(torch.ones(4, 8, 8), "learn2reg")
    with pytest.raises(ConfigError, match="convention"):
        sdlogj(torch.ones(8, 8, 8), "log")
