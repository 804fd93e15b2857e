"""The azimuth-window torch search of RAPiD features (geometry/rapid/window_knn.py) against brute force:
neighbour distances from dense NumPy distance matrices per RoI, feature rows from a dense NumPy reference
written here from the equations, the NumPy kd-tree path on the real scans, and the awkward cases of the
exactness check (points on the sensor axis, many points at one azimuth, tiny RoIs, narrow windows)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from threefold.datasets.errors import ConfigError
from threefold.geometry import lidar_rings, rapid_features
from threefold.geometry.rapid.window_knn import azimuth_window_knn


def brute_knn(coord, roi, k_pt):
    """Sorted distances (N, max k) of each point's k_pt nearest same-RoI points (float64), inf-padded."""
    x = np.asarray(coord, np.float64)
    kq = int(np.max(k_pt))
    out = np.full((len(x), kq), np.inf)
    for g in np.unique(roi):
        members = np.flatnonzero(roi == g)
        d = np.sqrt(((x[members, None] - x[None, members]) ** 2).sum(-1))
        np.fill_diagonal(d, np.inf)
        d.sort(axis=1)
        kk = min(kq, len(members) - 1)
        out[members, :kk] = d[:, :kk]
    col = np.arange(kq)[None, :]
    return np.where(col < np.asarray(k_pt)[:, None], out, np.inf)


def brute_features(coord, rem, roi, k=(10, 7, 5), ranges=(20.0, 35.0), delta=0.9, origin=(0.0, 0.0, 0.0)):
    """RAPiD rows from dense distance matrices (no RoI-less points): kNN by argsort, then Eqs. 3-8."""
    x = np.asarray(coord, np.float64)
    r = np.asarray(rem, np.float64)
    rng = np.linalg.norm(x - np.asarray(origin), axis=1)
    k_pt = np.where(rng < ranges[0], k[0], np.where(rng < ranges[1], k[1], k[2]))
    kq = max(k)
    d = np.full((len(x), kq), np.nan)
    dr = np.zeros((len(x), kq))
    for g in np.unique(roi):
        members = np.flatnonzero(roi == g)
        dm = np.sqrt(((x[members, None] - x[None, members]) ** 2).sum(-1))
        np.fill_diagonal(dm, np.inf)
        nn = np.argsort(dm, axis=1)[:, : min(kq, len(members) - 1)]
        for row, j in enumerate(members):
            kk = min(k_pt[j], nn.shape[1])
            d[j, :kk] = dm[row, nn[row, :kk]]
            dr[j, :kk] = r[j] - r[members[nn[row, :kk]]]
    s = (np.nanmax(d) - np.nanmin(d)) / (r.max() - r.min())
    rho = np.sqrt(d ** 2 + (s * dr) ** 2)
    rho = np.sort(np.where(np.isnan(rho), np.inf, rho), axis=1)
    n_valid = np.isfinite(rho).sum(1)
    rho = np.minimum(rho / rho[np.isfinite(rho)].max(), delta)
    cap = np.where(n_valid > 0, rho[np.arange(len(x)), np.maximum(n_valid - 1, 0)], 0.0)
    return np.where(np.arange(kq)[None, :] < n_valid[:, None], rho, cap[:, None])


def ring_scan(n, seed, beams=64, r_lo=3.0, r_hi=60.0):
    """A 64-beam-like scan: random azimuths on the HDL-64E's elevations, random ranges."""
    rng = np.random.default_rng(seed)
    az = rng.uniform(0, 2 * np.pi, n)
    elev = np.deg2rad(np.linspace(2.0, -24.8, beams))[rng.integers(0, beams, n)]
    rr = rng.uniform(r_lo, r_hi, n)
    coord = np.stack([rr * np.cos(elev) * np.cos(az), rr * np.cos(elev) * np.sin(az), rr * np.sin(elev)], 1)
    return coord.astype(np.float32), rng.uniform(0, 1, n).astype(np.float32)


def awkward_cloud(seed):
    """Class-like RoIs plus the cases the azimuth bound finds hardest."""
    rng = np.random.default_rng(seed)
    coord = rng.uniform(-30, 30, (500, 3))
    coord[:, 2] *= 0.1
    roi = rng.integers(0, 4, 500)
    # uneven spacing: equidistant neighbours would make the k-th neighbour a tie (either is right)
    axis = np.stack([np.zeros(12), np.zeros(12), np.sort(rng.uniform(-2, 2, 12))], 1)  # on the sensor's axis
    line = np.stack([np.sort(rng.uniform(5, 40, 30)), np.zeros(30), np.zeros(30)], 1)  # one azimuth, many ranges
    tiny = rng.uniform(-10, 10, (1 + 2 + 3 + 11, 3))  # RoIs of 1, 2, 3 and k + 1 points
    coord = np.concatenate([coord, axis, line, tiny]).astype(np.float32)
    roi = np.concatenate([roi, np.full(12, 4), np.full(30, 5), [6], [7] * 2, [8] * 3, [9] * 11])
    return coord, roi.astype(np.int64)


def check_knn(coord, roi, k_pt, **kw):
    stats = {}
    idx, dist = azimuth_window_knn(torch.from_numpy(coord), torch.from_numpy(roi), torch.from_numpy(k_pt),
                                   stats=stats, **kw)
    idx, dist = idx.numpy(), dist.numpy()
    want = brute_knn(coord, roi, k_pt)
    col = np.arange(idx.shape[1])[None, :]
    mine = col < k_pt[:, None]
    got = np.where(mine, dist, np.inf)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    # the indices behind the distances: same RoI, never self, distance consistent
    ok = mine & (idx >= 0)
    assert np.array_equal(ok, mine & np.isfinite(want))
    rows = np.nonzero(ok)[0]
    nb = idx[ok]
    assert np.all(roi[nb] == roi[rows]) and np.all(nb != rows)
    x = coord.astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(x[nb] - x[rows], axis=1), dist[ok], rtol=1e-12)
    return stats["rounds"]


@pytest.mark.parametrize("seed", [0, 1])
def test_window_knn_equals_brute_force_on_rings(seed):
    coord, _ = ring_scan(4000, seed)
    ring = lidar_rings(coord)
    rng = np.linalg.norm(coord.astype(np.float64), axis=1)
    k_pt = np.where(rng < 20, 10, np.where(rng < 35, 7, 5)).astype(np.int64)
    rounds = check_knn(coord, ring, k_pt)
    # the bound is not vacuous: most ring queries are settled by the first window
    assert rounds[0] == (16, 4000) and (len(rounds) == 1 or rounds[1][1] < 0.5 * 4000)
    # a narrow first window forces several retry rounds, still exact
    rounds = check_knn(coord, ring, k_pt, window=2)
    assert len(rounds) >= 2 and rounds[0][0] == 5  # at least ceil(k/2) per side


@pytest.mark.parametrize("window", [1, 16])
def test_window_knn_equals_brute_force_on_awkward_rois(window):
    coord, roi = awkward_cloud(2)
    k_pt = np.random.default_rng(3).choice([10, 7, 5], len(coord)).astype(np.int64)
    rounds = check_knn(coord, roi, k_pt, window=window)
    assert len(rounds) >= 2  # the axis points and the line need wider windows
    # a sensor away from the origin: the azimuth centre moves, the answer must not
    check_knn(coord, roi, k_pt, window=window, origin=torch.tensor([3.0, -4.0, 1.0]))


def test_window_knn_small_blocks_and_many_rounds(monkeypatch):
    from threefold.geometry.rapid import window_knn

    monkeypatch.setitem(window_knn.PAIR_BUDGET, "cpu", 700)  # blocks of a few queries, no early jump
    coord, _ = ring_scan(3000, 3, beams=8)
    ring = lidar_rings(coord, 8)
    k_pt = np.random.default_rng(4).choice([10, 7, 5], len(coord)).astype(np.int64)
    rounds = check_knn(coord, ring, k_pt, window=1)
    assert len(rounds) >= 4, rounds


@pytest.mark.parametrize("whole_roi_pairs", [0, 1 << 30])
def test_window_knn_whole_roi_jump_threshold(whole_roi_pairs):
    """Exact whether the retries widen step by step to the largest RoI (0: never jump early, the CUDA
    default's path for large failed sets) or jump to whole-RoI windows at once (a huge threshold)."""
    coord, roi = awkward_cloud(5)
    k_pt = np.random.default_rng(6).choice([10, 7, 5], len(coord)).astype(np.int64)
    rounds = check_knn(coord, roi, k_pt, window=1, whole_roi_pairs=whole_roi_pairs)
    widths = [w for w, _ in rounds]
    if whole_roi_pairs == 0:  # 5 → 20 → 80 → ... → the largest RoI, each a WINDOW_GROWTH step
        assert len(rounds) >= 3 and all(b == min(4 * a, widths[-1]) for a, b in zip(widths, widths[1:])), rounds
    else:
        assert len(rounds) == 2 and widths[1] == max(np.bincount(roi)), rounds


def test_window_knn_negative_roi_and_sorted_order():
    """A negative RoI id: no neighbours, nobody's neighbour, the other points as if it were absent; and
    window_knn_sorted (the rows before the back-permutation, as RAPiD features use them) is the same search."""
    from threefold.geometry.rapid.window_knn import window_knn_sorted

    coord, roi = awkward_cloud(7)
    roi[::9] = -1
    roi[600:] = -3  # the tiny RoIs: several negative ids
    k_pt = np.random.default_rng(8).choice([10, 7, 5], len(coord)).astype(np.int64)
    rem = np.random.default_rng(9).uniform(0, 1, len(coord)).astype(np.float32)
    args = [torch.from_numpy(a) for a in (coord, roi, k_pt)]
    idx, dist = (t.numpy() for t in azimuth_window_knn(*args, window=2))
    none = roi < 0
    assert np.all(idx[none] == -1) and np.all(np.isinf(dist[none]))
    assert not np.isin(idx[idx >= 0], np.flatnonzero(none)).any()
    keep = np.flatnonzero(~none)
    want = brute_knn(coord[keep], roi[keep], k_pt[keep])
    mine = np.arange(idx.shape[1])[None, :] < k_pt[keep, None]
    np.testing.assert_allclose(np.where(mine, dist[keep], np.inf), want, rtol=1e-12, atol=1e-12)
    found = window_knn_sorted(*args, window=2, carry=torch.from_numpy(rem))
    order = found.order.numpy()
    assert np.array_equal(np.sort(order), np.arange(len(coord)))
    np.testing.assert_array_equal(found.dist.numpy(), dist[order])
    fin = np.isfinite(dist[order])
    np.testing.assert_array_equal(order[found.idx.numpy()][fin], idx[order][fin])
    assert found.carried.dtype == torch.float64 and np.array_equal(found.carried.numpy(), rem[order])
    sizes = np.bincount(roi[keep])[roi]
    np.testing.assert_array_equal(found.n_found.numpy(), np.where(none, 0, np.minimum(k_pt, sizes - 1))[order])


def test_window_features_synchronise_once_per_round():
    """On a GPU every synchronisation stalls the host's dispatch: the features' torch path synchronises
    only for the failed sets' sizes and the largest RoI's size, no unique / compaction / host-to-device
    copy (counted on the CPU as the operators that synchronise on CUDA)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from threefold.geometry.rapid import window_knn

    sync_ops = {"aten::nonzero", "aten::_local_scalar_dense", "aten::_unique2", "aten::unique_consecutive",
                "aten::masked_select", "aten::repeat_interleave"}

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.name())
            return func(*args, **(kwargs or {}))

    coord, roi = awkward_cloud(8)
    roi[:5] = -1
    rem = np.random.default_rng(10).uniform(0, 1, len(coord)).astype(np.float32)
    args = [torch.from_numpy(a) for a in (coord, rem, roi)]
    rapid_features(*args, search="window")  # constants cached on the device
    with Seen() as seen:
        rapid_features(*args, search="window")
    stats = {}
    rng = np.linalg.norm(coord.astype(np.float64), axis=1)
    k_pt = torch.from_numpy(np.where(rng < 20, 10, np.where(rng < 35, 7, 5)))
    window_knn.azimuth_window_knn(args[0], args[2], k_pt, stats=stats)
    syncs = [n for n in seen.names if n.split(".")[0] in sync_ops]
    assert syncs.count("aten::_local_scalar_dense") == 1, syncs
    assert syncs.count("aten::nonzero") == len(stats["rounds"]) - 1 and len(syncs) == len(stats["rounds"]), syncs
    # no tensor made from Python values (on CUDA a host-to-device copy, which synchronises)
    assert "aten::lift_fresh" not in seen.names


def test_window_knn_default_backend_is_torch_rounds():
    """backend='auto' picks the torch rounds on CUDA unless USE_TRITON is set (they measured faster)."""
    from threefold.geometry.rapid import window_knn

    assert window_knn.USE_TRITON is False


def _triton_device(kind: str) -> str:
    pytest.importorskip("triton")
    if kind == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("needs CUDA")
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton interpreter runs with TRITON_INTERPRET=1")
    return "cpu"


@pytest.mark.parametrize("kind", [pytest.param("cuda", marks=pytest.mark.gpu), "interpreter"])
def test_triton_rounds_equal_brute_force(kind, monkeypatch):
    """The Triton round kernel (geometry/rapid/window_triton.py): same neighbours as brute force, the
    same failed sets as the torch rounds, on CUDA or in Triton's CPU interpreter."""
    from threefold.geometry.rapid import window_knn

    device = _triton_device(kind)
    monkeypatch.setitem(window_knn.PAIR_BUDGET, device, 700)  # several rounds before whole-RoI windows
    monkeypatch.setitem(window_knn.WHOLE_ROI_PAIRS, device, 1400)  # (CUDA's default jumps at once)
    cases = [(ring_scan(2000, 5, beams=8)[0], None), awkward_cloud(6)]
    for coord, roi in cases:
        roi = lidar_rings(coord, 8) if roi is None else roi
        k_pt = np.random.default_rng(7).choice([10, 7, 5], len(coord)).astype(np.int64)
        want = brute_knn(coord, roi, k_pt)
        runs = {}
        for backend in ("triton", "torch"):
            stats = {}
            idx, dist = azimuth_window_knn(*(torch.from_numpy(a).to(device) for a in (coord, roi, k_pt)),
                                           window=2, stats=stats, backend=backend)
            idx, dist = idx.cpu().numpy(), dist.cpu().numpy()
            mine = np.arange(idx.shape[1])[None, :] < k_pt[:, None]
            np.testing.assert_allclose(np.where(mine, dist, np.inf), want, rtol=1e-12, atol=1e-12)
            ok = mine & (idx >= 0)
            rows, nb = np.nonzero(ok)[0], idx[ok]
            assert np.all(roi[nb] == roi[rows]) and np.all(nb != rows)
            runs[backend] = stats["rounds"]
        assert runs["triton"] == runs["torch"] and len(runs["torch"]) >= 3, runs


def test_window_features_equal_dense_reference():
    coord, rem = ring_scan(3000, 4)
    ring = lidar_rings(coord)
    want = brute_features(coord, rem, ring)
    got = rapid_features(*(torch.from_numpy(a) for a in (coord, rem, ring)), search="window")
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32 and got.shape == (3000, 10)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6)
    # NumPy in → NumPy out; the kd-tree path agrees
    got_np = rapid_features(coord, rem, ring, search="window")
    assert isinstance(got_np, np.ndarray)
    np.testing.assert_allclose(got_np, rapid_features(coord, rem, ring), atol=1e-6)


def test_window_features_class_rois_and_ignored_points():
    coord, roi = awkward_cloud(5)
    rem = np.random.default_rng(5).uniform(0, 1, len(coord)).astype(np.float32)
    want = brute_features(coord, rem, roi)
    roi_ign = roi.copy()
    got = rapid_features(torch.from_numpy(coord), torch.from_numpy(rem), torch.from_numpy(roi_ign), search="window")
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6)
    roi_ign[:7] = -1  # points without a RoI: zero rows, and the rest as the kd-tree path computes it
    got = rapid_features(torch.from_numpy(coord), torch.from_numpy(rem), torch.from_numpy(roi_ign), search="window")
    assert np.all(got.numpy()[:7] == 0)
    np.testing.assert_allclose(got.numpy(), rapid_features(coord, rem, roi_ign), atol=1e-6)


@pytest.mark.parametrize("options", [dict(d_range=(0.1, 5.0), r_range=(0.0, 2.0)), dict(normalize=False),
                                     dict(delta=None, k_max=12, origin=(1.0, 2.0, 0.5)),
                                     dict(k=(8, 6, 3), ranges=(10.0, 25.0))])
def test_window_options_equal_kdtree_path(options):
    # the kd-tree path is held to the loop reference with these options in test_rapid_features.py
    coord, roi = awkward_cloud(3)
    rem = np.random.default_rng(1).uniform(0, 1, len(coord)).astype(np.float32)
    roi[:9] = -1
    want = rapid_features(coord, rem, roi, **options)
    got = rapid_features(*(torch.from_numpy(a) for a in (coord, rem, roi)), search="window", **options)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6)


def test_window_c_rapid_rigid_invariance():
    coord, roi = awkward_cloud(6)
    rem = np.random.default_rng(6).uniform(0, 1, len(coord)).astype(np.float32)
    args = dict(search="window")
    base = rapid_features(coord, rem, roi, **args)
    cy, sy, cp, sp = np.cos(0.7), np.sin(0.7), np.cos(0.4), np.sin(0.4)
    rot = np.array([[cy, -sy, 0], [sy, cy, 0], [0, 0, 1]]) @ np.array([[cp, 0, sp], [0, 1, 0], [-sp, 0, cp]])
    t = np.array([-9.0, 4.0, 2.0])
    moved = (coord.astype(np.float64) @ rot.T + t).astype(np.float32)
    np.testing.assert_allclose(rapid_features(moved, rem, roi, origin=t, **args), base, atol=1e-5)


def test_search_names():
    coord, rem = ring_scan(50, 7)
    with pytest.raises(ConfigError, match="window"):
        rapid_features(coord, rem, lidar_rings(coord), search="grid")


def _real_scan(root, seq):
    path = root / "semantickitti" / "sequences" / seq / "velodyne" / "000000.bin"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    rec = np.fromfile(path, dtype="<f4").reshape(-1, 4)
    return rec[:, :3].copy(), rec[:, 3].copy(), path


def test_window_equals_kdtree_on_real_scans(test_data):
    coord, rem, _ = _real_scan(test_data, "00")
    ring = lidar_rings(coord)
    want = rapid_features(coord, rem, ring, workers=2)
    got = rapid_features(*(torch.from_numpy(a) for a in (coord, rem, ring)), search="window")
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6)
    # C-RAPiD on the labelled scan: 19 classes, most of them many points at each azimuth
    coord, rem, path = _real_scan(test_data, "99")
    label = np.fromfile(path.parents[1] / "labels" / "000000.label", dtype="<u4") & 0xFFFF
    cls = label.astype(np.int64)
    want = rapid_features(coord, rem, cls, workers=2)
    got = rapid_features(*(torch.from_numpy(a) for a in (coord, rem, cls)), search="window")
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6)


@pytest.mark.gpu
def test_cuda_window_equals_numpy_on_real_scan():
    """CUDA features (the default search on GPUs) against the NumPy kd-tree path on the real 64-beam
    scan ($THREEFOLD_TEST_DATA, kitti/sequences/00/velodyne/000000.bin or semantickitti/...), or a
    synthetic 120k-point ring scan when absent; R-RAPiD and C-RAPiD-style class RoIs; bounded memory."""
    root = Path(os.environ.get("THREEFOLD_TEST_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
    for rel in ("kitti/sequences/00/velodyne/000000.bin", "semantickitti/sequences/00/velodyne/000000.bin"):
        if (root / rel).is_file():
            rec = np.fromfile(root / rel, dtype="<f4").reshape(-1, 4)
            coord, rem = rec[:, :3].copy(), rec[:, 3].copy()
            break
    else:
        coord, rem = ring_scan(120_000, 8, r_hi=80.0)
    ring = lidar_rings(coord)
    cls = np.random.default_rng(9).integers(0, 19, len(coord))  # class-like RoIs spread over the scan
    for roi in (ring, cls):
        want = rapid_features(coord, rem, roi)  # NumPy, kd-tree
        args = [torch.from_numpy(a).cuda() for a in (coord, rem, roi)]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        got = rapid_features(*args)
        assert got.device.type == "cuda" and got.dtype == torch.float32
        np.testing.assert_allclose(got.cpu().numpy(), want, atol=1e-6)
        assert torch.cuda.max_memory_allocated() < 1 << 30  # pair blocks keep it bounded
