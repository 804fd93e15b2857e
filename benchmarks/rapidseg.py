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

Inference runs through ``RAPiDSeg.predict`` once per ``--precision`` (default
``fp32,fp16,fp16+stem32,fp16+stemacc16`` on CUDA, ``fp32`` on CPU; ``fp16+stem32`` is fp16 with the
backbone's stem conv in float32, ``fp16+stemacc16`` with float16 accumulation forced in the stem:
``minkunet.STEM_UNDER_FP16``), one table row each, with the split of the R-RAPiD-Seg time into voxelisation +
stream embedding and backbone + head, and the agreement of each precision's labels with fp32's
(fraction of identical point labels on the first scan). The networks are untrained unless
``--checkpoint`` gives R-RAPiD-Seg weights (a Lightning checkpoint of ``semantickitti-rapidseg`` or a
plain state dict); untrained, their BatchNorm statistics come from the timed training steps, so the
agreement is that of a network with calibrated activations but random weights.
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
from threefold.geometry.rapid import minkunet, sparse
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
    ap.add_argument("--precision", default="", help="comma-separated inference precisions (default "
                    "fp32,fp16,fp16+stem32,fp16+stemacc16 on CUDA, fp32 on CPU)")
    ap.add_argument("--checkpoint", default="", help="R-RAPiD-Seg weights for the agreement figure")
    ap.add_argument("--profile", action="store_true", help="after the table, the top GPU kernels of three "
                    "R-RAPiD-Seg inferences per precision (torch.profiler)")
    ap.add_argument("--fp32-accum", action="store_true", help="float32 accumulation in every fp16 sparse conv "
                    "(default: spconv's heuristic)")
    args = ap.parse_args()
    if args.fp32_accum:
        sparse.FP16_FP32_ACCUM = True
    device = torch.device(args.device)
    default = "fp32,fp16,fp16+stem32,fp16+stemacc16" if device.type == "cuda" else "fp32"
    precisions = [p for p in (args.precision or default).split(",") if p]
    if "fp32" not in precisions:
        precisions.insert(0, "fp32")  # the reference of the agreement column
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
          f"median of {args.steps}; fp16 sparse-conv accumulation: "
          f"{'float32' if sparse.FP16_FP32_ACCUM else 'spconv heuristic'}")
    print(f"RAPiD features (R-RAPiD, k = 10/7/5, torch path on {device.type}): {t_feat * 1e3:.1f} ms per scan")
    print()
    print("| model | params | voxels/scan | train step (batch) | inference precision | inference / scan (net) | "
          "of which voxels + streams | + RAPiD features | labels = fp32 | peak memory |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = {}
    notes: list[str] = []
    profiles: dict[str, str] = {}
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
        if args.checkpoint and variant == "r":
            load_weights(net, args.checkpoint)
        net.eval()
        zero = torch.zeros(len(coords[0]), dtype=torch.long, device=device)
        ref_labels = None
        for precision in precisions:
            real = precision_setting(precision)

            def infer() -> torch.Tensor:
                return net.predict(coords[0], rems[0], zero, rapid[0], precision=real).argmax(1)

            def streams() -> None:  # the part before the backbone, in the same precision
                with torch.inference_mode(), torch.autocast("cuda", torch.float16, enabled=real == "fp16"):
                    net.embed(net.voxelize(coords[0], zero), coords[0], rems[0], rapid[0])

            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                t_inf = timed(infer, args.steps, device)
                t_streams = timed(streams, args.steps, device)
                labels_p = infer()
            except Exception as err:  # e.g. no spconv kernel for this precision: report, go on
                print(f"| {name} | | | | {precision} | failed: {str(err).splitlines()[0][:120]} | | | | |")
                continue
            if variant == "r":  # the one backbone layer whose shape differs from MinkUNet34's
                notes.append(f"R-RAPiD-Seg {precision}: {stem_time(net, coords[0], rems[0], zero, rapid[0], real, args.steps)}")
            if precision == "fp32":
                ref_labels = labels_p
            agree = (labels_p == ref_labels).float().mean().item()
            t_e2e = t_inf + (t_feat if variant != "none" else 0.0)
            mem = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.type == "cuda" else "n/a (CPU)"
            rows[name, precision] = (t_train, t_inf, t_e2e)
            first = precision == precisions[0]  # model columns once; the first row's memory includes training
            head = f"{params / 1e6:.2f} M | {n_vox} | {t_train * 1e3:.1f} ms" if first else " | | "
            print(f"| {name} | {head} | {precision} | {t_inf * 1e3:.1f} ms | {t_streams * 1e3:.1f} ms | "
                  f"{t_e2e * 1e3:.1f} ms | {agree:.4%} | {mem}{' (train + inference)' if first else ''} |")
        if variant == "r" and device.type == "cuda" and minkunet.FUSE_BN_INFERENCE:
            # the folded BatchNorm (one spconv kernel per conv + BN + ReLU) against the unfused layers
            fused = net.predict(coords[0], rems[0], zero, rapid[0])
            minkunet.FUSE_BN_INFERENCE = False
            t_unfused = timed(lambda: net.predict(coords[0], rems[0], zero, rapid[0]).argmax(1), args.steps, device)
            unfused = net.predict(coords[0], rems[0], zero, rapid[0])
            minkunet.FUSE_BN_INFERENCE = True
            notes.append(f"BatchNorm folding (R-RAPiD-Seg, fp32): unfused inference {t_unfused * 1e3:.1f} ms; "
                         f"max |Δlogit| fused vs unfused {(fused - unfused).abs().max().item():.2e} "
                         f"(logit std {unfused.std().item():.2e})")
        if args.profile and variant == "r":
            for p in precisions:
                try:
                    profiles[p] = profile_inference(net, coords[0], rems[0], zero, rapid[0], precision_setting(p))
                except Exception as err:  # noqa: BLE001  (a failed precision was reported in the table)
                    profiles[p] = f"failed: {err}"
        precision_setting("fp32")
        del net, opt
    print()
    for precision in precisions:
        if ("MinkUNet34", precision) not in rows or ("R-RAPiD-Seg", precision) not in rows:
            continue
        base, ours = rows["MinkUNet34", precision], rows["R-RAPiD-Seg", precision]
        print(f"{precision}: ratio R-RAPiD-Seg / MinkUNet34: train step (fp32) {ours[0] / base[0]:.2f}x, inference "
              f"{ours[1] / base[1]:.2f}x (end to end {ours[2] / base[2]:.2f}x)")
    print("paper: about 105 ms per frame; target < 35 ms for R-RAPiD-Seg inference (net)")
    triton_dw = device.type == "cuda" and sparse.USE_TRITON and sparse._depthwise_triton() is not None
    print(f"depth-wise convs of the autoencoder (inference): {'Triton kernel' if triton_dw else 'torch loop'}")
    print(f"BatchNorm folded into the sparse convs at inference: {device.type == 'cuda' and minkunet.FUSE_BN_INFERENCE}")
    print("fp16 inference: VSA softmax and segment sums in float32 (geometry/scatter.py, geometry/rapid/vsa.py)")
    for note in notes:
        print(note)
    if args.profile:
        for precision, table in profiles.items():
            print(f"\nR-RAPiD-Seg inference, {precision}, 3 calls (torch.profiler, by device time):\n{table}")


def stem_time(net: RAPiDSeg, coord: torch.Tensor, rem: torch.Tensor, batch: torch.Tensor, rapid: torch.Tensor,
              precision: str, steps: int) -> str:
    """Time of the backbone's stem conv alone (its index pairs cached on the input tensor)."""
    try:
        with torch.inference_mode(), torch.autocast("cuda", torch.float16, enabled=precision == "fp16"):
            grid = net.voxelize(coord, batch)
            st = sparse.sparse_tensor(net.embed(grid, coord, rem, rapid), grid.indices, grid.batch_size)
            t = timed(lambda: net.backbone.run_stem(st), steps, coord.device)  # warm-up builds the pairs
    except Exception as err:  # noqa: BLE001  (a diagnostic line only)
        return f"stem conv failed: {str(err).splitlines()[0][:120]}"
    return (f"stem conv ({net.in_channels} → {net.backbone.stem.conv.conv.out_channels} channels, kernel "
            f"{net.backbone.stem.conv.conv.kernel_size[0]}, index pairs cached) {t * 1e3:.2f} ms")


def precision_setting(label: str) -> str:
    """Apply a row's settings (``+stem32``: the stem conv in float32, ``+stemacc16``: float16
    accumulation in the stem) and return the precision to pass to ``RAPiDSeg.predict``."""
    real, _, extra = label.partition("+")
    modes = {"": "fp16", "stem32": "fp32", "stemacc16": "fp16acc"}
    if extra not in modes:
        raise SystemExit(f"--precision {label}: expected fp32, fp16, fp16+stem32 or fp16+stemacc16")
    minkunet.STEM_UNDER_FP16 = modes[extra]
    return real


def profile_inference(net: RAPiDSeg, coord: torch.Tensor, rem: torch.Tensor, batch: torch.Tensor, rapid: torch.Tensor,
                      precision: str) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if coord.is_cuda else [])
    net.predict(coord, rem, batch, rapid, precision=precision)
    with profile(activities=activities) as prof:
        for _ in range(3):
            net.predict(coord, rem, batch, rapid, precision=precision)
        if coord.is_cuda:
            torch.cuda.synchronize()
    return compact_profile(prof.key_averages(), coord.is_cuda, calls=3)


def compact_profile(averages, on_device: bool, calls: int, rows: int = 12) -> str:
    """At most ``rows + 2`` lines: the total self time per call, then the top ops/kernels by self
    device time (CPU time off CUDA), each as ms per call, share of the total and launches per call."""
    def self_time(e) -> float:  # µs; the attribute is spelt differently across torch versions
        names = ("self_device_time_total", "self_cuda_time_total") if on_device else ("self_cpu_time_total",)
        for name in names:
            v = getattr(e, name, None)
            if v is not None:
                return float(v)
        return 0.0

    events = [(self_time(e), e.count, e.key) for e in averages]
    events = [ev for ev in events if ev[0] > 0]
    total = sum(t for t, _, _ in events) or 1.0
    events.sort(key=lambda ev: -ev[0])
    where = "device" if on_device else "CPU"
    lines = [f"  total self {where} time {total / 1e3 / calls:.2f} ms per call; top {min(rows, len(events))} of {len(events)}:",
             f"  {'ms/call':>8} {'share':>6} {'n/call':>7}  name"]
    for t, n, key in events[:rows]:
        name = key if len(key) <= 90 else key[:87] + "..."
        lines.append(f"  {t / 1e3 / calls:8.3f} {t / total:6.1%} {n / calls:7.1f}  {name}")
    return "\n".join(lines)


def load_weights(net: RAPiDSeg, path: str) -> None:
    """R-RAPiD-Seg weights from a Lightning checkpoint (``state_dict`` with the module's ``net.`` prefix)
    or a plain state dict."""
    state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain containers only
    state = state.get("state_dict", state)
    if any(k.startswith("net.") for k in state):
        state = {k[4:]: v for k, v in state.items() if k.startswith("net.")}
    net.load_state_dict(state)
    print(f"R-RAPiD-Seg weights: {path}")


if __name__ == "__main__":
    main()
