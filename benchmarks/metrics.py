"""Speed of the metric layer's pure functions against the reference implementations they are
tested against, on evaluation-sized inputs.

    OMP_NUM_THREADS=1 python benchmarks/metrics.py            # CPU (and CUDA when available)
    python benchmarks/metrics.py --quick                      # smaller inputs, a smoke run

Compared (a reference that is not installed is skipped, e.g. MONAI on the GPU machine):

- confusion matrix of one SemanticKITTI-sized batch (1.2 M points, 20 classes): ours
  (``torch.bincount``) vs ``np_ioueval``'s ``np.add.at``;
- HD95 of two BraTS-sized masks (240 × 240 × 155): ours (scipy EDT over the bounding box) vs MONAI
  ``HausdorffDistanceMetric(percentile=95)``;
- 3D SSIM (128³): ours (torch) vs scikit-image ``structural_similarity``;
- Jacobian determinant (160 × 192 × 224, Learn2Reg OASIS size): ours (torch) vs
  ``numpy.gradient`` + ``numpy.linalg.det``.

Prints one table: machine, versions, implementation, median seconds over repeats, ratio to ours.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch


def _time(fn: Callable[[], object], repeats: int, sync: bool = False) -> float:
    fn()  # warm-up (allocations, kernel compilation)
    times = []
    for _ in range(repeats):
        if sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _masks(shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two overlapping ellipsoid-like tumour masks, the second shifted and bumpier."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    r = np.sqrt(((grid / np.array([0.35, 0.3, 0.4])[:, None, None, None]) ** 2).sum(0))
    noise = 0.08 * rng.standard_normal(shape)
    return r + noise < 1.0, np.roll(r, 3, axis=0) < 1.05


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller inputs")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from threefold.medical.deformation import jacobian_determinant
    from threefold.medical.overlap import hausdorff95
    from threefold.medical.similarity import ssim3d
    from threefold.pipelines.metrics.segmentation import confusion_matrix

    q = args.quick
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows: list[tuple[str, str, float, float]] = []  # task, implementation, seconds, ours seconds

    def add(task: str, ours: dict[str, float], refs: dict[str, Callable[[], object]]) -> None:
        base = ours["cpu"]
        for dev, t in ours.items():
            rows.append((task, f"threefold ({dev})", t, base))
        for name, fn in refs.items():
            rows.append((task, name, _time(fn, args.repeats), base))

    # confusion matrix
    n, c = (120_000 if q else 1_200_000), 20
    rng = np.random.default_rng(0)
    tgt = rng.integers(-1, c, n)
    prd = np.where(rng.random(n) < 0.8, np.maximum(tgt, 0), rng.integers(0, c, n))

    def np_ioueval() -> None:
        conf = np.zeros((c + 1, c + 1), dtype=np.int64)
        np.add.at(conf, (prd + 1, tgt + 1), 1)

    ours = {}
    for dev in devices:
        p, t = torch.from_numpy(prd).to(dev), torch.from_numpy(tgt).to(dev)
        ours[dev] = _time(lambda: confusion_matrix(p, t, c), args.repeats, sync=dev == "cuda")
    add(f"confusion matrix, {n} points, {c} classes", ours, {"np_ioueval np.add.at": np_ioueval})

    # HD95
    shape = (120, 120, 78) if q else (240, 240, 155)
    a, b = _masks(shape, 0)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    refs: dict[str, Callable[[], object]] = {}
    try:
        from monai.metrics import HausdorffDistanceMetric

        monai_hd = HausdorffDistanceMetric(include_background=True, percentile=95)
        refs["MONAI HausdorffDistanceMetric"] = lambda: monai_hd(ta[None, None].float(), tb[None, None].float())
    except ImportError:
        pass
    add(f"HD95 {shape}", {"cpu": _time(lambda: hausdorff95(ta, tb), args.repeats)}, refs)

    # SSIM
    side = 64 if q else 128
    x = np.random.default_rng(1).random((side,) * 3)
    y = np.clip(x + 0.1 * np.random.default_rng(2).standard_normal(x.shape), 0, 1)
    ours = {}
    for dev in devices:
        tx, ty = (torch.from_numpy(v).float().to(dev) for v in (x, y))
        ours[dev] = _time(lambda: ssim3d(tx, ty, data_range=1.0), args.repeats, sync=dev == "cuda")
    refs = {}
    try:
        from skimage.metrics import structural_similarity

        refs["scikit-image structural_similarity (float64)"] = lambda: structural_similarity(x, y, data_range=1.0)
    except ImportError:
        pass
    add(f"SSIM3D {side}^3 float32", ours, refs)

    # Jacobian
    jshape = (80, 96, 112) if q else (160, 192, 224)
    disp = 0.5 * np.random.default_rng(3).standard_normal((3, *jshape)).astype(np.float32)

    def numpy_jacobian() -> None:
        grads = np.stack([np.stack(np.gradient(disp[i]), axis=0) for i in range(3)])
        np.linalg.det(np.moveaxis(grads, (0, 1), (-2, -1)) + np.eye(3, dtype=np.float32))

    ours = {}
    for dev in devices:
        td = torch.from_numpy(disp).to(dev)
        ours[dev] = _time(lambda: jacobian_determinant(td), args.repeats, sync=dev == "cuda")
    add(f"Jacobian determinant {jshape} float32", ours, {"numpy.gradient + numpy.linalg.det": numpy_jacobian})

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    cpu = f"{platform.machine()} {platform.processor() or ''}".strip()
    print(f"machine: {cpu} | CPU threads {torch.get_num_threads()} | GPU {gpu}")
    print(f"python {platform.python_version()} | torch {torch.__version__} | numpy {np.__version__}")
    print(f"{'task':<48} {'implementation':<46} {'seconds':>9} {'time / ours(cpu)':>17}")
    for task, impl, t, base in rows:
        print(f"{task:<48} {impl:<46} {t:>9.4f} {t / base:>17.2f}")


if __name__ == "__main__":
    main()
