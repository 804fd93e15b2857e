"""Multi-GPU training throughput of four pipelines through the real engine (issue #12 §1).

    python benchmarks/scaling.py                                # 2 GPUs: 4 pipelines x 1/2 GPUs x bf16/fp32
    python benchmarks/scaling.py --pipelines brats-multilevel --devices 1 2 --precisions bf16-mixed
    python benchmarks/scaling.py --device cpu --smoke           # CPU, tiny models: checks every path runs

Each configuration (pipeline, GPU count, precision) is one ``python benchmarks/scaling.py --worker
SPEC`` process that resolves the pipeline's shipped config with the overrides below and calls its
``run`` with a :class:`~threefold.pipelines.engine.RunContext`: the same ``RunContext.fit`` and
Lightning ``Trainer`` as ``threefold run P trainer.devices=N trainer.strategy=ddp``, Lightning's DDP
launcher starting the other ranks (NCCL on GPUs, gloo on CPU), ``trainer.sync_batchnorm`` left to its
automatic rule. A callback times the training steps and ends the processes when the window is done
(the pipelines' evaluation is not part of a training benchmark).

Timing: after ``--warmup`` steps, CUDA events recorded at the end of each training step on each rank
(no synchronisation inside the window) give the wall time between consecutive step ends; intervals
that cross an epoch boundary (checkpoint, loader restart) are left out, so the window measures
steady-state steps including data loading. Throughput = samples per step per GPU x GPUs x timed
steps / the slowest rank's timed seconds. Scaling efficiency = throughput(2 GPUs) / (2 x throughput(1
GPU)) at the same per-GPU batch and precision. Peak memory = ``torch.cuda.max_memory_allocated`` of
each rank over the whole run (warm-up included), gathered to rank 0.

Sizes: the papers' per-GPU batches and models (``SIZES``): RAPiD-Seg full-width MinkUNet34 at 0.05 m,
batch 2 of ~118k-point scans (the synthetic LiDAR sample, sequence files repeated under the training
sequences by symlinks so that epochs are long; RAPiD rows cached on first use; stage 1 skipped:
``ae.epochs=0``, the frozen autoencoder still runs); NestedMorph 64³ pairs, batch 1 (embedded
phantom pairs, generated once per process and kept in memory); BraTS Isensee U-Net (16 filters, 5
levels) + multi-level head, batch 2 of 4 x 128³ patches (brain phantoms written once as BraTS 2018
NIfTI); Uni-3DAR 12 x 768, batch 256 molecules (the embedded 419 QM9-like molecules, repeated).

Data: ``--data-dir`` (default ``.scratch/scaling-data``) holds ``qm9_like_419.xyz`` (written where
RDKit is installed: ``python benchmarks/scaling.py --write-data``) and, extracted or extractable,
the LiDAR sample ``lidar-sample/`` (``--lidar-tar``, default ``.scratch/lidar-sample.tar.xz``). The
brain phantoms and the repeated LiDAR / molecule sets are built there at the first run.

Output: one line per configuration as it finishes (partial results survive a timeout), then the
markdown table with the machine, versions and the command; ``--json`` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PIPELINES = ("semantickitti-rapidseg", "hcp-nestedmorph", "brats-multilevel", "qm9-uni3dar")
# NVLink multicast stays off on the shared GPU hosts (KINDS.md); set for every process started here
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

COMMON = ["trainer.deterministic=false", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=50",
          "trainer.max_epochs=1000", "trainer.strategy=ddp"]

# pipeline -> (per-GPU batch, overrides at the papers' sizes, overrides for --smoke, warm-up, timed steps)
SIZES: dict[str, dict] = {
    "semantickitti-rapidseg": dict(
        batch=2,
        paper=["ae.epochs=0", "trainer.num_workers=4"],  # shipped config: full width, 0.05 m voxels
        smoke=["ae.epochs=0", "model.voxel_size=0.4", "model.width=0.125", "model.latents=2", "model.dim=8",
               "model.inner_dim=4", "model.stream_channels=8", "augment.crop=20"],
        warmup=5, steps=15, smoke_steps=2),
    "hcp-nestedmorph": dict(
        batch=1,
        paper=["data.size=64", "data.train_pairs=8", "trainer.limit_val_batches=0", "trainer.num_workers=0"],
        smoke=["data.size=32", "data.train_pairs=6", "trainer.limit_val_batches=0"],
        warmup=10, steps=30, smoke_steps=2),
    "brats-multilevel": dict(
        batch=2,
        paper=["model.base_filters=16", "model.levels=5", "patch.size=[128,128,128]", "patch.per_epoch=400",
               "trainer.num_workers=6", "n_folds=5"],
        smoke=["model.base_filters=4", "model.levels=4", "patch.size=[32,32,32]", "patch.per_epoch=16"],
        warmup=8, steps=40, smoke_steps=2),
    "qm9-uni3dar": dict(
        batch=256,
        paper=["model.d_model=768", "model.layers=12", "model.heads=12", "trainer.num_workers=4",
               "trainer.limit_val_batches=0", "heldout_fraction=0.01"],
        smoke=["trainer.limit_val_batches=0", "heldout_fraction=0.01"],
        warmup=5, steps=20, smoke_steps=2),
}
SMOKE_BATCH = {"semantickitti-rapidseg": 1, "hcp-nestedmorph": 1, "brats-multilevel": 2, "qm9-uni3dar": 16}


# ------------------------------------------------------------------------------------------- data


def _lidar_root(data_dir: Path, lidar_tar: Path, copies: int) -> Path:
    """A SemanticKITTI root whose training sequences (00-07, 09, 10) each hold ``copies`` symlinks
    cycling over the sample's training scans, and 08 the sample's validation scans."""
    sample = data_dir / "lidar-sample"
    if not sample.is_dir():
        if not lidar_tar.is_file():
            raise SystemExit(f"LiDAR sample missing: neither {sample} nor {lidar_tar} exists")
        subprocess.run(["tar", "xJf", str(lidar_tar), "-C", str(data_dir)], check=True)
    root = data_dir / f"lidar-repeated-{copies}"
    marker = root / ".complete"
    if marker.is_file():
        return root
    train = sorted(p for seq in sorted((sample / "sequences").iterdir()) if seq.name != "08"
                   for p in (seq / "velodyne").glob("*.bin"))
    if not train:
        raise SystemExit(f"{sample}: no training scans under sequences/XX/velodyne")
    for seq in ("00", "01", "02", "03", "04", "05", "06", "07", "09", "10", "08"):
        for sub in ("velodyne", "labels"):
            (root / "sequences" / seq / sub).mkdir(parents=True, exist_ok=True)
        sources = sorted((sample / "sequences" / "08" / "velodyne").glob("*.bin")) if seq == "08" else \
            [train[i % len(train)] for i in range(copies)]
        for i, src in enumerate(sources):
            for sub, suffix, s in (("velodyne", ".bin", src), ("labels", ".label", src.parent.parent / "labels" / f"{src.stem}.label")):
                dst = root / "sequences" / seq / sub / f"{i:06d}{suffix}"
                if not dst.is_symlink():
                    dst.symlink_to(s.resolve())
    marker.write_text("ok\n")
    return root


def _brats_root(data_dir: Path, cases: int, shape: int) -> Path:
    from threefold.datasets.brain_phantoms import write_brats2018_phantoms

    root = data_dir / f"brats-phantoms-{cases}x{shape}"
    if not (root / ".complete").is_file():
        write_brats2018_phantoms(root, cases, seed=0, shape=(shape,) * 3)
        (root / ".complete").write_text("ok\n")
    return root


def _molecules(data_dir: Path, repeats: int) -> Path:
    src = data_dir / "qm9_like_419.xyz"
    if not src.is_file():
        raise SystemExit(f"{src} missing: write it where RDKit is installed with `python benchmarks/scaling.py --write-data`")
    out = data_dir / f"qm9_like_x{repeats}.xyz"
    if not out.is_file():
        text = src.read_text()
        text = text if text.endswith("\n") else text + "\n"
        tmp = out.with_suffix(".tmp")
        tmp.write_text(text * repeats)
        os.replace(tmp, out)
    return out


def write_data(data_dir: Path) -> None:
    """The embedded 419 QM9-like molecules (RDKit conformers) as multi-frame XYZ, for GPU hosts without RDKit."""
    from threefold.pipelines.uni3dar import load_molecules

    data_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        load_molecules(None, Path(tmp))
        os.replace(Path(tmp) / "data" / "embedded_qm9_like.xyz", data_dir / "qm9_like_419.xyz")
    print(f"written {data_dir / 'qm9_like_419.xyz'}")


def pipeline_data(name: str, data_dir: Path, lidar_tar: Path, smoke: bool) -> tuple[str | None, list[str]]:
    """(--data path or None, extra overrides) of one pipeline; builds the data on first use."""
    if name == "semantickitti-rapidseg":
        root = _lidar_root(data_dir, lidar_tar, 4 if smoke else 40)
        return str(root), [f"features.cache_dir={data_dir / 'rapid-cache'}"]
    if name == "brats-multilevel":
        return str(_brats_root(data_dir, 10 if smoke else 20, 40 if smoke else 96)), []
    if name == "qm9-uni3dar":
        return str(_molecules(data_dir, 2 if smoke else 60)), []
    return None, []  # hcp-nestedmorph: the embedded phantom pairs


# ----------------------------------------------------------------------------------------- worker


def _throughput_callback(spec: dict):
    import lightning as L
    import torch

    class Throughput(L.Callback):
        """Times steady-state training steps; writes the result on rank 0 and ends every rank."""

        def __init__(self) -> None:
            self.batches = 0
            self.prev: tuple[int, int, object] | None = None  # (epoch, batch_idx, marker)
            self.pairs: list[tuple[object, object]] = []

        def _marker(self, device: torch.device):
            if device.type == "cuda":
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                return ev
            return time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.batches += 1
            mark = self._marker(pl_module.device)
            epoch = trainer.current_epoch
            if (self.batches > spec["warmup"] and self.prev is not None and self.prev[0] == epoch
                    and self.prev[1] == batch_idx - 1):
                self.pairs.append((self.prev[2], mark))
            self.prev = (epoch, batch_idx, mark)
            if len(self.pairs) >= spec["steps"]:
                self._finish(trainer, pl_module)

        def _finish(self, trainer, pl_module) -> None:
            device = pl_module.device
            if device.type == "cuda":
                torch.cuda.synchronize()
                seconds = sum(a.elapsed_time(b) for a, b in self.pairs) / 1000.0
                peak, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
            else:
                seconds, peak, reserved = sum(b - a for a, b in self.pairs), 0, 0
            synced = any(isinstance(m, torch.nn.SyncBatchNorm) for m in pl_module.modules())
            mine = torch.tensor([seconds, len(self.pairs), peak, reserved], dtype=torch.float64, device=device)
            every = trainer.strategy.all_gather(mine).reshape(-1, 4).cpu()
            if trainer.is_global_zero:
                world = int(trainer.world_size)
                slowest = float(every[:, 0].max())
                samples = spec["batch"] * world * len(self.pairs)
                result = {
                    "ok": True, "world_size": world, "timed_steps": len(self.pairs), "warmup_steps": spec["warmup"],
                    "seconds": slowest, "samples_per_s": samples / slowest, "step_ms": 1000.0 * slowest / len(self.pairs),
                    "peak_mem_gib": [float(x) / 2**30 for x in every[:, 2]],
                    "reserved_gib": [float(x) / 2**30 for x in every[:, 3]],
                    "sync_batchnorm": synced, "precision": str(trainer.precision),
                    "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                }
                Path(spec["out"]).write_text(json.dumps(result))
            trainer.strategy.barrier()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)  # every rank: the timed window is over, the pipeline's evaluation is not measured

    return Throughput()


def worker(spec: dict) -> None:
    """One configuration; Lightning's DDP launcher re-runs this command line for the other ranks."""
    from threefold.pipelines.config import resolve_config
    from threefold.pipelines.engine import RunContext
    from threefold.pipelines.registry import get_pipeline

    pipe = get_pipeline(spec["pipeline"])
    cfg = resolve_config(pipe.config_class, pipe.name, overrides=spec["overrides"])
    run_dir = Path(spec["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    data = Path(spec["data"]) if spec["data"] else None
    ctx = RunContext(pipe.name, run_dir, cfg.trainer, data, False, [_throughput_callback(spec)])
    pipe.run(cfg, ctx)
    # the callback exits when its window is full; getting here means the run ended first
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0:
        Path(spec["out"]).write_text(json.dumps({"ok": False, "error": "training ended before the timed window was full"}))


# ----------------------------------------------------------------------------------------- parent


def run_one(spec: dict, timeout: float, env: dict) -> dict:
    """Start a worker in its own session (so a timeout kills the DDP children too) and read its result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        return {"ok": False, "error": f"timeout after {timeout:.0f} s", "wall_s": time.perf_counter() - t0, "log": log[-3000:]}
    out = Path(spec["out"])
    result = json.loads(out.read_text()) if out.is_file() else {"ok": False, "error": f"exit code {proc.returncode}, no result"}
    result["wall_s"] = time.perf_counter() - t0
    if not result.get("ok"):
        result["log"] = log[-3000:]
    return result


def _versions() -> str:
    import lightning
    import torch

    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}", f"lightning {lightning.__version__}"]
    for mod in ("spconv", "monai"):
        try:
            parts.append(f"{mod} {__import__(mod).__version__}")
        except Exception:  # noqa: BLE001 — report what is there
            parts.append(f"{mod} absent")
    if torch.cuda.is_available():
        parts.append(f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")
    return ", ".join(parts)


def _fmt_mem(r: dict) -> str:
    mem = r.get("peak_mem_gib") or []
    return " / ".join(f"{m:.2f}" for m in mem) if any(mem) else "n/a (CPU)"


def table(rows: list[dict]) -> str:
    thr = {(r["pipeline"], r["precision"], r["devices"]): r["samples_per_s"] for r in rows if r.get("ok")}
    lines = ["| pipeline | precision | GPUs | batch / GPU | samples/s | step (ms) | efficiency | peak mem / GPU (GiB) | sync BN |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r.get("ok"):
            lines.append(f"| {r['pipeline']} | {r['precision']} | {r['devices']} | {r['batch']} | failed: {r.get('error', '?')} | | | | |")
            continue
        eff = ""
        one = thr.get((r["pipeline"], r["precision"], 1))
        if r["devices"] > 1 and one:
            eff = f"{r['samples_per_s'] / (r['devices'] * one):.2f} ({r['samples_per_s'] / one:.2f}x)"
        lines.append(f"| {r['pipeline']} | {r['precision']} | {r['devices']} | {r['batch']} | {r['samples_per_s']:.2f} | "
                     f"{r['step_ms']:.1f} | {eff} | {_fmt_mem(r)} | {'yes' if r['sync_batchnorm'] else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--pipelines", nargs="+", default=list(PIPELINES), choices=PIPELINES)
    p.add_argument("--devices", nargs="+", type=int, default=[1, 2])
    p.add_argument("--precisions", nargs="+", default=["bf16-mixed", "32-true"])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--smoke", action="store_true", help="tiny models and 2 timed steps (checks the paths, CPU)")
    p.add_argument("--steps-scale", type=float, default=1.0, help="multiply the warm-up and timed steps")
    p.add_argument("--timeout", type=float, default=75.0, help="seconds per configuration (DDP start-up included)")
    p.add_argument("--budget", type=float, default=480.0, help="skip the configurations left after this many seconds")
    p.add_argument("--data-dir", type=Path, default=REPO / ".scratch" / "scaling-data")
    p.add_argument("--lidar-tar", type=Path, default=REPO / ".scratch" / "lidar-sample.tar.xz")
    p.add_argument("--json", type=Path, help="write the result rows here")
    p.add_argument("--write-data", action="store_true", help="write qm9_like_419.xyz into --data-dir (needs RDKit) and exit")
    p.add_argument("--extra", nargs="*", default=[], help="more config overrides for every run")
    args = p.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    if args.write_data:
        write_data(args.data_dir)
        return 0

    t_start = time.perf_counter()
    args.data_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **SAFE_ENV}
    env.setdefault("OMP_NUM_THREADS", "1" if args.device == "cpu" else "4")
    command = "python benchmarks/scaling.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"# threefold scaling benchmark\n\nmachine: {platform.node()}, {os.cpu_count()} CPU cores; {_versions()}\n"
          f"command: `{command}`\n", flush=True)
    accel = "gpu" if args.device == "cuda" else "cpu"
    configs = [(pipe, prec, n) for prec in args.precisions for pipe in args.pipelines for n in args.devices]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="scaling-") as tmp:
        for k, (pipe, prec, n) in enumerate(configs):
            size = SIZES[pipe]
            batch = SMOKE_BATCH[pipe] if args.smoke else size["batch"]
            row = {"pipeline": pipe, "precision": prec, "devices": n, "batch": batch}
            left = args.budget - (time.perf_counter() - t_start)
            if left < 20:
                row.update(ok=False, error="skipped: --budget spent")
                rows.append(row)
                print(f"{pipe:24s} {prec:10s} {n} GPU: skipped (budget)", flush=True)
                continue
            if args.device == "cpu" and pipe == "semantickitti-rapidseg" and prec.startswith("bf16"):
                # spconv's autocast hook casts sparse convs to float16 on CUDA only; on CPU they get bf16
                # features, for which spconv 2.3 has no kernels (geometry/rapid/rapidseg.py, PRECISIONS)
                row.update(ok=False, error="skipped: spconv has no bfloat16 CPU kernels")
                rows.append(row)
                print(f"{pipe:24s} {prec:10s} {n} GPU: skipped (spconv CPU bf16)", flush=True)
                continue
            data, extra = pipeline_data(pipe, args.data_dir, args.lidar_tar, args.smoke)
            warmup = 1 if args.smoke else max(2, round(size["warmup"] * args.steps_scale))
            steps = size["smoke_steps"] if args.smoke else max(3, round(size["steps"] * args.steps_scale))
            overrides = [*COMMON, *(size["smoke"] if args.smoke else size["paper"]), *extra,
                         f"trainer.batch_size={batch}", f"trainer.devices={n}", f"trainer.accelerator={accel}",
                         f"trainer.precision={prec}", *args.extra]
            spec = {"pipeline": pipe, "overrides": overrides, "data": data, "run_dir": f"{tmp}/run{k}",
                    "out": f"{tmp}/result{k}.json", "warmup": warmup, "steps": steps, "batch": batch}
            result = run_one(spec, min(args.timeout, max(left, 20)), env)
            row.update(result)
            row["overrides"] = overrides
            rows.append(row)
            if row.get("ok"):
                print(f"{pipe:24s} {prec:10s} {n} GPU: {row['samples_per_s']:9.2f} samples/s, step {row['step_ms']:8.1f} ms, "
                      f"peak {_fmt_mem(row)} GiB, sync BN {row['sync_batchnorm']}, wall {row['wall_s']:.0f} s", flush=True)
            else:
                print(f"{pipe:24s} {prec:10s} {n} GPU: FAILED {row.get('error')} (wall {row.get('wall_s', 0):.0f} s)\n"
                      f"{row.get('log', '')[-1500:]}", flush=True)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1))
    print("\n" + table(rows))
    print(f"\nper-GPU batch and model: see SIZES in benchmarks/scaling.py; warm-up/timed steps x{args.steps_scale}; "
          f"total {time.perf_counter() - t_start:.0f} s", flush=True)
    return 0 if all(r.get("ok") or r.get("error", "").startswith("skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
