"""Deformation accumulator against NumPy (np.gradient, np.linalg.det) and analytic fields."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from threefold.pipelines.metrics.deformation import DeformationMetrics


def _numpy_stats(disp: np.ndarray) -> tuple[float, float, float]:
    grads = np.stack([np.stack(np.gradient(disp[i]), axis=0) for i in range(3)])
    jac = np.linalg.det(np.moveaxis(grads, (0, 1), (-2, -1)) + np.eye(3))
    core = jac[2:-2, 2:-2, 2:-2]
    return (
        100.0 * (jac <= 0).mean(),
        float(np.log(jac[jac > 0]).std()),
        float(np.log(np.clip(core + 3, 1e-9, 1e9)).std()),
    )


def test_streaming_means_match_numpy():
    rng = np.random.default_rng(0)
    disp = rng.normal(0, 0.35, (5, 3, 8, 9, 7))
    m = DeformationMetrics()
    m.update(torch.from_numpy(disp[:2]))
    m.update(torch.from_numpy(disp[2:]))
    out = m.compute()
    ref = np.array([_numpy_stats(d) for d in disp]).mean(axis=0)
    assert ref[0] > 0
    assert out["folding%[J<=0]"].item() == pytest.approx(ref[0], rel=1e-12)
    assert out["SDlogJ[positive]"].item() == pytest.approx(ref[1], rel=1e-10)
    assert out["SDlogJ[learn2reg]"].item() == pytest.approx(ref[2], rel=1e-10)


def test_identity_and_folded_linear_field():
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in (6, 6, 6)], indexing="ij"))
    folded = np.einsum("ij,j...->i...", np.diag([-2.0, 0.0, 0.0]), grid)  # J = det(diag(-1, 1, 1)) = -1
    m = DeformationMetrics()
    m.update(torch.zeros(1, 3, 6, 6, 6, dtype=torch.float64))
    m.update(torch.from_numpy(folded[None]))
    out = m.compute()
    assert out["folding%[J<=0]"].item() == pytest.approx(50.0)
    assert torch.isnan(out["SDlogJ[positive]"])  # the folded volume has no J > 0: visible, not dropped
    assert out["SDlogJ[learn2reg]"].item() == pytest.approx(0.0, abs=1e-12)
