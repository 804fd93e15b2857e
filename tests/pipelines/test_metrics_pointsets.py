"""Point-set accumulator against brute-force NumPy nearest neighbours."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from threefold.pipelines.metrics.pointsets import PointSetMetrics


def _brute(x, nx, y, ny, squared, reduction, threshold):
    d = np.sqrt(((x[:, None] - y[None]) ** 2).sum(-1))
    ix, iy = d.argmin(1), d.argmin(0)
    dx, dy = d.min(1), d.min(0)
    if squared:
        dx, dy = dx**2, dy**2
    cd = dx.mean() + dy.mean()
    cd = cd / 2 if reduction == "mean" else cd
    p, r = (d.min(1) < threshold).mean(), (d.min(0) < threshold).mean()
    f = 0.0 if p + r == 0 else 2 * p * r / (p + r)
    unit = lambda n: n / np.linalg.norm(n, axis=1, keepdims=True)  # noqa: E731
    nx, ny = unit(nx), unit(ny)
    nc = (np.abs((nx * ny[ix]).sum(1)).mean() + np.abs((ny * nx[iy]).sum(1)).mean()) / 2
    return cd, f, nc


@pytest.mark.parametrize(("squared", "reduction"), [(True, "sum"), (False, "mean")])
def test_streaming_means_match_brute_force(squared, reduction):
    rng = np.random.default_rng(0)
    x, y = rng.random((5, 64, 3)), rng.random((5, 80, 3))
    nx, ny = rng.normal(size=x.shape), rng.normal(size=y.shape)
    m = PointSetMetrics(squared=squared, reduction=reduction, fscore_threshold=0.08)
    for sl in (slice(0, 3), slice(3, 5)):
        m.update(*(torch.from_numpy(a[sl]) for a in (x, y, nx, ny)))
    out = m.compute()
    ref = np.array([_brute(x[i], nx[i], y[i], ny[i], squared, reduction, 0.08) for i in range(5)]).mean(axis=0)
    assert 0 < ref[1] < 1
    assert out[f"CD[squared={squared},reduction={reduction}]"].item() == pytest.approx(ref[0], rel=1e-10)
    assert out["F@0.08"].item() == pytest.approx(ref[1], rel=1e-10)
    assert out["NC"].item() == pytest.approx(ref[2], rel=1e-10)


def test_normal_consistency_only_from_clouds_with_normals():
    m = PointSetMetrics()
    x = torch.rand(2, 10, 3)
    m.update(x, x)
    out = m.compute()
    assert "NC" not in out
    assert out["CD[squared=True,reduction=sum]"].item() == 0.0
    assert out["F@0.01"].item() == 1.0
