"""RAPiD-Seg training step, inference time per scan and peak memory, against a plain MinkUNet34.

    python benchmarks/rapidseg.py --data SAMPLE_ROOT --device cuda         # full scans, 0.05 m voxels
    python benchmarks/rapidseg.py --data SAMPLE_ROOT --points 20000        # CPU, a small scan

``SAMPLE_ROOT`` is a SemanticKITTI-layout folder (the synthetic sample of
``threefold.datasets.lidar_synthetic.generate_lidar_sample`` with its default 0.16° azimuth step,
about 118k points per scan, or the real dataset); scans of sequence ``--sequence`` are used.
Without ``--data`` the 124,668-point real scan of ``$THREEFOLD_TEST_DATA/semantickitti`` is used.

Prints one table: machine, versions, then per model (full-width R-RAPiD-Seg and MinkUNet34 at
``--voxel`` metres) the training step (forward + backward + SGD step, batch ``--batch`` scans), the
inference time per scan (network only; and with the RAPiD features computed on the same device, the
end-to-end time), peak device memory, and the ratio to MinkUNet34. Medians of ``--steps`` runs after
3 warm-up runs. Target (issue #3): inference < 35 ms per scan for R-RAPiD-Seg on an H100 at 0.05 m
(the paper reports about 105 ms per frame).
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import numpy as np
import torch
from timing import timed  # benchmarks/timing.py

from threefold.datasets.semantickitti import lidar_rings, list_scans, read_scan
from threefold.geometry.rapid.features import rapid_features
from threefold.geometry.rapid.losses import segmentation_loss
from threefold.geometry.rapid.rapidseg import RAPiDSeg


def load_scans(args) -> list[dict[str, np.ndarray]]:
    if args.data:
        paths = [p for _, _, p in list_scans(args.data, [args.sequence])][: max(args.batch, 1)]
    else:
        root = Path(os.environ.get("THREEFOLD_TEST_DATA", "../shared/data")) / "semantickitti"
        paths = [p for _, _, p in list_scans(root, ["00"])][:1] * max(args.batch, 1)
    if not paths:
        raise SystemExit(f"no scans found (--data {args.data}, sequence {args.sequence})")
    scans = []
    rng = np.random.default_rng(0)
    for p in paths:
        s = read_scan(p)
        if args.points and len(s["coord"]) > args.points:
            keep = np.sort(rng.choice(len(s["coord"]), args.points, replace=False))
            s = {k: v[keep] for k, v in s.items()}
        scans.append(s)
    return scans


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="")
    ap.add_argument("--sequence", default="08")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--voxel", type=float, default=0.05)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--points", type=int, default=0, help="subsample each scan to this many points (0: all)")
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the training default on Ampere+; reported below
    scans = load_scans(args)
    dev = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
    coords = [dev(s["coord"]).float() for s in scans]
    rems = [dev(s["remission"]).float() for s in scans]

    def features(c: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return rapid_features(c, r, lidar_rings(c, 64))

    rapid = [features(c, r) for c, r in zip(coords, rems)]
    t_feat = timed(lambda: features(coords[0], rems[0]), args.steps, device)
    coord_b = torch.cat(coords)
    rem_b = torch.cat(rems)
    batch_b = torch.cat([torch.full((len(c),), i, device=device) for i, c in enumerate(coords)])
    rapid_b = torch.cat(rapid)
    labels = torch.randint(0, 19, (len(coord_b),), device=device, generator=torch.Generator(device).manual_seed(0))

    print(f"machine: {platform.node()} | {platform.processor() or platform.machine()} | {os.cpu_count()} cpus"
          + (f" | {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""))
    import spconv

    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) | spconv {spconv.__version__} | threads {torch.get_num_threads()}")
    print(f"scans: {len(scans)} x {[len(c) for c in coords]} points, voxel {args.voxel} m, batch {args.batch}, "
          f"median of {args.steps}")
    print(f"RAPiD features (R-RAPiD, k = 10/7/5, torch path on {device.type}): {t_feat * 1e3:.1f} ms per scan")
    print()
    print("| model | params | voxels/scan | train step (batch) | inference / scan (net) | + RAPiD features | peak memory |")
    print("|---|---|---|---|---|---|---|")
    rows = {}
    for name, variant in (("MinkUNet34", "none"), ("R-RAPiD-Seg", "r")):
        torch.manual_seed(0)
        net = RAPiDSeg(variant=variant, voxel_size=args.voxel).to(device)
        opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
        params = sum(p.numel() for p in net.parameters())
        n_vox = net.voxelize(coords[0], torch.zeros(len(coords[0]), dtype=torch.long, device=device)).num_voxels

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss, _ = segmentation_loss(net(coord_b, rem_b, batch_b, rapid_b, frozen_ae=True), labels)
            loss.backward()
            opt.step()

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        net.train()
        t_train = timed(step, args.steps, device)
        net.eval()
        zero = torch.zeros(len(coords[0]), dtype=torch.long, device=device)

        @torch.no_grad()
        def infer() -> None:
            net(coords[0], rems[0], zero, rapid[0]).argmax(1)

        t_inf = timed(infer, args.steps, device)
        t_e2e = t_inf + (t_feat if variant != "none" else 0.0)
        mem = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.type == "cuda" else "n/a (CPU)"
        rows[name] = (t_train, t_inf, t_e2e)
        print(f"| {name} | {params / 1e6:.2f} M | {n_vox} | {t_train * 1e3:.1f} ms | {t_inf * 1e3:.1f} ms | "
              f"{t_e2e * 1e3:.1f} ms | {mem} |")
        del net, opt
    base, ours = rows["MinkUNet34"], rows["R-RAPiD-Seg"]
    print()
    print(f"ratio R-RAPiD-Seg / MinkUNet34: train step {ours[0] / base[0]:.2f}x, inference {ours[1] / base[1]:.2f}x "
          f"(end to end {ours[2] / base[2]:.2f}x); paper: about 105 ms per frame; target < 35 ms")


if __name__ == "__main__":
    main()
