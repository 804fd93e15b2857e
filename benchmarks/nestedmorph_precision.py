"""NestedMorph training step by autocast precision (fp32 / bf16 / fp16), with cuDNN's autotuner off and
on, then the top CUDA kernels of a bf16 step — the measurement that found cuDNN's per-channel bf16
weight-gradient kernels of the depth-wise 3D convolutions (fixed by ``DepthwiseConv3d``,
``medical/registration/blocks.py``).

    python benchmarks/nestedmorph_precision.py                 # CUDA, batch 1, 64³

Output of 2026-11-26 on an H100, before and after the fix:
docs/gpu-runs/2026-11-26-h100-nestedmorph-bf16-profile.txt. The loss is a plain squared difference
(the step's cost is the network's); ``benchmarks/registration.py`` times the pipeline's loss and
inference against MONAI VoxelMorph.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from threefold.pipelines.registration import RegistrationConfig, build_network

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    dev = torch.device("cuda")
    net = build_network(RegistrationConfig(method="nestedmorph")).to(dev).train()
    opt = torch.optim.Adam(net.parameters(), 1e-4)
    shape = (1, 1, args.size, args.size, args.size)
    moving, fixed = torch.rand(shape, device=dev), torch.rand(shape, device=dev)

    def step(dtype: torch.dtype | None) -> None:
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            out = net(moving, fixed)
            loss = (out.warped.float() - fixed).square().mean() + out.ddf.float().square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    print(f"NestedMorph {args.size}³, batch 1, {torch.cuda.get_device_name(dev)}, torch {torch.__version__}")
    for autotune in (False, True):
        torch.backends.cudnn.benchmark = autotune
        for name, dtype in PRECISIONS.items():
            for _ in range(5):
                step(dtype)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(dtype)
            torch.cuda.synchronize()
            print(f"cudnn.benchmark={autotune} {name}: train step {(time.perf_counter() - t0) / args.steps * 1e3:.1f} ms",
                  flush=True)
    torch.backends.cudnn.benchmark = False
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step(torch.bfloat16)
        torch.cuda.synchronize()
    print("\nbf16: top CUDA kernels (3 steps)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=90))


if __name__ == "__main__":
    main()
