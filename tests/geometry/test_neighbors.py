"""kNN, ball query, gather and patch grouping against brute-force NumPy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import threefold.geometry.neighbors as neighbors
from threefold.datasets.errors import ConfigError, DataFormatError
from threefold.geometry.neighbors import ball_query, group_patches, index_points, knn, knn_indices


@pytest.fixture(params=["grid", "dense"])
def search(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test through the grid search and through blocked brute force (small blocks)."""
    if request.param == "grid":
        monkeypatch.setattr(neighbors, "DENSE_MAX_PAIRS", 0)
        monkeypatch.setattr(neighbors, "GRID_MIN_REF", 0)
    else:
        monkeypatch.setattr(neighbors, "DENSE_MAX_PAIRS", 1 << 62)
    monkeypatch.setattr(neighbors, "BLOCK_ELEMENTS", 20_000)
    return request.param


def _knn_numpy(q: np.ndarray, r: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    d2 = ((q[:, None, :] - r[None, :, :]) ** 2).sum(-1)
    idx = np.argsort(d2, axis=1, kind="stable")[:, :k]
    return np.sqrt(np.take_along_axis(d2, idx, 1)), idx


def _ball_numpy(q: np.ndarray, r: np.ndarray, radius: float, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference loop transcribing the PointNet++ CUDA op query_ball_point."""
    idx = np.zeros((len(q), k), dtype=np.int64)
    count = np.zeros(len(q), dtype=np.int64)
    for i, p in enumerate(q):
        cnt = 0
        for j, s in enumerate(r):
            if ((p - s) ** 2).sum() < radius * radius:
                if cnt == 0:
                    idx[i, :] = j
                idx[i, cnt] = j
                cnt += 1
                if cnt == k:
                    break
        count[i] = cnt
    return idx, count


@pytest.mark.parametrize("dim", [3, 5])
def test_knn_matches_brute_force(search: str, dim: int) -> None:
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 300, dim))
    r = rng.normal(size=(2, 700, dim))
    dist, idx = knn(torch.from_numpy(q), torch.from_numpy(r), 16)
    assert idx.shape == (2, 300, 16) and idx.dtype == torch.long
    for b in range(2):
        want_d, want_i = _knn_numpy(q[b], r[b], 16)
        np.testing.assert_array_equal(idx[b].numpy(), want_i)
        np.testing.assert_allclose(dist[b].numpy(), want_d, rtol=1e-12)


def test_knn_unbatched_self_query_finds_itself_first(search: str) -> None:
    r = torch.rand(1000, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    dist, idx = knn(r, r, 4)
    np.testing.assert_array_equal(idx[:, 0].numpy(), np.arange(1000))
    assert (dist[:, 0] == 0).all()
    np.testing.assert_array_equal(idx.numpy(), _knn_numpy(r.numpy(), r.numpy(), 4)[1])


def test_knn_nonuniform_cloud_and_far_queries(search: str) -> None:
    """Clustered points and queries far outside the cloud exercise every search path."""
    rng = np.random.default_rng(2)
    r = np.concatenate([rng.normal(size=(1500, 3)) * 0.01, rng.normal(size=(300, 3)) * 5, [[40.0, 0, 0]]])
    q = np.concatenate([rng.normal(size=(200, 3)) * 3, [[100.0, 100, 100], [-50.0, 0, 0]]])
    _, idx = knn(torch.from_numpy(q), torch.from_numpy(r), 8)
    np.testing.assert_array_equal(idx.numpy(), _knn_numpy(q, r, 8)[1])


def test_knn_float32_distances_and_gradient() -> None:
    g = torch.Generator().manual_seed(3)
    q = torch.rand(1, 50, 3, dtype=torch.float64, generator=g).requires_grad_()
    r = torch.rand(1, 80, 3, dtype=torch.float64, generator=g).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: knn(a, b, 3)[0], (q, r))
    q32, r32 = q.detach().float(), r.detach().float()
    d32, _ = knn(q32, r32, 3)
    np.testing.assert_allclose(d32.numpy(), _knn_numpy(q32[0].double().numpy(), r32[0].double().numpy(), 3)[0][None], rtol=1e-5)


@pytest.mark.parametrize("dim", [3, 2])
def test_ball_query_matches_pointnet2_convention(search: str, dim: int) -> None:
    rng = np.random.default_rng(4)
    r = rng.random((2, 600, dim))
    q = np.concatenate([r[:, :40], rng.random((2, 40, dim)) * 3 - 1], axis=1)  # some balls empty
    idx, count = ball_query(torch.from_numpy(q), torch.from_numpy(r), 0.15, 12)
    for b in range(2):
        want_i, want_c = _ball_numpy(q[b], r[b], 0.15, 12)
        np.testing.assert_array_equal(count[b].numpy(), want_c)
        np.testing.assert_array_equal(idx[b].numpy(), want_i)
    assert (count == 0).any() and (count == 12).any() and ((count > 0) & (count < 12)).any()


def test_ball_query_on_a_lattice_at_the_cell_size(search: str) -> None:
    """Neighbours exactly one radius apart sit on cell boundaries of the grid search."""
    lattice = np.stack(np.meshgrid(*[np.arange(8) * 0.1] * 3, indexing="ij"), -1).reshape(-1, 3)
    for radius in (0.1, 0.1 + 1e-12, 0.1 * np.sqrt(2) + 1e-12):
        idx, count = ball_query(torch.from_numpy(lattice[::7]), torch.from_numpy(lattice), radius, 20)
        want_i, want_c = _ball_numpy(lattice[::7], lattice, radius, 20)
        np.testing.assert_array_equal(count.numpy(), want_c)
        np.testing.assert_array_equal(idx.numpy(), want_i)


def test_ball_query_k_larger_than_cloud(search: str) -> None:
    r = torch.tensor([[0.0, 0, 0], [0.1, 0, 0], [5.0, 0, 0]])
    idx, count = ball_query(r[:1], r, 1.0, 5)
    assert count.tolist() == [2]
    assert idx.tolist() == [[0, 1, 0, 0, 0]]


def test_index_points_and_group_patches(search: str) -> None:
    g = torch.Generator().manual_seed(5)
    pts = torch.rand(2, 400, 3, dtype=torch.float64, generator=g)
    feats = torch.rand(2, 400, 4, dtype=torch.float64, generator=g)
    centers = pts[:, :10]
    patches, idx = group_patches(pts, centers, 8, feats)
    assert patches.shape == (2, 10, 8, 7)
    for b in range(2):
        _, want = _knn_numpy(centers[b].numpy(), pts[b].numpy(), 8)
        np.testing.assert_array_equal(idx[b].numpy(), want)
        np.testing.assert_allclose(patches[b, ..., :3].numpy(), pts[b].numpy()[want] - centers[b].numpy()[:, None])
        np.testing.assert_array_equal(patches[b, ..., 3:].numpy(), feats[b].numpy()[want])
    assert (patches[..., 0, :3] == 0).all()  # each centre is its own nearest point
    np.testing.assert_array_equal(index_points(pts[0], idx[0]).numpy(), pts[0].numpy()[idx[0].numpy()])


def test_neighbors_reject_bad_input() -> None:
    x = torch.zeros(2, 10, 3)
    with pytest.raises(ConfigError, match="k=11"):
        knn_indices(x, x, 11)
    with pytest.raises(DataFormatError, match="batch size"):
        knn(x, torch.zeros(3, 10, 3), 1)
    with pytest.raises(DataFormatError, match="same floating dtype"):
        knn(x, x.double(), 1)
    with pytest.raises(DataFormatError, match="NaN"):
        knn(x, torch.full((2, 10, 3), float("nan")), 1)
    with pytest.raises(ConfigError, match="radius"):
        ball_query(x, x, 0.0, 4)
    with pytest.raises(DataFormatError, match="int64"):
        index_points(x, torch.zeros(2, 3, dtype=torch.int32))


@pytest.mark.gpu
def test_knn_and_ball_query_cuda_match_cpu() -> None:
    g = torch.Generator().manual_seed(6)
    pts = torch.rand(2, 30_000, 3, dtype=torch.float64, generator=g)
    q = pts[:, :2000]
    idx_cpu = knn_indices(q, pts, 16)
    idx_gpu = knn_indices(q.cuda(), pts.cuda(), 16)
    assert idx_gpu.device.type == "cuda"
    np.testing.assert_array_equal(idx_gpu.cpu().numpy(), idx_cpu.numpy())
    ball_cpu = ball_query(q, pts, 0.03, 32)
    ball_gpu = ball_query(q.cuda(), pts.cuda(), 0.03, 32)
    for a, b in zip(ball_gpu, ball_cpu):
        np.testing.assert_array_equal(a.cpu().numpy(), b.numpy())


@pytest.mark.gpu
@pytest.mark.parametrize("use_triton", [True, False])
def test_knn_cuda_float32_matches_brute_force(use_triton: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """float32 on CUDA (the Triton candidate scan when available) against CPU brute force."""
    monkeypatch.setattr(neighbors, "USE_TRITON", use_triton)
    if use_triton:
        pytest.importorskip("triton")

        def no_torch_scan(*args: object) -> None:
            raise AssertionError("the Triton scan was not used")

        monkeypatch.setattr(neighbors._Grid, "candidates", no_torch_scan)
    g = torch.Generator().manual_seed(7)
    pts = torch.cat([torch.rand(40_000, 3, generator=g), torch.randn(2000, 3, generator=g) * 0.01 + 2])
    q = pts[::20]
    d_gpu, i_gpu = knn(q.cuda(), pts.cuda(), 16)
    i_ref = neighbors._dense_knn_idx(q[None], pts[None], 16)[0]
    d_ref = (pts[i_ref] - q[:, None]).square().sum(-1).sqrt()
    # Equal distances may swap indices; the distances themselves agree to float32 rounding.
    np.testing.assert_allclose(d_gpu.cpu().numpy(), d_ref.numpy(), rtol=1e-6)
    assert (i_gpu.cpu() == i_ref).float().mean() > 0.999
