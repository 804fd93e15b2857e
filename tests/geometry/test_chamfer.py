"""Chamfer distance, normal consistency and F-score against brute-force NumPy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from threefold.datasets.errors import ConfigError, DataFormatError
from threefold.geometry.chamfer import chamfer_distance, fscore, normal_consistency


def _nn_numpy(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    j = d2.argmin(1)
    return d2[np.arange(len(a)), j], j


def _chamfer_numpy(a: np.ndarray, b: np.ndarray, squared: bool, reduction: str) -> float:
    da, _ = _nn_numpy(a, b)
    db, _ = _nn_numpy(b, a)
    if not squared:
        da, db = np.sqrt(da), np.sqrt(db)
    total = da.mean() + db.mean()
    return total if reduction == "sum" else total / 2


@pytest.mark.parametrize(("squared", "reduction"), [(True, "sum"), (False, "mean"), (True, "mean"), (False, "sum")])
def test_chamfer_matches_brute_force(squared: bool, reduction: str) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 200, 3))
    y = rng.normal(size=(3, 150, 3)) * 1.3 + 0.2
    got = chamfer_distance(torch.from_numpy(x), torch.from_numpy(y), squared=squared, reduction=reduction)
    want = [_chamfer_numpy(x[b], y[b], squared, reduction) for b in range(3)]
    assert got.shape == (3,)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)
    single = chamfer_distance(torch.from_numpy(x[1]), torch.from_numpy(y[1]), squared=squared, reduction=reduction)
    assert single.dim() == 0
    np.testing.assert_allclose(single.item(), want[1], rtol=1e-12)


def test_chamfer_analytic_translation_and_identity() -> None:
    x = torch.rand(1, 500, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert chamfer_distance(x, x).item() == 0.0
    # Two single points 0.3 apart: squared sum = 2 * 0.09, plain mean = 0.3.
    a = torch.tensor([[0.0, 0.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[0.3, 0.0, 0.0]], dtype=torch.float64)
    assert chamfer_distance(a, b).item() == pytest.approx(0.18)
    assert chamfer_distance(a, b, squared=False, reduction="mean").item() == pytest.approx(0.3)


def test_chamfer_gradient_matches_finite_differences() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 30, 3, dtype=torch.float64, generator=g).requires_grad_()
    y = torch.rand(2, 25, 3, dtype=torch.float64, generator=g).requires_grad_()
    for squared, reduction in [(True, "sum"), (False, "mean")]:
        assert torch.autograd.gradcheck(
            lambda a, b: chamfer_distance(a, b, squared=squared, reduction=reduction), (x, y)
        )


def test_chamfer_float32_large_cloud_matches_float64() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2000, 3, generator=g)
    y = torch.rand(1500, 3, generator=g)
    want = _chamfer_numpy(x.double().numpy(), y.double().numpy(), True, "sum")
    assert chamfer_distance(x, y).item() == pytest.approx(want, rel=1e-5)


def test_normal_consistency_matches_brute_force() -> None:
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(2, 120, 3)), rng.normal(size=(2, 90, 3))
    nx, ny = rng.normal(size=(2, 120, 3)), rng.normal(size=(2, 90, 3))
    got = normal_consistency(*(torch.from_numpy(a) for a in (x, nx, y, ny)))
    for b in range(2):
        unit_x = nx[b] / np.linalg.norm(nx[b], axis=1, keepdims=True)
        unit_y = ny[b] / np.linalg.norm(ny[b], axis=1, keepdims=True)
        _, jx = _nn_numpy(x[b], y[b])
        _, jy = _nn_numpy(y[b], x[b])
        want = (np.abs((unit_x * unit_y[jx]).sum(1)).mean() + np.abs((unit_y * unit_x[jy]).sum(1)).mean()) / 2
        assert got[b].item() == pytest.approx(want, rel=1e-12)


def test_fscore_matches_brute_force() -> None:
    rng = np.random.default_rng(5)
    x, y = rng.random((2, 300, 3)), rng.random((2, 200, 3))
    got = fscore(torch.from_numpy(x), torch.from_numpy(y), threshold=0.05)
    for b in range(2):
        p = (np.sqrt(_nn_numpy(x[b], y[b])[0]) < 0.05).mean()
        r = (np.sqrt(_nn_numpy(y[b], x[b])[0]) < 0.05).mean()
        assert 0 < p < 1 and 0 < r < 1
        assert got[b].item() == pytest.approx(2 * p * r / (p + r), rel=1e-12)
    assert fscore(torch.from_numpy(x[0]), torch.from_numpy(x[0]), 1e-9).item() == 1.0
    # Strict threshold: two points exactly 0.5 apart do not count at threshold 0.5.
    a, b = torch.tensor([[0.0, 0.0, 0.0]]), torch.tensor([[0.5, 0.0, 0.0]])
    assert fscore(a, b, 0.5).item() == 0.0 and fscore(a, b, 0.5001).item() == 1.0


def test_chamfer_rejects_bad_input() -> None:
    x = torch.zeros(10, 3)
    with pytest.raises(ConfigError, match="reduction"):
        chamfer_distance(x, x, reduction="max")
    with pytest.raises(DataFormatError, match=r"\(B, N, D\)"):
        chamfer_distance(x, torch.zeros(1, 10, 3))
