"""Where the CUDA RAPiD feature time of one scan goes (issue #3 §6): wall time per scan, three timings
of 100 calls after one second of warm-up (each call synchronised), then torch.profiler tables of five
calls by kernel (device) time and by host time — whether the path is bound by kernels or by dispatch.

    python benchmarks/rapid_features_profile.py --data <scan.bin>      # a SemanticKITTI velodyne scan

Output of 2026-11-26 on an H100: docs/gpu-runs/2026-11-26-h100-rapid-features-profile.txt (it found the
float64 ``cummax`` of the row padding at 1.3 ms per scan, a quarter of the kernel time, and that a row
sort in place of ``topk`` is a 1.6 ms radix sort). ``benchmarks/rapid_features.py`` compares with peers.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from threefold.datasets.semantickitti import lidar_rings, read_scan
from threefold.geometry.rapid.features import rapid_features


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="a velodyne .bin scan")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--calls", type=int, default=100)
    args = ap.parse_args()
    scan = read_scan(args.data)
    coord, rem = scan["coord"], scan["remission"]
    ring = np.asarray(lidar_rings(coord, 64))
    dev = torch.device(args.device)
    c, r, g = (torch.from_numpy(np.ascontiguousarray(a)).to(dev) for a in (coord, rem, ring))
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def call() -> None:
        rapid_features(c, r, g, search="window")

    t_end = time.perf_counter() + 1.0
    while time.perf_counter() < t_end:
        call()
    print(f"{len(coord):,} points on {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'CPU'}, torch {torch.__version__}")
    for repeat in range(1, 4):
        times = []
        for _ in range(args.calls):
            sync()
            t0 = time.perf_counter()
            call()
            sync()
            times.append(time.perf_counter() - t0)
        print(f"repeat {repeat}: wall per scan: median {np.median(times) * 1e3:.2f} ms, min {min(times) * 1e3:.2f} ms", flush=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(5):
            call()
        sync()
    ka = prof.key_averages()
    print(f"sum of kernel (device) time per scan: {sum(e.self_device_time_total for e in ka) / 5 / 1e3:.2f} ms")
    if dev.type == "cuda":
        print(ka.table(sort_by="self_device_time_total", row_limit=18, max_name_column_width=70))
    print(ka.table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=70))


if __name__ == "__main__":
    main()
