"""Point-MAE pretraining step time, throughput and the share spent in FPS + kNN grouping.

    python benchmarks/pointmae.py                       # CPU: batch 32, fp32
    python benchmarks/pointmae.py --device cuda --batch 128 --steps 20   # the paper's batch, fp32 and bf16

Prints one table: machine, versions, then per precision the step time (forward + backward + AdamW step,
median of ``--steps`` after 3 warm-up steps), shapes/s, peak memory (CUDA), and the time of the grouping
alone (exact FPS 64 of 1024 + kNN 32) with threefold's FPS and with the iterative torch loop of the
reference repositories (``pointnet2_ops``-style semantics, one ``argmax`` per sample), in the same run.
"""

from __future__ import annotations

import argparse
import platform

import torch
from timing import timed  # benchmarks/timing.py

from threefold.geometry.neighbors import group_patches, index_points
from threefold.geometry.pointmae import PointMAE, count_parameters, group_points


def iterative_fps(points: torch.Tensor, k: int) -> torch.Tensor:
    """The textbook loop (start at point 0), as the reference's CUDA op computes it."""
    b, n, _ = points.shape
    idx = torch.zeros(b, k, dtype=torch.long, device=points.device)
    dmin = torch.full((b, n), float("inf"), device=points.device)
    last = points[:, 0]
    for i in range(1, k):
        dmin = torch.minimum(dmin, (points - last[:, None]).square().sum(-1))
        idx[:, i] = dmin.argmax(1)
        last = points[torch.arange(b, device=points.device), idx[:, i]]
    return idx


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--points", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = PointMAE().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    pts = torch.rand(args.batch, args.points, 3, device=device)
    gen = torch.Generator(device=device).manual_seed(0)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"machine: {platform.node()} | {name} | torch {torch.__version__} | threads {torch.get_num_threads()}")
    print(f"Point-MAE pretraining, {count_parameters(model) / 1e6:.2f} M parameters, batch {args.batch} x "
          f"{args.points} points, 64 x 32 patches, mask 0.6")
    grouping = timed(lambda: group_points(pts, 64, 32), args.steps, device)
    loop = timed(lambda: group_patches(pts, index_points(pts, iterative_fps(pts, 64)), 32), args.steps, device)
    print(f"grouping (FPS + kNN): threefold {grouping * 1e3:.1f} ms | iterative-loop FPS + kNN {loop * 1e3:.1f} ms "
          f"| ratio {loop / grouping:.2f}x")
    print("| precision | step ms | shapes/s | FPS+kNN share | peak GiB |")
    print("|---|---|---|---|---|")
    for precision in (["fp32", "bf16"] if device.type == "cuda" else ["fp32"]):
        def step() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = model(pts, gen)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t = timed(step, args.steps, device)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        print(f"| {precision} | {t * 1e3:.1f} | {args.batch / t:.1f} | {grouping / t:.1%} | {peak:.2f} |")


if __name__ == "__main__":
    main()
