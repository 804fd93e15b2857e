"""I2P-MAE pretraining step time, throughput and the share spent in FPS + kNN grouping.

    python benchmarks/i2pmae.py                                   # CPU: batch 32, fp32, small random teacher
    python benchmarks/i2pmae.py --device cuda --batch 64 --steps 20   # the paper's batch, fp32 and bf16

Prints one table: machine, versions, then per precision the step time (forward incl. the frozen 2D
teacher on the 3 depth views + backward + AdamW step, median of ``--steps`` after 3 warm-up steps),
shapes/s, peak memory (CUDA), the share of the step in the 3-level grouping (FPS 512 of 2048 + kNN 16,
FPS 256 of 512 + kNN 8, FPS 64 of 256 + kNN 8) and in projection + teacher. The grouping alone is also
timed with the iterative torch FPS loop of the reference repositories, in the same run.

Teacher: ``--teacher vit-b16`` (default on CUDA) is a CLIP ViT-B/16 visual tower with random weights —
the compute of the reference's frozen CLIP, no checkpoint needed; ``--teacher small`` (default on CPU,
where ViT-B/16 on 3 × 32 images would dominate the step) is the 2-block width-64 demo ViT. Both give
C = 512 features, so the 3D model is the reference's (17.6 M parameters in pretraining).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from pointmae import iterative_fps, timed  # benchmarks/pointmae.py, the same helpers as the Point-MAE table
from threefold.geometry.i2pmae import I2PMAE, CLIPVisionTeacher, hierarchical_groups, project_views, random_teacher
from threefold.geometry.neighbors import index_points, knn_indices
from threefold.geometry.pointmae import count_parameters

GROUPS, SIZES = (512, 256, 64), (16, 8, 8)


def loop_grouping(points: torch.Tensor) -> None:
    """The 3 levels with the iterative-loop FPS (the reference's semantics) and the same kNN."""
    source = points
    for g, k in zip(GROUPS, SIZES):
        centers = index_points(source, iterative_fps(source, g))
        knn_indices(centers, source, k)
        source = centers


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--points", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--teacher", choices=["vit-b16", "small"], default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    kind = args.teacher or ("vit-b16" if device.type == "cuda" else "small")
    torch.manual_seed(0)
    teacher = CLIPVisionTeacher().freeze() if kind == "vit-b16" else random_teacher(output_dim=512)
    model = I2PMAE(teacher).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    pts = torch.rand(args.batch, args.points, 3, device=device) * 2 - 1
    gen = torch.Generator(device=device).manual_seed(0)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"machine: {platform.node()} | {name} | torch {torch.__version__} | threads {torch.get_num_threads()}")
    print(f"I2P-MAE pretraining, {count_parameters(model) / 1e6:.2f} M trainable parameters, teacher {kind} "
          f"({sum(p.numel() for p in teacher.parameters()) / 1e6:.1f} M, frozen), batch {args.batch} x "
          f"{args.points} points, 512/256/64 x 16/8/8, mask 0.8")
    grouping = timed(lambda: hierarchical_groups(pts, GROUPS, SIZES), args.steps, device)
    loop = timed(lambda: loop_grouping(pts), args.steps, device)
    print(f"grouping (3 x FPS + kNN): threefold {grouping * 1e3:.1f} ms | iterative-loop FPS + kNN {loop * 1e3:.1f} ms "
          f"| ratio {loop / grouping:.2f}x")
    print("| precision | step ms | shapes/s | FPS+kNN share | projection+teacher share | peak GiB | process CPU s/step |")
    print("|---|---|---|---|---|---|---|")
    for precision in (["fp32", "bf16"] if device.type == "cuda" else ["fp32"]):
        bf16 = precision == "bf16"

        def step() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(pts, gen)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        def teach() -> None:
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                images, _ = project_views(pts)
                teacher(images.flatten(0, 1))

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        cpu = time.process_time()
        t = timed(step, args.steps, device)
        cpu = (time.process_time() - cpu) / (args.steps + 3)  # on a shared CPU, wall time overstates the cost
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        t_teach = timed(teach, args.steps, device)
        print(f"| {precision} | {t * 1e3:.1f} | {args.batch / t:.1f} | {grouping / t:.1%} | {t_teach / t:.1%} "
              f"| {peak:.2f} | {cpu:.2f} |")


if __name__ == "__main__":
    main()
