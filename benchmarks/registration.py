"""Registration speed: NestedMorph (threefold) against MONAI ``VoxelMorph`` in the same process on the
same device (issue #6, Sec. 5).

For each size S (default 64³ and 128³, batch 1, fp32 with TF32 convolutions / matmuls on CUDA):

- training step: forward + loss (-LNCC² window 9 + diffusion) + backward + Adam step, ms;
- inference: forward of one pair (field and warped image) under ``torch.no_grad``, ms, in fp32 and
  with bf16 autocast;
- peak memory of each phase (``torch.cuda.max_memory_allocated``; process peak RSS on CPU).

Rows: NestedMorph, NestedMorph diffeomorphic (7 squarings), MONAI VoxelMorph with its defaults
(vxm UNet, 7 integration steps) and without integration. Target: NestedMorph inference on one 128³
pair under 50 ms on a data-centre GPU (the issue quotes MONAI VoxelMorph at 23 ms / 119 ms for
64³ / 128³ on an H200).

    python benchmarks/registration.py --device cuda
    python benchmarks/registration.py --device cpu --sizes 64 --skip-train --repeats 3     # CPU inference at 64³
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

import torch

from threefold.datasets.errors import require
from threefold.medical.registration.losses import registration_loss
from threefold.medical.registration.nestedmorph import NestedMorph, count_parameters


class MonaiVoxelMorph(torch.nn.Module):
    """MONAI ``VoxelMorph`` as shipped (its own warp), returning ``(warped, ddf)``."""

    def __init__(self, integration_steps: int) -> None:
        super().__init__()
        self.net = require("monai.networks.nets", extra="medical").VoxelMorph(integration_steps=integration_steps)

    def forward(self, moving, fixed):
        return self.net(moving, fixed)


def models() -> dict[str, torch.nn.Module]:
    return {
        "NestedMorph": NestedMorph(),
        "NestedMorph diffeo (7 sq.)": NestedMorph(diffeomorphic=True),
        "MONAI VoxelMorph (7 int. steps)": MonaiVoxelMorph(7),
        "MONAI VoxelMorph (no integration)": MonaiVoxelMorph(0),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f}"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} (RSS)"


def _timed(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn()`` in ms after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return 1e3 * sorted(times)[len(times) // 2]


def _output(out):
    return (out.warped, out.ddf) if hasattr(out, "ddf") else out


def bench(name: str, net: torch.nn.Module, size: int, device: torch.device, args) -> dict[str, str]:
    g = torch.Generator().manual_seed(0)
    moving = torch.rand(1, 1, size, size, size, generator=g).to(device)
    fixed = torch.rand(1, 1, size, size, size, generator=g).to(device)
    net = net.to(device)
    row = {"model": name, "size": f"{size}³", "params": f"{count_parameters(net) / 1e6:.2f} M"}
    if not args.skip_train:
        net.train()
        opt = torch.optim.Adam(net.parameters(), lr=1e-4, amsgrad=True)

        def step() -> None:
            warped, ddf = _output(net(moving, fixed))
            loss = registration_loss(warped, fixed, ddf)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        _reset(device)
        row["train ms"] = f"{_timed(step, device, args.warmup, args.repeats):.1f}"
        row["train GiB"] = _peak(device)
        del opt
    net.eval()
    for precision, enabled in (("fp32", False), ("bf16", True)):
        if enabled and (device.type != "cuda" or args.no_bf16):
            continue

        @torch.no_grad()
        def infer() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled):
                _output(net(moving, fixed))

        _reset(device)
        row[f"infer ms {precision}"] = f"{_timed(infer, device, args.warmup, args.repeats):.1f}"
        row[f"infer GiB {precision}"] = _peak(device)
    net.to("cpu")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--no-bf16", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    import monai

    print(f"machine: {platform.node()} | {platform.processor() or platform.machine()} | device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f", {torch.get_num_threads()} threads"))
    print(f"torch {torch.__version__}, monai {monai.__version__}; batch 1; median of {args.repeats} after {args.warmup} warm-up; "
          "memory = peak allocated GiB per phase")
    rows = []
    for size in args.sizes:
        for name, net in models().items():
            rows.append(bench(name, net, size, device, args))
            print("  " + ", ".join(f"{k} {v}" for k, v in rows[-1].items()), flush=True)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    print()
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(r.get(c, "–") for c in cols) + " |")
    # ratio NestedMorph / VoxelMorph (defaults) per size, fp32 inference
    for size in args.sizes:
        nm = next(r for r in rows if r["model"] == "NestedMorph" and r["size"] == f"{size}³")
        vm = next(r for r in rows if r["model"].startswith("MONAI VoxelMorph (7") and r["size"] == f"{size}³")
        print(f"{size}³ fp32 inference: NestedMorph / MONAI VoxelMorph = {float(nm['infer ms fp32']) / float(vm['infer ms fp32']):.2f}")


if __name__ == "__main__":
    main()
