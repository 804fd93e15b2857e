"""RAPiD features (Li et al., ECCV 2024) against a brute-force per-point NumPy reference written here
from the equations, plus rigid invariance, range-aware k, both RoI variants and small RoIs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from threefold.datasets.errors import ConfigError, DataFormatError
from threefold.geometry import lidar_rings, rapid_features


def reference(coord, rem, roi, k=(10, 7, 5), ranges=(20.0, 35.0), delta=0.9, k_max=None, origin=(0, 0, 0)):
    """One point at a time, float64, straight from the definition in the docstring."""
    coord = np.asarray(coord, np.float64)
    rem = np.asarray(rem, np.float64)
    n = len(coord)
    k_max = k_max or max(k)
    rng = np.linalg.norm(coord - np.asarray(origin, np.float64), axis=1)
    neigh = {}
    for j in range(n):
        if roi[j] < 0:
            continue
        kj = k[0] if rng[j] < ranges[0] else (k[1] if rng[j] < ranges[1] else k[2])
        others = [i for i in range(n) if i != j and roi[i] == roi[j]]
        d = sorted((float(np.linalg.norm(coord[j] - coord[i])), i) for i in others)[:kj]
        neigh[j] = d
    all_d = [dd for v in neigh.values() for dd, _ in v]
    d_min, d_max = (min(all_d), max(all_d)) if all_d else (0.0, 0.0)
    r_min, r_max = rem.min(), rem.max()
    s = (d_max - d_min) / (r_max - r_min) if r_max > r_min else 0.0
    rows = {j: sorted(np.sqrt(dd ** 2 + ((rem[j] - rem[i]) * s) ** 2) for dd, i in v) for j, v in neigh.items()}
    top = max((max(r) for r in rows.values() if r), default=0.0)
    out = np.zeros((n, k_max))
    for j, r in rows.items():
        if not r:
            continue
        vals = [min(x / top, delta) if delta is not None else x / top for x in r]
        out[j] = vals + [vals[-1]] * (k_max - len(vals))
    return out


def cloud(n, seed, n_roi=4, spread=30.0):
    rng = np.random.default_rng(seed)
    coord = rng.uniform(-spread, spread, size=(n, 3)).astype(np.float32)
    coord[:, 2] *= 0.1
    rem = rng.uniform(0, 1, n).astype(np.float32)
    roi = rng.integers(0, n_roi, n).astype(np.int64)
    return coord, rem, roi


def rot(yaw, pitch=0.0):
    cy, sy, cp, sp = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch)
    rz = np.array([[cy, -sy, 0], [sy, cy, 0], [0, 0, 1]])
    ry = np.array([[cp, 0, sp], [0, 1, 0], [-sp, 0, cp]])
    return rz @ ry


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_brute_force_reference(seed):
    coord, rem, roi = cloud(300, seed)
    roi[:5] = -1  # no RoI: zero rows
    ref = reference(coord, rem, roi)
    got = rapid_features(coord, rem, roi)
    assert got.dtype == np.float32 and got.shape == (300, 10)
    np.testing.assert_allclose(got, ref, atol=1e-6)
    assert np.all(got[:5] == 0)
    # rows are sorted ascending, values in [0, δ], and some entries are clipped at δ
    assert np.all(np.diff(got, axis=1) >= 0) and got.max() == pytest.approx(0.9) and got.min() >= 0


def test_options_match_reference():
    coord, rem, roi = cloud(200, 3, n_roi=3)
    ref = reference(coord, rem, roi, k=(8, 6, 3), ranges=(10.0, 25.0), delta=None, k_max=12, origin=(1, -2, 0.5))
    got = rapid_features(coord, rem, roi, k=(8, 6, 3), ranges=(10.0, 25.0), delta=None, k_max=12, origin=(1, -2, 0.5))
    np.testing.assert_allclose(got, ref, atol=1e-6)
    assert got.shape == (200, 12) and got.max() == pytest.approx(1.0)


def test_range_aware_k():
    # one RoI per range: end points at exactly 10, 20, 35 and 50 m from the sensor, 20 neighbours each
    # along y; the bands are half-open, R < 20 | 20 <= R < 35 | R >= 35
    dists, ks = (10.0, 20.0, 35.0, 50.0), (10, 7, 5, 5)
    coord = np.array([[r, 0.01 * i, 0.0] for r in dists for i in range(21)], np.float32)
    rem = np.zeros(len(coord), np.float32)
    roi = np.repeat(np.arange(len(dists)), 21)
    g = rapid_features(coord, rem, roi, delta=None)
    for block, kj in enumerate(ks):
        row = g[block * 21]  # the end point: neighbours at 0.01, 0.02, ..., kj * 0.01
        np.testing.assert_allclose(row[:kj] / row[0], np.arange(1, kj + 1), rtol=1e-4)
        assert np.all(row[kj:] == row[kj - 1])


def test_small_rois():
    coord, rem, _ = cloud(40, 4)
    roi = np.array([0] * 30 + [1] * 4 + [2] * 2 + [3] + [-1] * 3)
    g = rapid_features(coord, rem, roi)
    np.testing.assert_allclose(g, reference(coord, rem, roi), atol=1e-6)
    # RoI 1 has 4 points: 3 neighbours, then the cap; RoI 2: one neighbour; RoI 3 alone: zeros
    assert np.all(g[30:34, 3:] == g[30:34, 2:3]) and np.all(np.diff(g[30:34, :3], axis=1) >= 0)
    assert np.all(g[34:36, 1:] == g[34:36, :1]) and np.all(g[34:36, 0] > 0)
    assert np.all(g[36:] == 0)


def test_c_rapid_rigid_invariance():
    coord, rem, cls = cloud(400, 5, n_roi=6)
    base = rapid_features(coord, rem, cls)
    r = rot(1.1, 0.3)
    t = np.array([12.0, -7.0, 3.0])
    moved = (coord.astype(np.float64) @ r.T + t).astype(np.float32)
    got = rapid_features(moved, rem, cls, origin=t)
    np.testing.assert_allclose(got, base, atol=1e-5)


def test_r_rapid_yaw_invariance():
    rng = np.random.default_rng(6)
    n = 3000
    az = rng.uniform(0, 2 * np.pi, n)
    elev = np.deg2rad(np.linspace(2.0, -24.8, 64))[rng.integers(0, 64, n)]
    rr = rng.uniform(4, 60, n)
    coord = np.stack([rr * np.cos(elev) * np.cos(az), rr * np.cos(elev) * np.sin(az), rr * np.sin(elev)], 1)
    coord = coord.astype(np.float32)
    rem = rng.uniform(0, 1, n).astype(np.float32)
    base = rapid_features(coord, rem, lidar_rings(coord))
    moved = (coord.astype(np.float64) @ rot(2.3).T).astype(np.float32)
    ring = lidar_rings(moved)
    np.testing.assert_array_equal(ring, lidar_rings(coord))
    np.testing.assert_allclose(rapid_features(moved, rem, ring), base, atol=1e-5)


def test_torch_cdist_path_matches_kdtree_path_and_reference():
    coord, rem, roi = cloud(500, 7, n_roi=5)
    roi[roi == 4] = np.where(np.arange((roi == 4).sum()) < 3, 4, -1)  # a 3-point RoI, and some ignored points
    want = rapid_features(coord, rem, roi)
    np.testing.assert_allclose(want, reference(coord, rem, roi), atol=1e-6)
    args = [torch.from_numpy(a) for a in (coord, rem, roi)]
    got = rapid_features(*args, search="cdist")  # the GPU algorithm, run on the CPU
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32 and got.shape == (500, 10)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5)
    # CPU tensors default to the kd-tree; NumPy input can ask for the cdist search
    auto = rapid_features(*args)
    assert isinstance(auto, torch.Tensor) and np.array_equal(auto.numpy(), want)
    np.testing.assert_allclose(rapid_features(coord, rem, roi, search="cdist"), want, atol=1e-5)


def test_bad_input():
    coord, rem, roi = cloud(10, 8)
    with pytest.raises(DataFormatError):
        rapid_features(coord[:, :2], rem, roi)
    with pytest.raises(DataFormatError):
        rapid_features(coord, rem[:5], roi)
    with pytest.raises(DataFormatError):
        rapid_features(coord, rem, roi.astype(np.float32))
    with pytest.raises(ConfigError):
        rapid_features(coord, rem, roi, k=(10, 7), ranges=(20.0, 35.0))
    with pytest.raises(ConfigError):
        rapid_features(coord, rem, roi, k_max=5)
    with pytest.raises(ConfigError):
        rapid_features(coord, rem, roi, search="faiss")
    with pytest.raises(DataFormatError):
        rapid_features(torch.from_numpy(coord), torch.from_numpy(rem), torch.from_numpy(roi).float())


@pytest.mark.gpu
def test_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    coord, rem, roi = cloud(20000, 9, n_roi=64, spread=50.0)
    roi[:100] = -1
    args = [torch.from_numpy(a) for a in (coord, rem, roi)]
    want = rapid_features(*args, search="cdist")  # the same algorithm on the CPU (no scipy needed)
    got = rapid_features(*(a.cuda() for a in args))
    assert got.device.type == "cuda" and got.dtype == torch.float32
    np.testing.assert_allclose(got.cpu().numpy(), want.numpy(), atol=1e-5)
    small = cloud(300, 10)
    np.testing.assert_allclose(rapid_features(*(torch.from_numpy(a).cuda() for a in small)).cpu().numpy(),
                               reference(*small), atol=1e-5)
