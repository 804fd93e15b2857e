"""BSP-Net speed: training iterations per second and exact mesh extraction time per shape.

    python benchmarks/bspnet.py                 # CPU, extraction + a short training timing
    python benchmarks/bspnet.py --device cuda   # GPU training timing, fp32 and bf16 autocast

Training: the paper's network (ef 32, p 4096, c 256) at the 64^3 stage, 24 shapes x 4096 points per
step, Adam; iterations per second after warm-up (``--shapes``/``--steps`` to shrink it on a CPU).
Extraction: 256 convexes of 6-12 (and 12-16) random planes each, cut from p = 4096 planes; threefold's
half-space intersection (Qhull) against a naive pure-Python polygon clipper written here in the style
of the reference's ``bspt_slow.py`` (clip a bounding cube's faces by each plane, one vertex at a time).
Prints one table with the machine, the versions, both implementations and their ratio.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import scipy
import torch

from threefold.geometry.bspnet.extraction import extract_bsp_mesh
from threefold.geometry.bspnet.losses import bspnet_loss
from threefold.geometry.bspnet.model import BSPNet


def random_convexes(k_range: tuple[int, int], c: int = 256, p: int = 4096, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Planes (4, p) and T (p, c): convex i is bounded by k planes (k in ``k_range``) tangent to a small
    random sphere (a trained model's convexes also carry many such redundant planes)."""
    rng = np.random.default_rng(seed)
    planes = np.zeros((4, p))
    planes[2], planes[3] = 1.0, 10.0  # unused planes: far outside
    T = np.zeros((p, c), np.float32)
    used = 0
    for i in range(c):
        k = int(rng.integers(k_range[0], k_range[1] + 1))
        centre, radius = rng.uniform(-0.35, 0.35, 3), rng.uniform(0.03, 0.1)
        normals = rng.normal(size=(k, 3))
        normals /= np.linalg.norm(normals, axis=1, keepdims=True)
        planes[:3, used : used + k] = normals.T
        planes[3, used : used + k] = -(normals @ centre) - radius
        T[used : used + k, i] = 1.0
        used += k
    return planes.astype(np.float32), T


def _clip_polygon(poly: list[tuple], plane: tuple) -> tuple[list[tuple], list[tuple]]:
    a, b, c, d = plane
    out, cut = [], []
    for i in range(len(poly)):
        p, q = poly[i], poly[(i + 1) % len(poly)]
        fp = a * p[0] + b * p[1] + c * p[2] + d
        fq = a * q[0] + b * q[1] + c * q[2] + d
        if fp <= 0:
            out.append(p)
        if (fp < 0 < fq) or (fq < 0 < fp):
            t = fp / (fp - fq)
            x = (p[0] + t * (q[0] - p[0]), p[1] + t * (q[1] - p[1]), p[2] + t * (q[2] - p[2]))
            out.append(x)
            cut.append(x)
    return out, cut


def naive_convex(planes: list[tuple], bound: float = 0.5) -> list[list[tuple]]:
    """Pure-Python clipping of the cube's faces by every plane; the cap polygon is the cut points
    ordered by angle. Returns the faces (lists of vertex tuples)."""
    import math

    b = bound
    cube = [(x, y, z) for x in (-b, b) for y in (-b, b) for z in (-b, b)]
    idx = [[0, 1, 3, 2], [4, 6, 7, 5], [0, 4, 5, 1], [2, 3, 7, 6], [0, 2, 6, 4], [1, 5, 7, 3]]
    faces = [[cube[i] for i in f] for f in idx]
    for pl in planes:
        new, cut = [], []
        for f in faces:
            g, c = _clip_polygon(f, pl)
            cut += c
            if len(g) >= 3:
                new.append(g)
        if len(cut) >= 3:
            cx = sum(p[0] for p in cut) / len(cut)
            cy = sum(p[1] for p in cut) / len(cut)
            cz = sum(p[2] for p in cut) / len(cut)
            n = pl[:3]
            u = (cut[0][0] - cx, cut[0][1] - cy, cut[0][2] - cz)
            v = (n[1] * u[2] - n[2] * u[1], n[2] * u[0] - n[0] * u[2], n[0] * u[1] - n[1] * u[0])
            ang = [math.atan2(sum((p[k] - (cx, cy, cz)[k]) * v[k] for k in range(3)),
                              sum((p[k] - (cx, cy, cz)[k]) * u[k] for k in range(3))) for p in cut]
            new.append([p for _, p in sorted(zip(ang, cut))])
        faces = new
    return faces


def time_extraction(k_range: tuple[int, int], repeats: int = 3) -> tuple[float, float, int]:
    planes, T = random_convexes(k_range)
    extract_bsp_mesh(planes, T)  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        mesh = extract_bsp_mesh(planes, T)
    ours = (time.perf_counter() - t0) / repeats
    t0 = time.perf_counter()
    for i in range(T.shape[1]):
        naive_convex([tuple(float(v) for v in planes[:, j]) for j in np.flatnonzero(T[:, i] > 0.01)])
    naive = time.perf_counter() - t0
    return ours, naive, mesh.num_convexes


def time_training(device: str, shapes: int, steps: int, bf16: bool) -> float:
    torch.manual_seed(0)
    model = BSPNet(32, 4096, 256, phase=0).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.5, 0.999))
    vox = (torch.rand(shapes, 1, 64, 64, 64, device=device) > 0.8).float()
    pts = torch.rand(shapes, 4096, 3, device=device) - 0.5
    val = (pts.norm(dim=-1, keepdim=True) < 0.3).float()

    def step() -> None:
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            out = model(vox, pts)
            loss = bspnet_loss(out["h2"].float(), out["h3"].float(), val, model.T, model.W, 0)
        opt.zero_grad()
        loss.total.backward()
        opt.step()

    for _ in range(2):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shapes", type=int, default=24)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--skip-extraction", action="store_true")
    args = ap.parse_args()
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else "-"
    print(f"machine: {platform.node()} | {platform.processor() or platform.machine()} | {torch.get_num_threads()} threads | GPU: {gpu}")
    print(f"versions: python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, scipy {scipy.__version__}")
    print()
    print("| measurement | implementation | value | ratio (naive time / threefold time; > 1: threefold faster) |")
    print("|---|---|---|---|")
    if not args.skip_extraction:
        for k_range in ((6, 12), (12, 16)):
            ours, naive, kept = time_extraction(k_range)
            what = f"extraction, 256 convexes of {k_range[0]}-{k_range[1]} planes, s/shape"
            print(f"| {what} | threefold (Qhull half-space intersection + 64^3 selection, kept {kept}) | {ours:.3f} | 1.0 |")
            print(f"| {what} | naive pure-Python polygon clipping (no selection) | {naive:.3f} | {naive / ours:.2f} |")
    fp32 = time_training(args.device, args.shapes, args.steps, bf16=False)
    print(f"| training it/s, 64^3 stage, {args.shapes} shapes x 4096 pts ({args.device}) | fp32 | {fp32:.2f} | 1.0 |")
    if args.device.startswith("cuda"):
        bf = time_training(args.device, args.shapes, args.steps, bf16=True)
        print(f"| training it/s, 64^3 stage, {args.shapes} shapes x 4096 pts ({args.device}) | bf16 autocast | {bf:.2f} | {bf / fp32:.2f}x |")


if __name__ == "__main__":
    main()
