"""Benchmark of threefold's point ops against their strongest peers; prints a markdown table.

    python benchmarks/pointops.py                  # CPU, and CUDA when available
    python benchmarks/pointops.py --device cuda    # one device only
    python benchmarks/pointops.py --quick          # small sizes only (smoke run)
    python benchmarks/pointops.py --threads 1      # pin torch's CPU threads (shared machines)

Workloads (issue #4 §1): exact farthest point sampling (FPS) 1k -> 256, 8,192 -> 1,024 and
100k -> 4,096; kNN with k = 16 on 1k, 10k and 120k uniform random points (self query).

Peers, timed in the same process:
* FPS: the iterative torch loop of the PyTorch PointNet++ ports (one full distance pass per
  sample), ``fpsample.fps_sampling`` (exact, C++; ``pip install fpsample``, CPU only) and
  ``fpsample.bucket_fps_kdline_sampling`` with h = 7 (exact FPS but from its own start point, so
  its indices are not comparable).
* FPS on CUDA also times threefold's own pure-torch fallback (``USE_TRITON = False``).
* kNN: ``scipy.spatial.cKDTree`` build + query with ``workers=-1`` (CPU), and blocked
  ``torch.cdist`` + ``topk`` (CPU up to 10k points, CUDA at every size).

Each time is the median of ``--repeats`` runs after one warm-up; "ratio" is peer time / our time
(> 1: ours is faster). "same" says whether the peer returned exactly our indices.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

import threefold.geometry.sampling as sampling
from threefold.geometry.neighbors import knn_indices
from threefold.geometry.sampling import farthest_point_sampling


def _machine(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}"


def _time(fn: Callable[[], object], device: str, repeats: int) -> tuple[float, object]:
    out = fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def fps_torch_loop(xyz: torch.Tensor, num: int) -> torch.Tensor:
    """The FPS loop of the PyTorch PointNet++ ports (start at index 0), the usual pure-torch baseline."""
    b, n, _ = xyz.shape
    centroids = torch.zeros(b, num, dtype=torch.long, device=xyz.device)
    distance = torch.full((b, n), float("inf"), dtype=xyz.dtype, device=xyz.device)
    farthest = torch.zeros(b, dtype=torch.long, device=xyz.device)
    batch = torch.arange(b, device=xyz.device)
    for i in range(num):
        centroids[:, i] = farthest
        centroid = xyz[batch, farthest].view(b, 1, 3)
        distance = torch.minimum(distance, ((xyz - centroid) ** 2).sum(-1))
        farthest = distance.argmax(-1)
    return centroids


def knn_cdist_topk(x: torch.Tensor, k: int, block: int = 4096) -> torch.Tensor:
    """Blocked ``torch.cdist`` + ``topk``, the usual pure-torch kNN baseline."""
    return torch.cat([torch.cdist(x[s : s + block], x).topk(k, largest=False).indices for s in range(0, len(x), block)])


def run(devices: list[str], repeats: int, quick: bool) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    try:
        import fpsample  # optional peer, CPU only
    except ImportError:
        fpsample = None
    fps_cases = [(1024, 256), (8192, 1024)] + ([] if quick else [(100_000, 4096)])
    knn_cases = [1024, 10_000] + ([] if quick else [120_000])
    rng = np.random.default_rng(0)
    for device in devices:
        for n, s in fps_cases:
            pts_np = rng.random((n, 3), dtype=np.float32)
            pts = torch.from_numpy(pts_np).to(device)
            task = f"FPS {n:,} -> {s:,}"
            ours_t, ours = _time(lambda: farthest_point_sampling(pts, s), device, repeats)
            ours_np = ours.cpu().numpy()
            rows.append(dict(task=task, impl="threefold farthest_point_sampling", device=device, t=ours_t, ref=ours_t, same="—"))
            if device == "cuda":
                sampling.USE_TRITON = False
                t, idx = _time(lambda: farthest_point_sampling(pts, s), device, repeats)
                sampling.USE_TRITON = True
                rows.append(dict(task=task, impl="threefold, pure-torch path (no Triton)", device=device, t=t, ref=ours_t, same=bool((idx.cpu().numpy() == ours_np).all())))
            loop_reps = 1 if n >= 100_000 and device == "cpu" else repeats
            t, idx = _time(lambda: fps_torch_loop(pts[None], s), device, loop_reps)
            rows.append(dict(task=task, impl="iterative torch loop", device=device, t=t, ref=ours_t, same=bool((idx[0].cpu().numpy() == ours_np).all())))
            if fpsample is not None and device == "cpu":
                t, idx = _time(lambda: fpsample.fps_sampling(pts_np, s, start_idx=0), device, repeats)
                rows.append(dict(task=task, impl="fpsample.fps_sampling", device=device, t=t, ref=ours_t, same=bool((idx == ours_np).all())))
                t, _ = _time(lambda: fpsample.bucket_fps_kdline_sampling(pts_np, s, h=7), device, repeats)
                rows.append(dict(task=task, impl="fpsample.bucket_fps_kdline_sampling h=7 (own start)", device=device, t=t, ref=ours_t, same="n/a"))
        for n in knn_cases:
            pts_np = rng.random((n, 3), dtype=np.float32)
            pts = torch.from_numpy(pts_np).to(device)
            task = f"kNN k=16, {n:,} points"
            ours_t, ours = _time(lambda: knn_indices(pts, pts, 16), device, repeats)
            ours_np = ours.cpu().numpy()
            rows.append(dict(task=task, impl="threefold knn_indices", device=device, t=ours_t, ref=ours_t, same="—"))
            if device == "cpu":
                from scipy.spatial import cKDTree

                t, (_, idx) = _time(lambda: cKDTree(pts_np).query(pts_np, 16, workers=-1), device, repeats)
                rows.append(dict(task=task, impl="scipy cKDTree build+query, workers=-1", device=device, t=t, ref=ours_t, same=bool((idx == ours_np).all())))
            if device == "cuda" or n <= 10_000:
                t, idx = _time(lambda: knn_cdist_topk(pts, 16), device, repeats)
                # cdist's matrix-product distances reorder near ties, so compare neighbour sets.
                same = bool((np.sort(idx.cpu().numpy(), 1) == np.sort(ours_np, 1)).mean() > 0.999)
                rows.append(dict(task=task, impl="blocked torch.cdist + topk", device=device, t=t, ref=ours_t, same=same))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if not torch.cuda.is_available():
        devices = [d for d in devices if d != "cuda"]
    rows = run(devices, args.repeats, args.quick)
    try:
        import fpsample

        fps_version = getattr(fpsample, "__version__", "installed")
    except ImportError:
        fps_version = "not installed"
    import scipy

    print(f"torch {torch.__version__}, numpy {np.__version__}, scipy {scipy.__version__}, fpsample {fps_version}")
    for device in devices:
        print(f"\n{device}: {_machine(device)}\n")
        print("| task | implementation | time (ms) | ratio (peer / ours) | same indices |")
        print("| --- | --- | ---: | ---: | --- |")
        for row in rows:
            if row["device"] == device:
                ratio = row["t"] / row["ref"]
                print(f"| {row['task']} | {row['impl']} | {row['t'] * 1e3:.1f} | {ratio:.2f} | {row['same']} |")


if __name__ == "__main__":
    main()
