"""Items/s of ``threefold prepare`` with 1 and 2 worker processes on CPU (issue #12 §2).

Each step runs on generated data, into a fresh cache folder per worker count (nothing skipped):

- ``semantickitti``: synthetic LiDAR scans (:mod:`threefold.datasets.lidar_synthetic`, 0.16° azimuth
  step ≈ 118k points per scan, the size of a real HDL-64E scan); items = cache entries (R- and
  C-RAPiD rows of each scan);
- ``brats``: synthetic brain phantoms in the BraTS 2018 layout (:mod:`threefold.datasets.brain_phantoms`);
  items = cases (read 4 modalities + seg, crop, z-score, write);
- ``qm9``: the embedded QM9-like molecules written as ``dsgdb9nsd_*.xyz`` originals, repeated to
  ``--molecules``; items = shards of ``--shard-size`` molecules (parse + tokenize + write).

Wall time includes starting the spawned workers (what a user waits for); CPU s/item is the user +
system time of this process and its workers per item, which shows whether a second worker added
work (start-up imports) or only waited for a core on a shared machine; "load" is the 1-minute load
average just before the run. Prints a markdown table with the machine and versions::

    OMP_NUM_THREADS=1 python benchmarks/prepare.py [--scans 8] [--cases 8] [--brats-size 96] [--molecules 4000]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np


def _machine() -> str:
    import torch

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, load average {load}; "
            f"python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}")


def _write_qm9(root: Path, n: int) -> Path:
    """QM9 originals (Ramakrishnan et al. 2014, Table 2) of the embedded molecules, repeated to ``n`` files."""
    from threefold.datasets.molecule_samples import embedded_molecules

    symbols = {1: "H", 6: "C", 7: "N", 8: "O", 9: "F"}
    mols = [m for m in embedded_molecules() if set(np.asarray(m["numbers"]).tolist()) <= set(symbols)]
    props = "\t".join(["0.5"] * 15)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        m = mols[i % len(mols)]
        atoms = [f"{symbols[int(z)]}\t{x:.10f}\t{y:.10f}\t{w:.10f}\t0.0"
                 for z, (x, y, w) in zip(m["numbers"], np.asarray(m["positions"], np.float64))]
        text = "\n".join([str(len(atoms)), f"gdb {i + 1}\t{props}\t", *atoms, "100.0", "C\tC", "InChI=1S\tInChI=1S"])
        (root / f"dsgdb9nsd_{i + 1:06d}.xyz").write_text(text + "\n")
    return root


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scans", type=int, default=8, help="synthetic LiDAR scans (2 entries each)")
    ap.add_argument("--cases", type=int, default=8, help="BraTS phantom cases")
    ap.add_argument("--brats-size", type=int, default=96, help="phantom grid edge, voxels")
    ap.add_argument("--molecules", type=int, default=4000, help="QM9 files")
    ap.add_argument("--shard-size", type=int, default=250, help="molecules per QM9 cache shard")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--steps", default="semantickitti,brats,qm9")
    ap.add_argument("--keep", type=Path, help="keep the generated data here (default: a temp folder)")
    args = ap.parse_args(argv)

    from threefold.datasets.brain_phantoms import write_brats2018_phantoms
    from threefold.datasets.brats_prepare import prepare_brats_cases
    from threefold.datasets.lidar_synthetic import generate_lidar_sample
    from threefold.geometry.rapid.prepare import prepare_rapid_features
    from threefold.science.qm9_tokens import prepare_qm9_tokens

    work = args.keep or Path(tempfile.mkdtemp(prefix="tf-prepare-bench-"))
    steps = args.steps.split(",")
    data = {}
    if "semantickitti" in steps:
        half = max(1, args.scans // 2)
        data["semantickitti"] = (generate_lidar_sample(work / "kitti", sequences=("00", "08"), scans_per_sequence=half,
                                                       azimuth_step_deg=0.16), prepare_rapid_features, {},
                                 f"{2 * half} scans, ~118k points", "entry")
    if "brats" in steps:
        root = work / "brats"
        if not root.is_dir():
            write_brats2018_phantoms(root, args.cases, seed=0, shape=(args.brats_size,) * 3)
        data["brats"] = (root, prepare_brats_cases, {}, f"{args.cases} phantom cases {args.brats_size}³ x 4 modalities",
                         "case")
    if "qm9" in steps:
        root = work / "qm9"
        if not root.is_dir():
            _write_qm9(root, args.molecules)
        data["qm9"] = (root, prepare_qm9_tokens, {"shard_size": args.shard_size},
                       f"{args.molecules} molecules in shards of {args.shard_size}", "shard")

    workers = [int(w) for w in args.workers.split(",")]
    print(f"Machine: {_machine()}")
    print(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}\n")
    header = ["step", "data", "items"] + [f"{w} worker{'s' * (w > 1)}: wall s, items/s, CPU s/item, load"
                                          for w in workers] + [f"speed-up {w}/{workers[0]}" for w in workers[1:]]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for step, (root, fn, kw, what, unit) in data.items():
        rates, cells, items = [], [], 0
        for w in workers:
            out = work / f"cache-{step}-{w}"
            shutil.rmtree(out, ignore_errors=True)
            load = os.getloadavg()[0]
            t0 = os.times()
            counts = fn(root, out, workers=w, progress=False, **kw)
            t1 = os.times()  # children's times count once the pool has joined them
            cpu = sum(t1[:4]) - sum(t0[:4])
            assert counts["skipped"] == 0
            items = counts["computed"]
            rates.append(counts["items_per_s"])
            extra = f" ({counts['molecules'] / counts['seconds']:.0f} molecules/s)" if step == "qm9" else ""
            cells.append(f"{counts['seconds']:.2f} s, {counts['items_per_s']:.2f} {unit}/s{extra}, "
                         f"{cpu / max(items, 1):.3f}, {load:.1f}")
            shutil.rmtree(out, ignore_errors=True)
        ratios = [f"{r / rates[0]:.2f}x" for r in rates[1:]]
        print("| " + " | ".join([step, what, str(items), *cells, *ratios]) + " |")
    print(f"\nload average after: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
