"""Glioma segmentation speed: Isensee 2017 residual U-Net + multi-level head (threefold) against
MONAI ``DynUNet(res_block=True)`` of the same size (5 levels, 16…256 filters, instance norm,
LeakyReLU), in the same process on the same device.

Measures (issue #7, Sec. 5):
- training throughput: patches/s of forward + backward + Adam step, batch 2 of 4 x P³ (P = 128 on a
  GPU, bf16 autocast; CPU defaults to fp32 and a smaller patch, set with --patch);
- sliding-window inference per case of 240 x 240 x 155 (Gaussian, 50 % overlap, window = patch),
  with peak GPU memory (torch.cuda.max_memory_allocated) or the process's peak RSS on CPU.

    python benchmarks/glioma.py                      # GPU when available, paper sizes
    python benchmarks/glioma.py --device cpu --patch 64 --steps 3 --case 240 240 155
    python benchmarks/glioma.py --device cpu --patch 128 --skip-train    # CPU inference per case

Needs MONAI (extra ``medical``) for DynUNet and sliding windows. Prints one table.
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

import torch

from threefold.datasets.errors import require
from threefold.medical.segmentation import Isensee2017UNet, MultiLevelHead
from threefold.medical.segmentation.inference import sliding_window_predict


def dynunet(out_channels: int) -> torch.nn.Module:
    nets = require("monai.networks.nets", extra="medical")
    return nets.DynUNet(
        spatial_dims=3,
        in_channels=4,
        out_channels=out_channels,
        kernel_size=[3] * 5,
        strides=[1, 2, 2, 2, 2],
        upsample_kernel_size=[2] * 4,
        filters=[16, 32, 64, 128, 256],
        norm_name=("INSTANCE", {"affine": True}),
        act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
        res_block=True,
        dropout=None,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS (process)"


def bench_train(net, head, device, patch, batch, steps, warmup, bf16) -> tuple[float, str]:
    opt = torch.optim.Adam(net.parameters(), lr=5e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, patch, patch, patch, generator=g).to(device)
    y = torch.randint(0, 4, (batch, patch, patch, patch), generator=g).to(device)
    net.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = net(x)
        loss = head.loss(out.float(), y)
        loss.backward()
        opt.step()
    _sync(device)
    dt = (time.perf_counter() - t0) / steps
    return dt, _peak(device)


@torch.no_grad()
def bench_infer(net, device, case, patch, reps, bf16) -> tuple[float, str]:
    net.eval()
    x = torch.randn(1, 4, *case, generator=torch.Generator().manual_seed(1)).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    warmup = 1 if device.type == "cuda" else 0  # cuDNN autotuning / allocator; CPU runs are too slow to repeat
    for i in range(warmup + reps):
        _sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            sliding_window_predict(x, net, (patch,) * 3, overlap=0.5, sw_batch_size=2)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return min(times), _peak(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--patch", type=int, default=None, help="patch / window edge (default 128 on GPU, 64 on CPU)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="timed training steps (default 20 GPU, 3 CPU)")
    ap.add_argument("--case", type=int, nargs=3, default=[240, 240, 155])
    ap.add_argument("--reps", type=int, default=None, help="timed inference passes (default 5 GPU, 1 CPU)")
    ap.add_argument("--fp32", action="store_true", help="no bf16 autocast on GPU")
    ap.add_argument("--skip-train", action="store_true", help="inference only (e.g. CPU at 128^3 windows)")
    args = ap.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    patch = args.patch or (128 if gpu else 64)
    steps = args.steps or (20 if gpu else 3)
    reps = args.reps or (5 if gpu else 1)
    bf16 = gpu and not args.fp32
    torch.backends.cudnn.benchmark = True
    monai = require("monai", extra="medical")
    name = torch.cuda.get_device_name(device) if gpu else f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    print(f"# machine: {platform.node()} | device: {name}")
    print(f"# torch {torch.__version__} | monai {monai.__version__} | python {platform.python_version()}")
    print(f"# train: batch {args.batch} x 4 x {patch}^3, {'bf16 autocast' if bf16 else 'fp32'}, {steps} timed steps")
    print(f"# inference: case {tuple(args.case)}, window {patch}^3, 50 % overlap, Gaussian, sw_batch 2, best of {reps}")
    head = MultiLevelHead().to(device)
    rows = []
    for label, net in (
        ("threefold Isensee2017UNet + multi-level", Isensee2017UNet(4, 1, 16, 5).to(device)),
        ("MONAI DynUNet(res_block=True)", dynunet(1).to(device)),
    ):
        params = sum(p.numel() for p in net.parameters()) / 1e6
        if args.skip_train:
            step, train_mem = float("nan"), "-"
        else:
            step, train_mem = bench_train(net, head, device, patch, args.batch, steps, 3 if gpu else 1, bf16)
        infer, infer_mem = bench_infer(net, device, args.case, patch, reps, bf16)
        rows.append((label, params, step, args.batch / step, train_mem, infer, infer_mem))
        del net
        if gpu:
            torch.cuda.empty_cache()
    print(f"| implementation | params (M) | train step (ms) | patches/s | train peak | inference / case (s) | inference peak |")
    print("|---|---|---|---|---|---|---|")
    for label, params, step, tput, tmem, infer, imem in rows:
        print(f"| {label} | {params:.2f} | {step * 1e3:.1f} | {tput:.2f} | {tmem} | {infer:.3f} | {imem} |")
    ours, ref = rows[0], rows[1]
    print(f"ratio threefold / DynUNet: train step {ours[2] / ref[2]:.2f}x, inference {ours[5] / ref[5]:.2f}x (lower is faster)")
    print(f"# threads: torch {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
