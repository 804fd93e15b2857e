"""RAPiD-Seg ablation on the synthetic sample: full-width R-RAPiD-Seg vs MinkUNet34, same budget, 3 seeds.

    python benchmarks/rapidseg_ablation.py --data SAMPLE_ROOT [--epochs 16 --ae-epochs 3 --seeds 0 1 2]

``SAMPLE_ROOT`` is a pre-generated synthetic sample (the GPU machine has no open3d)::

    python -c "from threefold.datasets.lidar_synthetic import generate_lidar_sample as g; g('lidar-sample')"

Both pipelines run through ``threefold run`` with their shipped configs (full width, 0.05 m voxels,
all augmentations) and the same budget overrides: ``--epochs`` segmentation epochs of the 12 training
scans (batch 2), AdamW ``--lr`` with 1 warm-up epoch and cosine decay (the paper's 100-epoch SGD
recipe does not fit a minutes budget), ``--ae-epochs`` autoencoder epochs for RAPiD-Seg (stage 1).
The RAPiD rows are computed once into a shared cache. Prints the budget, per-run wall times and a
markdown table of mean ± std (over seeds) of the per-class IoU and mIoU on sequence 08 (the
classes present in its ground truth; mIoU under both ``absent`` conventions). Sized for ≤ 9 minutes
on one H100 (estimate: ~0.3 s per full-width step of two 118k-point scans, 96 steps per run, six runs);
each run's wall time is printed as it finishes, so lower ``--epochs`` if the first runs are slower.

On a machine with several GPUs, split the six runs over processes (one per GPU, ``CUDA_VISIBLE_DEVICES``)
with ``--pipelines`` / ``--seeds`` and ``--json PART.json``, then print the table from all parts::

    python benchmarks/rapidseg_ablation.py --data SAMPLE --pipelines semantickitti-minkunet --seeds 0 --json p0.json
    ...
    python benchmarks/rapidseg_ablation.py --data SAMPLE --table p0.json p1.json ...
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from threefold.pipelines.cli import main as cli

PIPELINES = ("semantickitti-minkunet", "semantickitti-rapidseg")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--ae-epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--runs-dir", default="")
    ap.add_argument("--extra", nargs="*", default=[], help="further key=value overrides for both pipelines")
    ap.add_argument("--pipelines", nargs="+", default=list(PIPELINES), choices=PIPELINES)
    ap.add_argument("--json", default="", help="write this process's per-run metrics here")
    ap.add_argument("--table", nargs="+", default=[], help="print the table from these --json parts; train nothing")
    args = ap.parse_args()
    if args.table:
        results: dict[str, list[dict]] = {}
        for part in args.table:
            for pipeline, runs in json.loads(Path(part).read_text()).items():
                results.setdefault(pipeline, []).extend(runs)
        print_table(args.data, results)
        return
    runs = Path(args.runs_dir or tempfile.mkdtemp(prefix="rapidseg-ablation-"))
    cache = runs / "feature-cache"
    budget = [f"trainer.max_epochs={args.epochs}", "trainer.batch_size=2", "optim.name=adamw", f"optim.lr={args.lr}",
              "optim.warmup_epochs=1", f"ae.epochs={args.ae_epochs}", f"features.cache_dir={cache}",
              "trainer.enable_progress_bar=false", *args.extra]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    print(f"device: {device} | torch {torch.__version__}")
    print(f"budget (both models): {' '.join(budget)}")
    results: dict[str, list[dict]] = {}
    t_all = time.perf_counter()
    for pipeline in args.pipelines:
        for seed in args.seeds:
            t = time.perf_counter()
            out = runs / pipeline / f"seed{seed}"
            code = cli(["run", pipeline, "--data", args.data, "--runs-dir", str(out), f"seed={seed}", *budget])
            if code != 0:
                raise SystemExit(f"{pipeline} seed {seed} failed with exit code {code}")
            (run,) = (out / pipeline).iterdir()
            metrics = json.loads((run / "metrics.json").read_text())
            results.setdefault(pipeline, []).append({**metrics, "seed": seed})
            if args.json:
                Path(args.json).write_text(json.dumps(results))
            print(f"{pipeline} seed {seed}: mIoU[absent=skip] {metrics['mIoU[absent=skip]']:.4f}, "
                  f"{metrics['global_step']} steps, {time.perf_counter() - t:.0f} s", flush=True)
    print(f"total wall time: {time.perf_counter() - t_all:.0f} s")
    if set(results) == set(PIPELINES):
        print_table(args.data, results)


def print_table(data: str, results: dict[str, list[dict]]) -> None:
    """Mean ± std over seeds of mIoU and per-class IoU (classes present in the val ground truth)."""
    from threefold.datasets.semantickitti import SEMANTICKITTI_CLASSES, SemanticKITTI

    val = SemanticKITTI(data, "val")
    present = sorted({int(c) for i in range(len(val)) for c in val[i]["label"].unique().tolist() if c >= 0})
    classes = [f"IoU/{SEMANTICKITTI_CLASSES[c]}" for c in present]
    keys = ["mIoU[absent=skip]", "mIoU[absent=zero]", *classes]

    def cell(pipeline: str, key: str) -> str:
        v = [r[key] * 100 for r in results[pipeline]]
        return f"{statistics.mean(v):.2f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.2f}"

    print()
    seeds = {p: sorted(r["seed"] for r in runs) for p, runs in results.items()}
    print(f"| metric (val 08, %, mean ± std over seeds {seeds[PIPELINES[0]]}) | MinkUNet34 | R-RAPiD-Seg |")
    print("|---|---|---|")
    for key in keys:
        print(f"| {key} | {cell('semantickitti-minkunet', key)} | {cell('semantickitti-rapidseg', key)} |")


if __name__ == "__main__":
    main()
