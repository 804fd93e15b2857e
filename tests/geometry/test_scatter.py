"""Native scatter reductions against brute-force NumPy, and against torch-scatter where installed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from threefold.geometry import scatter as sc


def brute(src: np.ndarray, index: np.ndarray, n: int, op: str) -> np.ndarray:
    out = np.zeros((n, *src.shape[1:]))
    for s in range(n):
        seg = src[index == s]
        if len(seg) == 0:
            continue
        if op == "sum":
            out[s] = seg.sum(0)
        elif op == "mean":
            out[s] = seg.mean(0)
        elif op == "max":
            out[s] = seg.max(0)
    return out


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    src = torch.randn(200, 5, generator=g, dtype=torch.float64)
    index = torch.randint(0, 30, (200,), generator=g)
    index[index == 7] = 8  # segment 7 is empty
    return src, index, 31  # and so is the last one


@pytest.mark.parametrize("op", ["sum", "mean", "max"])
def test_reductions_match_brute_force(data, op):
    src, index, n = data
    got = getattr(sc, f"scatter_{op}")(src, index, n)
    np.testing.assert_allclose(got.numpy(), brute(src.numpy(), index.numpy(), n, op), rtol=1e-12, atol=1e-12)
    assert (got[7] == 0).all() and (got[30] == 0).all()


def test_softmax_matches_brute_force_and_is_stable(data):
    src, index, n = data
    src = src * 500  # exp would overflow without the max shift
    got = sc.scatter_softmax(src, index, n).numpy()
    s, idx = src.numpy(), index.numpy()
    for seg in np.unique(idx):
        x = s[idx == seg]
        e = np.exp(x - x.max(0))
        np.testing.assert_allclose(got[idx == seg], e / e.sum(0), rtol=1e-10)
    assert np.isfinite(got).all()


def test_softmax_gradient_flows(data):
    src, index, n = data
    src = src.clone().requires_grad_(True)
    (sc.scatter_softmax(src, index, n)[:, 0] * torch.arange(200.0, dtype=torch.float64)).sum().backward()
    assert torch.isfinite(src.grad).all() and src.grad.abs().sum() > 0


def test_bad_index_shape(data):
    src, index, n = data
    with pytest.raises(ValueError, match="index must be"):
        sc.scatter_max(src, index[:-1], n)


@pytest.mark.parametrize("op", ["sum", "mean", "max", "softmax"])
def test_torch_scatter_path_agrees(data, op, monkeypatch):
    pytest.importorskip("torch_scatter", reason="torch-scatter (optional accelerator) is not installed")
    src, index, n = data
    native = getattr(sc, f"scatter_{op}")(src, index, n)
    monkeypatch.setenv("THREEFOLD_SCATTER", "torch_scatter")
    accelerated = getattr(sc, f"scatter_{op}")(src, index, n)
    torch.testing.assert_close(accelerated, native)
