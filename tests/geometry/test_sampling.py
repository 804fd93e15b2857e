"""Exact farthest point sampling against a brute-force NumPy FPS."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import threefold.geometry.sampling as sampling
from threefold.datasets.errors import ConfigError, DataFormatError
from threefold.geometry.sampling import farthest_point_sampling, farthest_point_sampling_ragged


def _fps_numpy(points: np.ndarray, num: int, start: int) -> np.ndarray:
    """Textbook FPS; np.argmax returns the first (lowest) index among ties."""
    dmin = np.full(len(points), np.inf, dtype=points.dtype)
    out = [start]
    for _ in range(num - 1):
        dmin = np.minimum(dmin, ((points - points[out[-1]]) ** 2).sum(1))
        out.append(int(np.argmax(dmin)))
    return np.array(out)


@pytest.fixture(params=["dense", "bucketed"])
def strategy(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run each test through both strategies (they must give identical indices)."""
    monkeypatch.setattr(sampling, "BUCKETED_MIN_POINTS", 10**12 if request.param == "dense" else 1)
    monkeypatch.setattr(sampling, "LEAF_SIZE", 16)
    return request.param


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fps_batched_matches_numpy(strategy: str, dtype: type) -> None:
    rng = np.random.default_rng(0)
    pts = (rng.normal(size=(3, 1500, 3)) * [1.0, 3.0, 0.2]).astype(dtype)
    starts = np.array([0, 17, 1499])
    got = farthest_point_sampling(torch.from_numpy(pts), 200, start=torch.from_numpy(starts))
    assert got.shape == (3, 200) and got.dtype == torch.long
    for b in range(3):
        np.testing.assert_array_equal(got[b].numpy(), _fps_numpy(pts[b], 200, int(starts[b])))


def test_fps_ties_go_to_lowest_index(strategy: str) -> None:
    """A lattice with duplicated points: every distance ties many times over."""
    grid = np.stack(np.meshgrid(*[np.arange(6.0)] * 3, indexing="ij"), -1).reshape(-1, 3)
    pts = np.concatenate([grid, grid[::-1], grid[:50]]).astype(np.float32)
    rng = np.random.default_rng(1)
    pts = pts[rng.permutation(len(pts))]
    got = farthest_point_sampling(torch.from_numpy(pts), len(pts), start=5)
    np.testing.assert_array_equal(got.numpy(), _fps_numpy(pts, len(pts), 5))


def test_fps_clustered_cloud_and_all_points(strategy: str) -> None:
    rng = np.random.default_rng(2)
    pts = np.concatenate([rng.normal(size=(700, 3)) * 0.01, rng.normal(size=(100, 3)) * 10 + 50]).astype(np.float32)
    got = farthest_point_sampling(torch.from_numpy(pts), 800, start=3)
    np.testing.assert_array_equal(got.numpy(), _fps_numpy(pts, 800, 3))
    assert sorted(got.tolist()) == list(range(800))


def test_fps_ragged_matches_numpy_per_cloud(strategy: str) -> None:
    rng = np.random.default_rng(3)
    counts, samples, starts = [40, 1200, 1, 333], [40, 100, 1, 7], [39, 0, 0, 100]
    clouds = [rng.random((c, 3)).astype(np.float32) * (i + 1) for i, c in enumerate(counts)]
    got = farthest_point_sampling_ragged(
        torch.from_numpy(np.concatenate(clouds)),
        torch.tensor(np.cumsum(counts)),
        torch.tensor(np.cumsum(samples)),
        start=torch.tensor(starts),
    )
    begin = np.cumsum([0] + counts[:-1])
    want = np.concatenate([_fps_numpy(c, s, st) + o for c, s, st, o in zip(clouds, samples, starts, begin)])
    np.testing.assert_array_equal(got.numpy(), want)


def test_fps_unbatched_and_deterministic() -> None:
    pts = torch.rand(50_000, 3, generator=torch.Generator().manual_seed(4))
    a = farthest_point_sampling(pts, 64)
    assert a.shape == (64,) and a[0] == 0
    np.testing.assert_array_equal(a.numpy(), farthest_point_sampling(pts, 64).numpy())
    np.testing.assert_array_equal(a.numpy(), _fps_numpy(pts.numpy(), 64, 0))


def test_fps_rejects_bad_input() -> None:
    pts = torch.rand(2, 10, 3)
    with pytest.raises(ConfigError, match="num_samples=11"):
        farthest_point_sampling(pts, 11)
    with pytest.raises(ConfigError, match="start"):
        farthest_point_sampling(pts, 3, start=10)
    with pytest.raises(DataFormatError, match="floating"):
        farthest_point_sampling(torch.zeros(10, 3, dtype=torch.long), 3)
    with pytest.raises(DataFormatError, match="NaN"):
        farthest_point_sampling(torch.tensor([[0.0, 0, 0], [float("nan"), 0, 0]]), 2)
    with pytest.raises(DataFormatError, match="offset"):
        farthest_point_sampling_ragged(pts[0], torch.tensor([4, 9]), torch.tensor([2, 4]))
    with pytest.raises(ConfigError, match="at most its point count"):
        farthest_point_sampling_ragged(pts[0], torch.tensor([4, 10]), torch.tensor([5, 6]))


@pytest.mark.gpu
@pytest.mark.filterwarnings("error::RuntimeWarning")  # a Triton barrier timeout must fail, not fall back
@pytest.mark.parametrize("use_triton", [True, False])
def test_fps_cuda_matches_numpy(use_triton: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Large single cloud (many programs per cloud in the Triton kernel), batch, and ragged input."""
    monkeypatch.setattr(sampling, "USE_TRITON", use_triton)
    if use_triton:
        pytest.importorskip("triton")

        def no_fallback(*args: object) -> None:
            raise AssertionError("the Triton path fell back to the torch loop")

        monkeypatch.setattr(sampling, "_fps_dense", no_fallback)
    rng = np.random.default_rng(5)
    big = rng.random((60_000, 3)).astype(np.float32)
    got = farthest_point_sampling(torch.from_numpy(big).cuda(), 600, start=11)
    assert got.device.type == "cuda"
    np.testing.assert_array_equal(got.cpu().numpy(), _fps_numpy(big, 600, 11))

    batch = (rng.normal(size=(5, 9000, 3)) * [1.0, 2.0, 0.5]).astype(np.float32)
    starts = np.array([0, 1, 2, 3, 8999])
    got = farthest_point_sampling(torch.from_numpy(batch).cuda(), 300, start=torch.from_numpy(starts).cuda())
    for b in range(5):
        np.testing.assert_array_equal(got[b].cpu().numpy(), _fps_numpy(batch[b], 300, int(starts[b])))

    many = rng.random((200, 1000, 3)).astype(np.float32)  # more clouds than SMs: one program each
    got = farthest_point_sampling(torch.from_numpy(many).cuda(), 32)
    for b in (0, 77, 199):
        np.testing.assert_array_equal(got[b].cpu().numpy(), _fps_numpy(many[b], 32, 0))

    counts, samples = [7000, 30, 12_000], [200, 30, 250]
    clouds = [rng.random((c, 3)).astype(np.float32) for c in counts]
    got = farthest_point_sampling_ragged(
        torch.from_numpy(np.concatenate(clouds)).cuda(),
        torch.tensor(np.cumsum(counts)).cuda(),
        torch.tensor(np.cumsum(samples)).cuda(),
    )
    begin = np.cumsum([0] + counts[:-1])
    want = np.concatenate([_fps_numpy(c, s, 0) + o for c, s, o in zip(clouds, samples, begin)])
    np.testing.assert_array_equal(got.cpu().numpy(), want)
