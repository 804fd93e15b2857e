"""Benchmark of R-RAPiD features (ring RoIs, k = 10/7/5 at 20/35 m, δ = 0.9) on one 64-beam scan;
prints a markdown table.

    python benchmarks/rapid_features.py                           # CPU, the real scan from the test data
    python benchmarks/rapid_features.py --device cuda --data SCAN.bin
    python benchmarks/rapid_features.py --workers 2 --repeats 7

Input: ``--data`` (a SemanticKITTI ``.bin``; default ``$THREEFOLD_TEST_DATA/semantickitti/sequences/00/
velodyne/000000.bin``, 124,668 points), or, when absent, a NumPy-generated 120,000-point ring-structured
cloud (64 beams x 1,875 azimuths, random ranges 3-80 m, seed 0) — no open3d needed.

Implementations, timed in the same process on the same points and rings:

* ours, NumPy: one scipy ``cKDTree`` per ring, rings spread over ``workers`` threads;
* peer: the vectorised scipy implementation the issue names — one ``cKDTree`` per ring, each queried
  for k_max + 1 with ``workers`` threads, then the same vectorised row operations (written here);
* per-point loop: one NumPy distance pass per point over its ring, timed on ``--loop-points`` points
  and extrapolated linearly to the whole scan (marked "extrapolated");
* ours, window (``--device cpu`` or ``cuda``; the default search on GPUs): points sorted by (ring,
  azimuth), a fixed window of candidates per query in one batched pass, exact by an azimuth-gap bound,
  wider retries where it fails (geometry/rapid/window_knn.py); the rounds are printed. On CUDA the
  torch rounds are the default (faster on an H100: 5.2 vs 9.5 ms); with Triton installed the rounds as
  one Triton kernel each (geometry/rapid/window_triton.py, ``backend="triton"``) are timed too;
* ours, torch cdist: the previous exhaustive search, blocked ``torch.cdist`` + ``topk`` in RoI batches
  (``--no-cdist`` skips it).

With ``--device cuda`` the peak CUDA memory of one window-search call is printed.

``--sweep-first-window 12 16 24 32`` (torch rounds, any device) prints one timed row per first-window
width, with its rounds and its largest difference from the default's rows (the search is exact, so 0);
``--sweep-whole-roi-pairs`` does the same for :data:`~threefold.geometry.rapid.window_knn.WHOLE_ROI_PAIRS`
(the size at which the remaining queries jump to whole-RoI windows) at the default first window.

Each time is the median (and the minimum, the figure least disturbed by other processes on a shared
machine; the load average is printed) of ``--repeats`` runs after one warm-up (CUDA: synchronised). Ratio = time /
ours-NumPy time on CPU (or / ours-torch on CUDA); "max |Δ|" compares each output with ours.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from threefold.geometry.rapid.features import lidar_rings, rapid_features

K, RANGES, DELTA = (10, 7, 5), (20.0, 35.0), 0.9


def _machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}"
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ", load avg %.1f" % os.getloadavg()[0] if hasattr(os, "getloadavg") else ""
    return f"{model}, {os.cpu_count()} logical cores{load}"


def _load(path: Path | None) -> tuple[np.ndarray, np.ndarray, str]:
    if path is not None and path.is_file():
        rec = np.fromfile(path, dtype="<f4").reshape(-1, 4)
        return rec[:, :3].copy(), rec[:, 3].copy(), f"{path} ({len(rec):,} points)"
    rng = np.random.default_rng(0)
    elev = np.deg2rad(np.linspace(2.0, -24.8, 64))[:, None]
    az = np.linspace(0, 2 * np.pi, 1875, endpoint=False)[None, :] + rng.normal(0, 1e-4, (64, 1875))
    r = rng.uniform(3, 80, (64, 1875))
    xyz = np.stack([r * np.cos(elev) * np.cos(az), r * np.cos(elev) * np.sin(az), r * np.sin(elev)], -1)
    return xyz.reshape(-1, 3).astype(np.float32), rng.uniform(0, 1, 64 * 1875).astype(np.float32), \
        "random ring-structured cloud (120,000 points, seed 0; --data absent)"


def _rows(d: np.ndarray, dr: np.ndarray, k_pt: np.ndarray, r_span: float) -> np.ndarray:
    """Peer's row operations: the same definition, written independently."""
    col = np.arange(d.shape[1])[None, :]
    valid = (col < k_pt[:, None]) & np.isfinite(d)
    dv = d[valid]
    s = (dv.max() - dv.min()) / r_span
    rho = np.where(valid, np.sqrt(d ** 2 + (s * dr) ** 2), np.inf)
    rho.sort(axis=1)
    nv = valid.sum(1)
    top = rho[np.isfinite(rho)].max()
    rho = np.minimum(rho / top, DELTA)
    cap = np.where(nv > 0, rho[np.arange(len(rho)), np.maximum(nv - 1, 0)], 0.0)
    return np.where(col < nv[:, None], rho, cap[:, None]).astype(np.float32)


def peer_per_ring(coord: np.ndarray, rem: np.ndarray, ring: np.ndarray, workers: int) -> np.ndarray:
    from scipy.spatial import cKDTree

    x = coord.astype(np.float64)
    n, kq = len(x), max(K)
    idx = np.full((n, kq), -1)
    dist = np.full((n, kq), np.inf)
    for g in np.unique(ring):
        members = np.flatnonzero(ring == g)
        kk = min(kq + 1, len(members))
        d, i = cKDTree(x[members]).query(x[members], k=kk, workers=workers)
        d, i = d.reshape(len(members), kk)[:, 1:], i.reshape(len(members), kk)[:, 1:]
        idx[members, : kk - 1] = members[i]
        dist[members, : kk - 1] = d
    rng = np.linalg.norm(x, axis=1)
    k_pt = np.where(rng < RANGES[0], K[0], np.where(rng < RANGES[1], K[1], K[2]))
    dr = rem[:, None].astype(np.float64) - rem[np.maximum(idx, 0)]
    return _rows(dist, dr, k_pt, float(rem.max() - rem.min()))


def loop_per_point(coord: np.ndarray, rem: np.ndarray, ring: np.ndarray, points: np.ndarray) -> list[np.ndarray]:
    """The per-point loop of a direct implementation (neighbour rows only; the frame-wide normalisation
    needs every row, so only the search and 4D distances are timed)."""
    x = coord.astype(np.float64)
    members = {g: np.flatnonzero(ring == g) for g in np.unique(ring)}
    rows = []
    for j in points:
        m = members[ring[j]]
        d = np.linalg.norm(x[m] - x[j], axis=1)
        d[m == j] = np.inf
        kj = K[0] if np.linalg.norm(x[j]) < RANGES[0] else (K[1] if np.linalg.norm(x[j]) < RANGES[1] else K[2])
        nn = np.argsort(d)[:kj]
        rows.append(np.sort(np.sqrt(d[nn] ** 2 + (rem[j] - rem[m[nn]]) ** 2)))
    return rows


_MIN: dict[int, float] = {}  # id of a result's median → its minimum, for the table


def _time(fn: Callable[[], object], repeats: int, cuda: bool = False) -> tuple[float, float, object]:
    """Median wall time, median process CPU time (all threads) and the output; the minimum wall time
    goes to ``_MIN`` keyed by the median's value. Warm-up: calls for at least 0.5 s (and 3 calls) before
    timing, so a GPU's clocks and the allocator's cache have settled whatever ran before (a single warm-up
    call left the first timed row up to 35 % slower than the same configuration timed later)."""
    out, t_end, n = fn(), time.perf_counter() + 0.5, 1
    while n < 3 or time.perf_counter() < t_end:
        out, n = fn(), n + 1
    times, cpu = [], []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    med = statistics.median(times)
    _MIN[med] = min(times)
    return med, statistics.median(cpu), out


def _count_ops(fn: Callable[[], object]) -> int:
    """Operators dispatched by ``fn``, views excluded: on a GPU each is a kernel launch (or host work),
    which bounds a launch-bound search from below."""
    from torch.utils._python_dispatch import TorchDispatchMode

    views = {torch.ops.aten.unsqueeze.default, torch.ops.aten.slice.Tensor, torch.ops.aten.select.int,
             torch.ops.aten.squeeze.dim, torch.ops.aten.lift_fresh.default, torch.ops.aten.unbind.int,
             torch.ops.aten.view.default, torch.ops.aten.expand.default, torch.ops.aten.alias.default,
             torch.ops.aten.t.default, torch.ops.aten.detach.default, torch.ops.aten.transpose.int}

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            Count.n += func not in views
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def _count_syncs(fn: Callable[[], object]) -> int:
    """Host synchronisations of ``fn`` on CUDA, as torch's sync debug mode reports them (each a warning):
    nonzero, .item(), host-to-device copies of Python values, ...; a synchronisation stalls the host's
    dispatch until the GPU has drained its queue."""
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in seen)


def sweep(on_dev: list[torch.Tensor], args: argparse.Namespace, x: torch.Tensor, k_pt: torch.Tensor) -> None:
    """One timed row per first window (``--sweep-first-window``) and per whole-RoI jump threshold
    (``--sweep-whole-roi-pairs``), torch rounds; "max |Δ|" against the defaults' rows (exact: 0)."""
    from threefold.geometry.rapid import window_knn

    dev = args.device
    window_knn.USE_TRITON = False
    default_w, default_pairs = window_knn.WINDOW, dict(window_knn.WHOLE_ROI_PAIRS)
    ref = rapid_features(*on_dev, search="window")
    ring = on_dev[2]
    cases = [(w, None) for w in args.sweep_first_window] + [(default_w, p) for p in args.sweep_whole_roi_pairs]
    print(f"\nsweep, torch rounds on {dev} (defaults: first window {default_w}, whole-RoI jump at "
          f"{default_pairs.get(dev, 'two blocks')} pairs):")
    print("| first window | whole-RoI jump (pairs) | wall time per scan (median) | min | rounds (window, queries) | max abs diff vs default |")
    print("|---:|---:|---:|---:|---|---:|")
    try:
        for w, pairs in cases:
            window_knn.WINDOW = w
            if pairs is not None:
                window_knn.WHOLE_ROI_PAIRS[dev] = pairs
            t, _, got = _time(lambda: rapid_features(*on_dev, search="window"), args.repeats, cuda=dev == "cuda")
            stats: dict = {}
            window_knn.azimuth_window_knn(x, ring, k_pt, stats=stats)
            rounds = " → ".join(f"({rw}, {q:,})" for rw, q in stats["rounds"])
            jump = default_pairs.get(dev, "two blocks") if pairs is None else pairs
            diff = (got - ref).abs().max().item()
            print(f"| {w} | {jump} | {t * 1e3:.2f} ms | {_MIN[t] * 1e3:.2f} ms | {rounds} | {diff:.1e} |")
    finally:
        window_knn.WINDOW = default_w
        window_knn.WHOLE_ROI_PAIRS.clear()
        window_knn.WHOLE_ROI_PAIRS.update(default_pairs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = Path(os.environ.get("THREEFOLD_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--data", type=Path, default=default / "semantickitti/sequences/00/velodyne/000000.bin")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="kd-tree threads (ours and peer)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--loop-points", type=int, default=2000)
    ap.add_argument("--torch-threads", type=int, default=None)
    ap.add_argument("--no-cdist", action="store_true", help="skip the slow exhaustive torch search")
    ap.add_argument("--sweep-first-window", type=int, nargs="*", default=[], metavar="W",
                    help="time the torch rounds once per first window W (candidates per side)")
    ap.add_argument("--sweep-whole-roi-pairs", type=int, nargs="*", default=[], metavar="P",
                    help="time the torch rounds once per whole-RoI jump threshold P (query, candidate pairs)")
    args = ap.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    coord, rem, what = _load(args.data)
    ring = lidar_rings(coord)
    n = len(coord)
    try:
        import scipy

        scipy_version = scipy.__version__
    except ImportError:  # the GPU machine may lack scipy: CUDA timing only
        scipy_version = "absent"

    print(f"input: {what}")
    print(f"machine: {_machine(args.device)}")
    print(f"versions: python {platform.python_version()}, numpy {np.__version__}, scipy {scipy_version}, "
          f"torch {torch.__version__} (threads {torch.get_num_threads()}), kd-tree workers {args.workers}")
    results: list[tuple[str, float, float | None, str, float | None]] = []

    if args.device == "cpu":
        t_ours, c_ours, ours = _time(lambda: rapid_features(coord, rem, ring, workers=args.workers), args.repeats)
        results.append(("ours, NumPy (cKDTree per RoI, threads over RoIs)", t_ours, c_ours, "", 0.0))
        t_peer, c_peer, peer = _time(lambda: peer_per_ring(coord, rem, ring, args.workers), args.repeats)
        results.append(("peer: scipy cKDTree per ring, workers per query", t_peer, c_peer, "",
                        float(np.abs(peer - ours).max())))
        pts = np.random.default_rng(1).choice(n, min(args.loop_points, n), replace=False)
        t0, c0 = time.perf_counter(), time.process_time()
        loop_per_point(coord, rem, ring, pts)
        t_loop = (time.perf_counter() - t0) * n / len(pts)
        c_loop = (time.process_time() - c0) * n / len(pts)
        results.append((f"per-point loop (NumPy per point, {len(pts):,} points)", t_loop, c_loop, "extrapolated", None))
        tc = [torch.from_numpy(a) for a in (coord, rem, ring)]
        t_win, c_win, got = _time(lambda: rapid_features(*tc, search="window"), args.repeats)
        results.append(("ours, torch CPU (azimuth window)", t_win, c_win, "",
                        float(np.abs(got.numpy() - ours).max())))
        if not args.no_cdist:
            t_torch, c_torch, got = _time(lambda: rapid_features(*tc, search="cdist"), max(1, args.repeats // 3))
            results.append(("ours, torch CPU (blocked cdist + topk)", t_torch, c_torch, "",
                            float(np.abs(got.numpy() - ours).max())))
        base = t_ours
    else:
        from threefold.geometry.rapid import window_knn

        c, r, g = (torch.from_numpy(a).cuda() for a in (coord, rem, ring))
        ref = None
        try:
            ref = rapid_features(coord, rem, ring, workers=args.workers)
        except ImportError:  # no scipy on the GPU machine: no CPU reference
            pass
        triton_ok = window_knn._triton_round() is not None
        # the default (torch rounds), then the Triton rounds where Triton is installed
        for use_triton in ([False, True] if triton_ok else [False]):
            window_knn.USE_TRITON = use_triton
            t_gpu, _, got = _time(lambda: rapid_features(c, r, g, search="window"), args.repeats, cuda=True)
            label = "Triton rounds" if window_knn.USE_TRITON else "torch rounds"  # (a failed Triton falls back)
            results.append((f"ours, CUDA azimuth window ({label})", t_gpu, None, "",
                            float(np.abs(got.cpu().numpy() - ref).max()) if ref is not None else None))
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            rapid_features(c, r, g, search="window")
            print(f"peak CUDA memory (window search, {label}): {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
        window_knn.USE_TRITON = False
        t_gpu = results[0][1]
        if not args.no_cdist:
            t_cd, _, got_cd = _time(lambda: rapid_features(c, r, g, search="cdist"), max(1, args.repeats // 3),
                                    cuda=True)
            results.append(("ours, torch CUDA (blocked cdist + topk, previous)", t_cd, None, "",
                            float(np.abs(got_cd.cpu().numpy() - ref).max()) if ref is not None else None))
        if ref is not None:
            t_np, c_np, _ = _time(lambda: rapid_features(coord, rem, ring, workers=args.workers), args.repeats)
            results.append(("ours, NumPy on this host's CPU", t_np, c_np, "", 0.0))
            t_peer, c_peer, _ = _time(lambda: peer_per_ring(coord, rem, ring, args.workers), args.repeats)
            results.append(("peer: scipy cKDTree per ring, this host's CPU", t_peer, c_peer, "", None))
        base = t_gpu

    from threefold.geometry.rapid.window_knn import WINDOW, azimuth_window_knn

    stats: dict = {}
    x = torch.from_numpy(coord).to(args.device)
    rng = torch.linalg.vector_norm(x.double(), dim=1)
    k_pt = torch.where(rng < RANGES[0], K[0], torch.where(rng < RANGES[1], K[1], K[2]))
    azimuth_window_knn(x, torch.from_numpy(ring).to(args.device), k_pt, stats=stats)
    from threefold.geometry.rapid import window_knn

    on_dev = [torch.from_numpy(a).to(args.device) for a in (coord, rem, ring)]
    counts = []
    for use_triton in (False, True) if args.device == "cuda" and window_knn._triton_round() else (False,):
        window_knn.USE_TRITON = use_triton
        counts.append(f"{_count_ops(lambda: rapid_features(*on_dev, search='window'))} with "
                      f"{'Triton' if use_triton else 'torch'} rounds")
    window_knn.USE_TRITON = False
    if args.device == "cpu":  # the CUDA block sizes applied to the CPU tensors: the GPU's op count, counted here
        saved = window_knn.PAIR_BUDGET["cpu"], window_knn.WHOLE_ROI_PAIRS.get("cpu")
        window_knn.PAIR_BUDGET["cpu"] = window_knn.PAIR_BUDGET["cuda"]
        window_knn.WHOLE_ROI_PAIRS["cpu"] = window_knn.WHOLE_ROI_PAIRS["cuda"]
        try:
            counts.append(f"{_count_ops(lambda: rapid_features(*on_dev, search='window'))} at the CUDA block sizes")
        finally:
            window_knn.PAIR_BUDGET["cpu"] = saved[0]
            if saved[1] is None:
                window_knn.WHOLE_ROI_PAIRS.pop("cpu")
            else:
                window_knn.WHOLE_ROI_PAIRS["cpu"] = saved[1]
    print(f"torch ops dispatched per call (window search, {args.device}): {', '.join(counts)} (on a GPU each a "
          "kernel launch or host work; a Triton kernel launch is not counted)")
    if args.device == "cuda":
        print(f"host synchronisations per call (window search, torch rounds; CUDA sync debug mode): "
              f"{_count_syncs(lambda: rapid_features(*on_dev, search='window'))}")
    print("window search rounds (candidates per side, queries): "
          + ", ".join(f"({w}, {q:,})" for w, q in stats["rounds"]) + f"; first window {WINDOW}")
    print()
    print("| implementation | wall time per scan (median) | min | CPU time (all threads) | points/s (wall) |"
          " wall ratio to ours | max abs diff vs ours |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, t, cpu_t, note, diff in results:
        ms = f"{t * 1e3:.1f} ms" + (f" ({note})" if note else "")
        ms += f" | {_MIN[t] * 1e3:.1f} ms" if t in _MIN else " | —"
        ctxt = "—" if cpu_t is None else f"{cpu_t * 1e3:.0f} ms"
        dtxt = "—" if diff is None else f"{diff:.1e}"
        print(f"| {name} | {ms} | {ctxt} | {n / t:,.0f} | {t / base:.2f} | {dtxt} |")
    if args.sweep_first_window or args.sweep_whole_roi_pairs:
        sweep(on_dev, args, x, k_pt)
    if hasattr(os, "getloadavg"):
        print("\nload average after the runs (1, 5, 15 min): %.2f %.2f %.2f" % os.getloadavg())


if __name__ == "__main__":
    main()
