"""Multi-GPU training throughput of four pipelines through the real engine (issue #12 §1).

    python benchmarks/scaling.py --prepare-only                 # build every data set once (CPU only)
    python benchmarks/scaling.py --precisions bf16-mixed        # 4 pipelines x 1/2 GPUs, bf16 (one call)
    python benchmarks/scaling.py --precisions 32-true           # the same in fp32 (another call)
    python benchmarks/scaling.py --device cpu --smoke           # CPU, tiny models: checks every path runs

Engine. Each configuration (pipeline, GPU count, precision) is one ``python benchmarks/scaling.py
--worker SPEC`` process that resolves the pipeline's shipped config with the overrides of ``SIZES``
and calls its ``run`` with a :class:`~threefold.pipelines.engine.RunContext`: the same
``RunContext.fit`` and Lightning ``Trainer`` as ``threefold run P trainer.devices=N
trainer.strategy=ddp``, Lightning's DDP launcher starting the other ranks (NCCL on GPUs, gloo on
CPU), ``trainer.sync_batchnorm`` left to its automatic rule; the 1-GPU baseline is a plain
single-device run (``trainer.strategy=auto``). A callback times the training steps and ends the
processes when the window is done (the pipelines' evaluation is not part of a training benchmark).

Data, prepared once. Everything the runs read is built before the first timed configuration by the
prepare step (``--prepare-only`` runs it alone; a normal run starts with it and skips what is there)
under ``--data-dir`` (default ``.scratch/scaling-build``, ~500 MB: never carried to a device but built
there; the only inputs are ``--lidar-tar`` and ``--molecules``): the LiDAR sample extracted from
``--lidar-tar`` with its training scans repeated by symlinks (``lidar-repeated-40``) and its R-RAPiD
rows in ``rapid-cache`` (``threefold prepare semantickitti``'s function; the pipeline reads the cache
through ``features.cache_dir``); 16 brain phantoms of 64³ as BraTS 2018 NIfTI and their crop +
z-score cache (``threefold prepare brats``'s function, read through ``cache_dir``); the 64 NestedMorph
training pairs of the embedded sample as ``.npz`` files; the 419 QM9-like molecules (``--molecules``)
repeated 60 times. Generation runs in a process pool over the machine's cores. The workers only
read: the RAPiD and BraTS caches are checked complete before any run, and the NestedMorph worker
loads the prepared pairs into memory and replaces ``registration_phantom`` (the generator the
pipeline's ``RegistrationPhantoms`` calls) by a lookup of the same arrays (a test checks they are
equal), so no rank generates anything during its warm-up. A missing piece stops the run naming the
file and the ``--prepare-only`` command.

Schedule. The 1-GPU configurations run side by side, one per GPU (``CUDA_VISIBLE_DEVICES``), two at
a time in pipeline order (with one precision per call: rapidseg next to nestedmorph, brats next to
uni3dar); each pipeline's 2-GPU configurations run alone, right after its 1-GPU ones. Why the
neighbour does not distort a 1-GPU number: each process has a whole GPU (no shared SMs or HBM; clocks
and power limits are per GPU); the host's 32 cores are more than the two keep busy (main process with
``OMP_NUM_THREADS=4`` plus 0-6 loader workers each, ``SIZES``: at most ~20 threads), and no more than
the 2-GPU run of the busier of the two pipelines keeps busy on its own; host-to-GPU traffic per step
is small (largest: a BraTS batch, 2 x 4 x 128³ float32 = 67 MB, against tens of GB/s per PCIe link).
Not controlled: NUMA placement (processes are not pinned, as Lightning does not pin DDP ranks
either) and the shared page cache (the data are read-only and small). ``--sequential`` runs the 1-GPU
configurations one at a time, to check the claim on a machine with time to spare.

Timing: after the warm-up steps, CUDA events recorded at the end of each training step on each rank
(no synchronisation inside the window) give the wall time between consecutive step ends; intervals
that cross an epoch boundary (checkpoint, loader restart) are left out (the data sets are sized so
that warm-up and window fit inside one epoch), so the window measures steady-state steps including
data loading. Step time of step i = the slowest rank's interval i; the table gives the median and the
spread (10th-90th percentile) beside the mean. Throughput = samples per step per GPU x GPUs x timed
steps / the slowest rank's timed seconds. Scaling efficiency = throughput(2 GPUs) / (2 x throughput(1
GPU)) at the same per-GPU batch and precision. Peak memory = ``torch.cuda.max_memory_allocated`` of
each rank over the whole run (warm-up included).

Phases and time limits. Every rank stamps ``PHASES`` (process start, imports done, data ready = the
pipeline built its data sets and asks for a trainer, DDP initialised = process group up / trainer set
up, training started, first step, warm-up done, timed done) into a file; the parent prints them in
seconds after the launch for each configuration, and a timeout names the phase each rank was in.
Each configuration's time limit is ``--timeout-factor`` x its printed estimate (``ESTIMATE``: start-up
+ DDP start + first-step set-up + steps; at least ``--min-timeout``), scaled by how the finished
configurations compared with their estimates; a configuration whose estimate no longer fits
``--budget`` is skipped (and said so). The overall estimate is printed before anything starts.

Sizes: the papers' per-GPU batches and models (``SIZES``): RAPiD-Seg full-width MinkUNet34 at 0.05 m,
batch 2 of ~118k-point scans (stage 1 skipped: ``ae.epochs=0``, the frozen autoencoder still runs);
NestedMorph 64³ pairs, batch 1 (64 training pairs, the shipped default); BraTS Isensee U-Net (16
filters, 5 levels) + multi-level head, batch 2 of 4 x 128³ patches (64³ phantoms: patches are
zero-padded beyond the volume, the network's cost is that of 128³; 6 loader workers per GPU);
Uni-3DAR 12 x 768, batch 256 molecules.

Output: one line per configuration as it finishes with its phases (partial results survive a
timeout), then the markdown table with the machine, versions and the command; ``--json`` writes the
rows (with phases, estimates and time limits), ``--log-dir`` keeps every configuration's log.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from threefold.datasets.errors import MissingFileError

REPO = Path(__file__).resolve().parents[1]
PIPELINES = ("semantickitti-rapidseg", "hcp-nestedmorph", "brats-multilevel", "qm9-uni3dar")
PRECISIONS = ("bf16-mixed", "32-true")
# NVLink multicast stays off on the shared GPU hosts (KINDS.md); set for every process started here
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

COMMON = ["trainer.deterministic=false", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=50",
          "trainer.max_epochs=1000"]

# pipeline -> per-GPU batch, overrides at the papers' sizes / for --smoke, warm-up and timed steps.
# Warm-up covers the loader workers' start, cuDNN / spconv algorithm selection and the first-touch
# caches; warm-up + timed steps stay inside one epoch of the 2-GPU run (per rank: rapidseg 400 scans
# / 2 / 2 = 100 steps, nestedmorph 64 / 2 = 32, brats 400 / 2 / 2 = 100, uni3dar ~24.9k / 256 / 2 = 48).
SIZES: dict[str, dict[str, Any]] = {
    "semantickitti-rapidseg": dict(
        batch=2,
        paper=["ae.epochs=0", "trainer.num_workers=4"],  # shipped config: full width, 0.05 m voxels
        smoke=["ae.epochs=0", "model.voxel_size=0.4", "model.width=0.125", "model.latents=2", "model.dim=8",
               "model.inner_dim=4", "model.stream_channels=8", "augment.crop=20"],
        warmup=5, steps=15, smoke_steps=2),
    "hcp-nestedmorph": dict(
        batch=1,
        paper=["data.size=64", "data.train_pairs=64", "trainer.limit_val_batches=0", "trainer.num_workers=0"],
        smoke=["data.size=32", "data.train_pairs=8", "trainer.limit_val_batches=0"],
        warmup=8, steps=20, smoke_steps=2),
    "brats-multilevel": dict(
        batch=2,
        paper=["model.base_filters=16", "model.levels=5", "patch.size=[128,128,128]", "patch.per_epoch=400",
               "trainer.num_workers=6", "n_folds=5"],
        smoke=["model.base_filters=4", "model.levels=4", "patch.size=[32,32,32]", "patch.per_epoch=16"],
        warmup=6, steps=20, smoke_steps=2),
    "qm9-uni3dar": dict(
        batch=256,
        paper=["model.d_model=768", "model.layers=12", "model.heads=12", "trainer.num_workers=4",
               "trainer.limit_val_batches=0", "heldout_fraction=0.01"],
        smoke=["trainer.limit_val_batches=0", "heldout_fraction=0.01"],
        warmup=5, steps=20, smoke_steps=2),
}
SMOKE_BATCH = {"semantickitti-rapidseg": 1, "hcp-nestedmorph": 1, "brats-multilevel": 2, "qm9-uni3dar": 16}

# Planning estimates on one H100 (seconds), for the printed estimates and the derived time limits.
# start: process start to data ready (imports, data indexing); ddp: what a 2-GPU run adds before its
# first step (Lightning's launcher re-runs the script for rank 1, NCCL set-up); first: data ready to
# the end of the first step (model to GPU, loader workers, algorithm selection); step: per training
# step (1 GPU; DDP x1.1). Sources: the one measured configuration (rapidseg bf16 1 GPU: 39 s wall,
# 212 ms/step, docs/gpu-runs/2026-11-26-h100x2-scaling-partial.txt, with the RAPiD rows then computed
# inside the warm-up) and the 1-GPU step times of docs/rapidseg.md, nestedmorph.md, glioma.md (H200)
# and uni3dar.md (batch 64 there: x4 here). The rest are guesses; the run prints the measured phases.
ESTIMATE: dict[str, dict[str, Any]] = {
    "semantickitti-rapidseg": dict(start=22, ddp=25, first=12, step={"bf16-mixed": 0.22, "32-true": 0.30}),
    "hcp-nestedmorph": dict(start=12, ddp=20, first=8, step={"bf16-mixed": 0.06, "32-true": 0.06}),
    "brats-multilevel": dict(start=12, ddp=20, first=15, step={"bf16-mixed": 0.09, "32-true": 0.22}),
    "qm9-uni3dar": dict(start=14, ddp=20, first=10, step={"bf16-mixed": 0.30, "32-true": 0.90}),
}
SMOKE_ESTIMATE = dict(start=5, ddp=4, first=1, step=0.5)  # CPU, tiny models (2-core VM: 4-11 s per configuration)
# prepare step on a fresh 16-32-core host: one estimate per pipeline's data (seconds)
PREPARE_ESTIMATE = {"semantickitti-rapidseg": 12, "hcp-nestedmorph": 15, "brats-multilevel": 12, "qm9-uni3dar": 2}

#: Phases every rank stamps, in order (see the module docstring).
PHASES = ("start", "imported", "data_ready", "ddp_ready", "train_start", "first_step", "warmup_done", "timed_done")

# data sizes (paper runs / --smoke)
LIDAR_COPIES = {False: 40, True: 4}  # scans per training sequence (10 sequences)
BRATS_CASES = {False: (16, 64), True: (10, 40)}  # (cases, voxels per axis)
MOLECULE_REPEATS = {False: 60, True: 2}


class PrepareError(MissingFileError):
    """Prepared data missing or incomplete: the message names the file and the command that builds it."""


# ------------------------------------------------------------------------------------------- data


def _pool_map(fn, jobs: list, workers: int) -> list:
    """``fn`` over ``jobs`` in ``workers`` spawned processes (1: in this process)."""
    if workers <= 1 or len(jobs) <= 1:
        return [fn(j) for j in jobs]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    # spawn: the parent may hold torch / CUDA state that a fork would copy
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=mp.get_context("spawn")) as pool:
        return list(pool.map(fn, jobs))


def _lidar_root(data_dir: Path, lidar_tar: Path, copies: int) -> Path:
    """A SemanticKITTI root whose training sequences (00-07, 09, 10) each hold ``copies`` symlinks
    cycling over the sample's training scans, and 08 the sample's validation scans."""
    sample = data_dir / "lidar-sample"
    if not (sample / "sequences").is_dir():
        if not lidar_tar.is_file():
            raise PrepareError(f"LiDAR sample missing: neither {sample} nor {lidar_tar} exists")
        subprocess.run(["tar", "xJf", str(lidar_tar), "-C", str(data_dir)], check=True)
        if not (sample / "sequences").is_dir():
            raise PrepareError(f"{lidar_tar}: expected a top-level 'lidar-sample/sequences' folder")
    root = data_dir / f"lidar-repeated-{copies}"
    marker = root / ".complete"
    if marker.is_file():
        return root
    train = sorted(p for seq in sorted((sample / "sequences").iterdir()) if seq.name != "08"
                   for p in (seq / "velodyne").glob("*.bin"))
    if not train:
        raise PrepareError(f"{sample}: no training scans under sequences/XX/velodyne")
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


def _rapid_params(cfg: Any) -> dict[str, Any]:
    f = cfg.features
    return dict(n_beams=int(f.n_beams), k=tuple(f.k), ranges=tuple(f.ranges), delta=f.delta, k_max=f.k_max)


def _rapid_missing(root: Path, cache: Path, params: dict[str, Any]) -> list[Path]:
    """Training scans of ``root`` (distinct files behind the symlinks) without an R-RAPiD entry."""
    from threefold.geometry.rapid.prepare import rapid_caches

    r_cache, _ = rapid_caches(cache, params["n_beams"], params["k"], params["ranges"], params["delta"], params["k_max"])
    scans = sorted({p.resolve() for p in (root / "sequences").glob("*/velodyne/*.bin")})
    return [p for p in scans if not r_cache.path(r_cache.key([p])).is_file()]


def _registration_dir(data_dir: Path, cfg: Any) -> Path:
    d = cfg.data
    return data_dir / f"registration-phantoms-{d.size}-seed{cfg.seed}-disp{d.max_displacement_vox:g}"


def _write_registration_pair(job: tuple[str, tuple[int, ...], int, float]) -> str:
    """One embedded NestedMorph pair (the arrays ``RegistrationPhantoms`` uses) as an uncompressed ``.npz``."""
    import numpy as np

    from threefold.datasets.registration_phantoms import registration_phantom

    path, seed, size, disp = job
    ph = registration_phantom(seed, size, disp)
    tmp = Path(path + ".tmp.npz")
    # labels are tissue codes 0..5: uint8 on disk, int64 again when read
    np.savez(tmp, moving=ph["moving"], fixed=ph["fixed"], moving_label=ph["moving_label"].astype(np.uint8),
             fixed_label=ph["fixed_label"].astype(np.uint8), ddf_true=ph["ddf_true"], affine=ph["affine"])
    os.replace(tmp, path)
    return path


def prepare_registration_pairs(folder: Path, size: int, seed: int, max_displacement_vox: float, n_pairs: int,
                               workers: int) -> int:
    """Write the ``n_pairs`` training pairs of ``RegistrationPhantoms(n_pairs, size, seed, ...,
    split="train")`` under ``folder`` with an index ``pairs.json``; returns how many were computed."""
    from threefold.datasets.registration_phantoms import _SPLIT_STREAM

    index = folder / "pairs.json"
    if index.is_file() and json.loads(index.read_text()).get("n_pairs", 0) >= n_pairs:
        return 0
    folder.mkdir(parents=True, exist_ok=True)
    seeds = [(int(seed), _SPLIT_STREAM["train"], i) for i in range(n_pairs)]
    files = [folder / f"pair-{'-'.join(map(str, s))}.npz" for s in seeds]
    jobs = [(str(f), s, int(size), float(max_displacement_vox)) for f, s in zip(files, seeds) if not f.is_file()]
    _pool_map(_write_registration_pair, jobs, workers)
    index.write_text(json.dumps({"size": int(size), "max_displacement_vox": float(max_displacement_vox),
                                 "n_pairs": n_pairs, "pairs": [{"seed": list(s), "file": f.name} for s, f in zip(seeds, files)]},
                                indent=1))
    return len(jobs)


def load_prepared_pairs(folder: Path) -> dict[tuple[int, ...], dict[str, Any]]:
    """The pairs written by :func:`prepare_registration_pairs`, keyed by their seed tuple, as the
    arrays :func:`threefold.datasets.registration_phantoms.registration_phantom` returns (without ``svf``)."""
    import numpy as np

    index = folder / "pairs.json"
    if not index.is_file():
        raise PrepareError(f"{index} missing: run `python benchmarks/scaling.py --prepare-only` with the same "
                           "--data-dir and --pipelines hcp-nestedmorph first")
    meta = json.loads(index.read_text())
    store: dict[tuple[int, ...], dict[str, Any]] = {}
    for entry in meta["pairs"]:
        path = folder / entry["file"]
        if not path.is_file():
            raise PrepareError(f"{path} missing (listed in {index}): rerun --prepare-only")
        with np.load(path) as z:
            store[tuple(entry["seed"])] = {
                "moving": z["moving"], "fixed": z["fixed"], "moving_label": z["moving_label"].astype(np.int64),
                "fixed_label": z["fixed_label"].astype(np.int64), "ddf_true": z["ddf_true"], "affine": z["affine"],
                "size": meta["size"], "max_displacement_vox": meta["max_displacement_vox"]}
    return store


def use_prepared_pairs(folder: Path) -> None:
    """Make the pipeline's ``RegistrationPhantoms`` read the prepared pairs instead of generating them.

    ``RegistrationPhantoms.__getitem__`` calls the module's ``registration_phantom(seed, size,
    max_displacement_vox)``; this replaces that name (in this process only) by a lookup in the pairs
    loaded here, so the pipeline's data path (its in-memory cache, the tensors it builds) is unchanged.
    A pair that was not prepared, or another size, raises instead of being generated."""
    import threefold.datasets.registration_phantoms as rp

    store = load_prepared_pairs(folder)

    def prepared(seed, size: int = 64, max_displacement_vox: float = 4.0) -> dict[str, Any]:
        key = tuple(int(s) for s in seed) if isinstance(seed, (tuple, list)) else (int(seed),)
        ph = store.get(key)
        if ph is None or ph["size"] != size or ph["max_displacement_vox"] != float(max_displacement_vox):
            raise PrepareError(f"{folder}: no prepared registration pair for seed {key}, size {size}, "
                               f"max_displacement_vox {max_displacement_vox}; run --prepare-only with the same settings")
        return {k: v for k, v in ph.items() if k not in ("size", "max_displacement_vox")}

    rp.registration_phantom = prepared


def _write_brats_case(job: tuple[str, int, int, int]) -> str:
    """Case ``i`` of ``write_brats2018_phantoms(root, n, seed, (s, s, s))`` (same seed and name), so
    the cases can be written by several processes."""
    from threefold.datasets.brain_phantoms import brain_phantom
    from threefold.datasets.brats import write_case_brats2018

    root, seed, i, s = job
    case = f"Brats18_Phantom_{i:03d}"
    ph = brain_phantom(seed * 100003 + i, (s, s, s))
    write_case_brats2018(Path(root) / case, case, ph["image"], ph["label"], ph["affine"])
    return case


def _brats_root(data_dir: Path, cases: int, shape: int, workers: int) -> tuple[Path, int]:
    root = data_dir / f"brats-phantoms-{cases}x{shape}"
    if (root / ".complete").is_file():
        return root, 0
    root.mkdir(parents=True, exist_ok=True)
    _pool_map(_write_brats_case, [(str(root), 0, i, shape) for i in range(cases)], workers)
    (root / ".complete").write_text("ok\n")
    return root, cases


def _molecules(data_dir: Path, source: Path, repeats: int) -> Path:
    out = data_dir / f"qm9_like_x{repeats}.xyz"
    if out.is_file():
        return out
    if not source.is_file():
        raise PrepareError(f"{source} missing: write it where RDKit is installed with "
                           "`python benchmarks/scaling.py --write-data` (or pass --molecules)")
    text = source.read_text()
    text = text if text.endswith("\n") else text + "\n"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(text * repeats)
    os.replace(tmp, out)
    return out


def write_data(path: Path) -> None:
    """The embedded 419 QM9-like molecules (RDKit conformers) as multi-frame XYZ at ``path``, for GPU
    hosts without RDKit."""
    from threefold.pipelines.uni3dar import load_molecules

    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        load_molecules(None, Path(tmp))
        shutil.move(Path(tmp) / "data" / "embedded_qm9_like.xyz", path)
    print(f"written {path}")


def _config(name: str, smoke: bool) -> Any:
    """The pipeline's resolved config at the benchmark's sizes (what the workers will run)."""
    from threefold.pipelines.config import resolve_config
    from threefold.pipelines.registry import get_pipeline

    pipe = get_pipeline(name)
    size = SIZES[name]
    return resolve_config(pipe.config_class, pipe.name, overrides=[*COMMON, *(size["smoke"] if smoke else size["paper"])])


def prepare(name: str, data_dir: Path, lidar_tar: Path, molecules: Path, smoke: bool, workers: int,
            build: bool = True) -> dict[str, Any]:
    """Build (``build``) or only locate and check the data of one pipeline under ``data_dir``.

    Returns ``{"data": --data path or None, "extra": overrides, "pairs": folder or None, "note": str}``.
    With ``build=False`` nothing is generated: missing data raises :class:`PrepareError`."""
    data_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"data": None, "extra": [], "pairs": None, "note": ""}
    if name == "semantickitti-rapidseg":
        copies = LIDAR_COPIES[smoke]
        root = data_dir / f"lidar-repeated-{copies}"
        if build:
            root = _lidar_root(data_dir, lidar_tar, copies)
        elif not (root / ".complete").is_file():
            raise PrepareError(f"{root}/.complete missing: run `python benchmarks/scaling.py --prepare-only` first")
        cache = data_dir / "rapid-cache"
        params = _rapid_params(_config(name, smoke))
        missing = _rapid_missing(root, cache, params)
        if missing and build:
            from threefold.geometry.rapid.prepare import prepare_rapid_features

            counts = prepare_rapid_features(data_dir / "lidar-sample", cache, workers=min(workers, len(missing)),
                                            variants=("r",), progress=False, **params)
            out["note"] = f"RAPiD rows: {counts.get('computed', '?')} computed, {counts.get('skipped', '?')} skipped"
            missing = _rapid_missing(root, cache, params)
        if missing:
            raise PrepareError(f"{cache}: no R-RAPiD entry for {len(missing)} training scans (first {missing[0]}); "
                               "run `python benchmarks/scaling.py --prepare-only`")
        out.update(data=str(root), extra=[f"features.cache_dir={cache}"])
        out["note"] = out["note"] or f"RAPiD rows of {len({p.resolve() for p in root.glob('sequences/*/velodyne/*.bin')})} scans cached"
    elif name == "hcp-nestedmorph":
        cfg = _config(name, smoke)
        folder = _registration_dir(data_dir, cfg)
        n = int(cfg.data.train_pairs)
        computed = prepare_registration_pairs(folder, cfg.data.size, cfg.seed, cfg.data.max_displacement_vox, n, workers) \
            if build else 0
        index = folder / "pairs.json"
        if not index.is_file() or json.loads(index.read_text()).get("n_pairs", 0) < n:
            raise PrepareError(f"{index}: fewer than {n} prepared pairs; run `python benchmarks/scaling.py --prepare-only`")
        out.update(pairs=str(folder), note=f"{n} training pairs of {cfg.data.size}³ ({computed} generated now)")
    elif name == "brats-multilevel":
        cases, shape = BRATS_CASES[smoke]
        root = data_dir / f"brats-phantoms-{cases}x{shape}"
        cache = data_dir / "brats-cache"
        generated = 0
        if build:
            root, generated = _brats_root(data_dir, cases, shape, workers)
            from threefold.datasets.brats_prepare import prepare_brats_cases

            prepare_brats_cases(root, cache, workers=min(workers, cases), progress=False)
        if not (root / ".complete").is_file():
            raise PrepareError(f"{root}/.complete missing: run `python benchmarks/scaling.py --prepare-only` first")
        from threefold.datasets.brats import list_cases
        from threefold.datasets.brats_prepare import brats_case_cache, case_inputs

        cases_cache = brats_case_cache(cache)
        missing = [c.name for c in list_cases(root) if not cases_cache.path(cases_cache.key(case_inputs(c))).is_file()]
        if missing:
            raise PrepareError(f"{cache}: {len(missing)} cases not preprocessed (first {missing[0]}); "
                               "run `python benchmarks/scaling.py --prepare-only`")
        out.update(data=str(root), extra=[f"cache_dir={cache}"],
                   note=f"{cases} phantoms of {shape}³ ({generated} generated now), crop + z-score cached")
    elif name == "qm9-uni3dar":
        reps = MOLECULE_REPEATS[smoke]
        path = _molecules(data_dir, molecules, reps) if build else data_dir / f"qm9_like_x{reps}.xyz"
        if not path.is_file():
            raise PrepareError(f"{path} missing: run `python benchmarks/scaling.py --prepare-only` first")
        out.update(data=str(path), note=f"419 molecules x {reps}")
    else:
        raise PrepareError(f"unknown pipeline {name!r}; expected one of {PIPELINES}")
    return out


# ----------------------------------------------------------------------------------------- worker


class Phases:
    """Wall-clock stamps of one rank, appended to ``<out>.phases.<rank>`` as they happen (they survive a kill)."""

    def __init__(self, out: str) -> None:
        self.rank = int(os.environ.get("LOCAL_RANK", "0"))  # one machine: Lightning's launcher sets it for rank >= 1
        self.path = Path(f"{out}.phases.{self.rank}")
        self.seen: set[str] = set()

    def stamp(self, phase: str) -> None:
        if phase in self.seen:
            return
        self.seen.add(phase)
        with open(self.path, "a") as f:
            f.write(json.dumps({"phase": phase, "t": time.time()}) + "\n")
        print(f"[scaling] rank {self.rank} {phase} {time.strftime('%H:%M:%S')}", file=sys.stderr, flush=True)


def read_phases(out: str, t0: float) -> dict[int, dict[str, float]]:
    """``{rank: {phase: seconds after t0}}`` from the phase files of one configuration."""
    found: dict[int, dict[str, float]] = {}
    for path in sorted(Path(out).parent.glob(Path(out).name + ".phases.*")):
        rank = int(path.name.rsplit(".", 1)[1])
        stamps: dict[str, float] = {}
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
            stamps[rec["phase"]] = rec["t"] - t0
        found[rank] = stamps
    return found


def format_phases(phases: dict[int, dict[str, float]]) -> str:
    parts = []
    for rank in sorted(phases):
        stamps = " ".join(f"{p} {phases[rank][p]:.1f}" for p in PHASES if p in phases[rank])
        parts.append(f"rank {rank}: {stamps}")
    return " | ".join(parts) or "no phase reached"


def where_stuck(phases: dict[int, dict[str, float]], world: int) -> str:
    """Which phase each rank was in when the run was stopped: the one after the last it stamped."""
    parts = []
    for rank in range(world):
        stamps = phases.get(rank, {})
        done = [p for p in PHASES if p in stamps]
        if not done:
            parts.append(f"rank {rank} had not started" if rank else "rank 0 never reached its first stamp")
            continue
        nxt = PHASES[PHASES.index(done[-1]) + 1] if done[-1] != PHASES[-1] else "exit"
        parts.append(f"rank {rank} in '{done[-1]} -> {nxt}' (since {stamps[done[-1]]:.1f} s)")
    return "; ".join(parts)


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def step_statistics(intervals: list[list[float]], batch: int) -> dict[str, Any]:
    """From each rank's timed intervals (seconds, same count per rank): throughput and step statistics.

    Step i's time is the slowest rank's interval i; throughput uses the slowest rank's total."""
    world, steps = len(intervals), len(intervals[0])
    per_step = [max(r[i] for r in intervals) for i in range(steps)]
    slowest = max(sum(r) for r in intervals)
    median = _quantile(per_step, 0.5)
    return {"world_size": world, "timed_steps": steps, "seconds": slowest,
            "samples_per_s": batch * world * steps / slowest, "step_ms": 1000.0 * slowest / steps,
            "median_step_ms": 1000.0 * median, "p10_step_ms": 1000.0 * _quantile(per_step, 0.1),
            "p90_step_ms": 1000.0 * _quantile(per_step, 0.9), "min_step_ms": 1000.0 * min(per_step),
            "max_step_ms": 1000.0 * max(per_step),
            "rank_median_ms": [1000.0 * _quantile(r, 0.5) for r in intervals]}


def _throughput_callback(spec: dict, phases: Phases):
    import lightning as L
    import torch

    class Throughput(L.Callback):
        """Stamps the phases, times steady-state training steps; writes the result on rank 0 and ends every rank."""

        def __init__(self) -> None:
            self.batches = 0
            self.prev: tuple[int, int, object] | None = None  # (epoch, batch_idx, marker)
            self.pairs: list[tuple[object, object]] = []

        def setup(self, trainer, pl_module, stage) -> None:
            phases.stamp("ddp_ready")  # after Lightning's setup_environment: the process group is up

        def on_train_start(self, trainer, pl_module) -> None:
            phases.stamp("train_start")

        def _marker(self, device: torch.device):
            if device.type == "cuda":
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                return ev
            return time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.batches += 1
            mark = self._marker(pl_module.device)
            if self.batches == 1:
                phases.stamp("first_step")
            if self.batches == spec["warmup"]:
                phases.stamp("warmup_done")
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
                intervals = [a.elapsed_time(b) / 1000.0 for a, b in self.pairs]
                peak, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
            else:
                intervals, peak, reserved = [b - a for a, b in self.pairs], 0, 0
            phases.stamp("timed_done")
            from threefold.pipelines.sync_batchnorm import AllReduceSyncBatchNorm

            synced = next((type(m).__name__ for m in pl_module.modules()
                           if isinstance(m, (torch.nn.SyncBatchNorm, AllReduceSyncBatchNorm))), False)
            mine = torch.tensor([*intervals, peak, reserved], dtype=torch.float64, device=device)
            every = trainer.strategy.all_gather(mine).reshape(-1, len(intervals) + 2).cpu()
            if trainer.is_global_zero:
                result = {
                    "ok": True, **step_statistics(every[:, :-2].tolist(), spec["batch"]), "warmup_steps": spec["warmup"],
                    "peak_mem_gib": [float(x) / 2**30 for x in every[:, -2]],
                    "reserved_gib": [float(x) / 2**30 for x in every[:, -1]],
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
    phases = Phases(spec["out"])
    phases.stamp("start")
    import dataclasses

    from threefold.pipelines.config import resolve_config
    from threefold.pipelines.engine import RunContext
    from threefold.pipelines.registry import get_pipeline

    class StampedContext(RunContext):
        """A RunContext that stamps ``data_ready`` when the pipeline first asks for a trainer (its data sets
        are built by then); sub-runs (``child``) stamp through the same object."""

        def trainer(self, module=None, **overrides):
            phases.stamp("data_ready")
            return super().trainer(module, **overrides)

        def child(self, name: str) -> "StampedContext":
            sub = super().child(name)
            return StampedContext(**{f.name: getattr(sub, f.name) for f in dataclasses.fields(sub)})

    pipe = get_pipeline(spec["pipeline"])
    cfg = resolve_config(pipe.config_class, pipe.name, overrides=spec["overrides"])
    phases.stamp("imported")
    if spec.get("pairs"):
        use_prepared_pairs(Path(spec["pairs"]))
    run_dir = Path(spec["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    data = Path(spec["data"]) if spec["data"] else None
    ctx = StampedContext(pipe.name, run_dir, cfg.trainer, data, False, [_throughput_callback(spec, phases)])
    pipe.run(cfg, ctx)
    # the callback exits when its window is full; getting here means the run ended first
    if phases.rank == 0:
        Path(spec["out"]).write_text(json.dumps({"ok": False, "error": "training ended before the timed window was full"}))


# ----------------------------------------------------------------------------------------- parent


def estimate(pipe: str, precision: str, devices: int, warmup: int, steps: int, smoke: bool) -> dict[str, float]:
    """Planned seconds of one configuration, by phase (see ``ESTIMATE``)."""
    e = SMOKE_ESTIMATE if smoke else ESTIMATE[pipe]
    step = e["step"] if smoke else e["step"][precision]
    step *= (1.1 if devices > 1 else 1.0) * (2.0 if smoke and devices > 1 else 1.0)  # 2 gloo ranks share 1-2 cores
    parts = {"start": float(e["start"]), "ddp": float(e["ddp"]) if devices > 1 else 0.0, "first": float(e["first"]),
             "steps": (warmup + steps) * step}
    parts["total"] = sum(parts.values())
    return parts


def schedule(configs: list[dict], slots: int) -> list[list[dict]]:
    """Rounds of configurations: the 1-GPU ones ``slots`` at a time in the given order, each pipeline's
    multi-GPU ones (one per round) as soon as all of its 1-GPU ones have run."""
    ones = [c for c in configs if c["devices"] == 1]
    multi = [c for c in configs if c["devices"] > 1]
    rounds: list[list[dict]] = []
    placed: set[int] = set()

    def flush_multi(final: bool) -> None:
        for c in multi:
            if id(c) in placed:
                continue
            if final or all(id(o) in placed for o in ones if o["pipeline"] == c["pipeline"]):
                rounds.append([c])
                placed.add(id(c))

    step = max(1, slots)
    for i in range(0, len(ones), step):
        chunk = ones[i:i + step]
        rounds.append(chunk)
        placed.update(id(c) for c in chunk)
        flush_multi(False)
    flush_multi(True)
    return rounds


def _gpu_info() -> tuple[list[str], list[str]]:
    """(visible GPU ids for CUDA_VISIBLE_DEVICES, their names) without creating a CUDA context here."""
    names: list[str] = []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
        names = [line.split(",", 1)[1].strip() for line in out.strip().splitlines() if "," in line]
        ids = [str(i) for i in range(len(names))]
    except (OSError, subprocess.SubprocessError):  # no nvidia-smi: count through torch (names unknown)
        import torch

        ids = [str(i) for i in range(torch.cuda.device_count())]
        names = ["?"] * len(ids)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        names = [names[int(i)] if i.isdigit() and int(i) < len(names) else "?" for i in ids]
    return ids, names


def _versions(gpu_names: list[str]) -> str:
    import lightning
    import torch

    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}", f"lightning {lightning.__version__}"]
    for mod in ("spconv", "monai"):
        try:
            parts.append(f"{mod} {__import__(mod).__version__}")
        except Exception:  # noqa: BLE001 — report what is there
            parts.append(f"{mod} absent")
    if gpu_names:
        parts.append(f"CUDA {torch.version.cuda}, {len(gpu_names)} x {gpu_names[0]}")
    return ", ".join(parts)


class Launch:
    """One running configuration (its own session, so a timeout kills the DDP children too)."""

    def __init__(self, spec: dict, timeout: float, env: dict, gpus: list[str] | None, log: Path) -> None:
        self.spec, self.timeout, self.log = spec, timeout, log
        env = dict(env)
        if gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        self.gpus = gpus
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
        self.t0 = time.time()
        with open(log, "w") as f:  # a file, not a pipe: concurrent runs never block on a full pipe
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, text=True,
                                         start_new_session=True)
        self.result: dict | None = None

    def poll(self) -> bool:
        """True once finished (result set)."""
        if self.result is not None:
            return True
        wall = time.time() - self.t0
        code = self.proc.poll()
        if code is None and wall < self.timeout:
            return False
        if code is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        phases = read_phases(self.spec["out"], self.t0)
        out = Path(self.spec["out"])
        if code is None:
            result = {"ok": False, "error": f"timeout after {self.timeout:.0f} s in {where_stuck(phases, self.spec['devices'])}"}
        elif out.is_file():
            result = json.loads(out.read_text())
        else:
            result = {"ok": False, "error": f"exit code {code}, no result; {where_stuck(phases, self.spec['devices'])}"}
        result["wall_s"] = wall
        result["phases"] = {str(k): v for k, v in phases.items()}
        result["phases_text"] = format_phases(phases)
        if not result.get("ok"):
            result["log"] = self.log.read_text(errors="replace")[-4000:] if self.log.is_file() else ""
        self.result = result
        return True

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()


def table(rows: list[dict]) -> str:
    thr = {(r["pipeline"], r["precision"], r["devices"]): r["samples_per_s"] for r in rows if r.get("ok")}
    lines = ["| pipeline | precision | GPUs | batch / GPU | samples/s | step median (p10-p90) ms | step mean ms | "
             "efficiency (speed-up) | peak mem / GPU (GiB) | sync BN | first step / wall (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r.get("ok"):
            lines.append(f"| {r['pipeline']} | {r['precision']} | {r['devices']} | {r['batch']} | "
                         f"{r.get('error', 'failed')} | | | | | | |")
            continue
        eff = ""
        one = thr.get((r["pipeline"], r["precision"], 1))
        if r["devices"] > 1 and one:
            eff = f"{r['samples_per_s'] / (r['devices'] * one):.2f} ({r['samples_per_s'] / one:.2f}x)"
        batch = f"{r['batch']} ({r['note']})" if r.get("note") else str(r["batch"])
        first = (r.get("phases") or {}).get("0", {}).get("first_step")
        lines.append(f"| {r['pipeline']} | {r['precision']} | {r['devices']} | {batch} | {r['samples_per_s']:.2f} | "
                     f"{r['median_step_ms']:.1f} ({r['p10_step_ms']:.1f}-{r['p90_step_ms']:.1f}) | {r['step_ms']:.1f} | "
                     f"{eff} | {_fmt_mem(r)} | {_fmt_sync(r['sync_batchnorm'])} | "
                     f"{'' if first is None else f'{first:.0f} / '}{r['wall_s']:.0f} |")
    return "\n".join(lines)


def _fmt_sync(synced: bool | str) -> str:
    """The sync-BN column: the layer class that synchronised (older JSON rows hold true/false)."""
    return synced if isinstance(synced, str) else ("yes" if synced else "no")


def _fmt_mem(r: dict) -> str:
    mem = r.get("peak_mem_gib") or []
    return " / ".join(f"{m:.2f}" for m in mem) if any(mem) else "n/a (CPU)"


def _print_row(row: dict) -> None:
    head = f"{row['pipeline']:24s} {row['precision']:10s} {row['devices']} GPU"
    if row.get("ok"):
        print(f"{head}: {row['samples_per_s']:9.2f} samples/s, step median {row['median_step_ms']:.1f} ms "
              f"(p10 {row['p10_step_ms']:.1f}, p90 {row['p90_step_ms']:.1f}, mean {row['step_ms']:.1f}), "
              f"peak {_fmt_mem(row)} GiB, sync BN {row['sync_batchnorm']}, wall {row['wall_s']:.0f} s "
              f"(estimate {row['estimate_s']:.0f} s)", flush=True)
    elif row.get("error", "").startswith("skipped"):
        print(f"{head}: {row['error']}", flush=True)
    else:
        print(f"{head}: FAILED {row.get('error')} (wall {row.get('wall_s', 0):.0f} s, estimate "
              f"{row.get('estimate_s', 0):.0f} s)\n{_log_tail(row.get('log', ''))}", flush=True)
    if "phases_text" in row:
        print(f"{'':24s} phases, s after launch: {row['phases_text']}", flush=True)


def _log_tail(log: str, n: int = 1500) -> str:
    """The end of a worker log without the per-step warning noise."""
    keep = [ln for ln in log.splitlines() if "warn" not in ln.lower() and not ln.startswith("[scaling]")]
    return "\n".join(keep)[-n:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--pipelines", nargs="+", default=list(PIPELINES), choices=PIPELINES)
    p.add_argument("--devices", nargs="+", type=int, default=[1, 2])
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--smoke", action="store_true", help="tiny models and 2 timed steps (checks the paths, CPU)")
    p.add_argument("--prepare-only", action="store_true", help="build the data of --pipelines under --data-dir and exit")
    p.add_argument("--prepare-workers", type=int, default=0, help="processes for data generation (0: all cores)")
    p.add_argument("--sequential", action="store_true", help="run the 1-GPU configurations one at a time")
    p.add_argument("--steps-scale", type=float, default=1.0, help="multiply the warm-up and timed steps")
    p.add_argument("--timeout-factor", type=float, default=2.0, help="time limit = factor x the configuration's estimate")
    p.add_argument("--min-timeout", type=float, default=60.0, help="lower bound of a configuration's time limit, s")
    p.add_argument("--budget", type=float, default=470.0,
                   help="seconds for the whole command (prepare included): a configuration whose estimate does not "
                        "fit what is left is skipped, and no time limit reaches past it")
    p.add_argument("--data-dir", type=Path, default=REPO / ".scratch" / "scaling-build",
                   help="where the prepared data go and are read from (~500 MB at the papers' sizes: keep it out of "
                        "what travels to a device; a warm device keeps it between calls)")
    p.add_argument("--lidar-tar", type=Path, default=REPO / ".scratch" / "lidar-sample.tar.xz")
    p.add_argument("--molecules", type=Path, default=REPO / ".scratch" / "scaling-data" / "qm9_like_419.xyz",
                   help="the 419 QM9-like molecules as XYZ (written by --write-data)")
    p.add_argument("--log-dir", type=Path, help="keep each configuration's log here")
    p.add_argument("--json", type=Path, help="write the result rows here")
    p.add_argument("--write-data", action="store_true", help="write the molecules to --molecules (needs RDKit) and exit")
    p.add_argument("--extra", nargs="*", default=[], help="more config overrides for every run")
    args = p.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    if args.write_data:
        write_data(args.molecules)
        return 0

    t_start = time.time()
    command = "python benchmarks/scaling.py " + " ".join(sys.argv[1:] if argv is None else argv)
    workers = args.prepare_workers or max(1, len(os.sched_getaffinity(0)))
    gpu_ids, gpu_names = _gpu_info() if args.device == "cuda" else ([], [])
    if args.device == "cuda" and not args.prepare_only and len(gpu_ids) < max(args.devices):
        print(f"needs {max(args.devices)} GPUs, {len(gpu_ids)} visible ({gpu_ids})", file=sys.stderr)
        return 2

    # ---- plan: configurations, estimates, rounds; the overall estimate before anything runs
    configs = []
    for prec in args.precisions:
        for pipe in args.pipelines:
            for n in args.devices:
                size = SIZES[pipe]
                warmup = 1 if args.smoke else max(2, round(size["warmup"] * args.steps_scale))
                steps = size["smoke_steps"] if args.smoke else max(3, round(size["steps"] * args.steps_scale))
                configs.append({"pipeline": pipe, "precision": prec, "devices": n, "warmup": warmup, "steps": steps,
                                "batch": SMOKE_BATCH[pipe] if args.smoke else size["batch"],
                                "estimate": estimate(pipe, prec, n, warmup, steps, args.smoke)})
    slots = 1 if (args.device == "cpu" or args.sequential) else max(1, len(gpu_ids))
    rounds = schedule(configs, slots)
    prep_est = sum(PREPARE_ESTIMATE[p] for p in args.pipelines)
    total_est = prep_est + (0 if args.prepare_only else sum(max(c["estimate"]["total"] for c in r) for r in rounds))
    print(f"# threefold scaling benchmark\n\nmachine: {platform.node()}, {os.cpu_count()} CPU cores; {_versions(gpu_names)}\n"
          f"command: `{command}`\n", flush=True)
    print(f"plan ({time.strftime('%H:%M:%S')}): prepare ~{prep_est} s" + ("" if args.prepare_only else
          f", then {len(configs)} configurations in {len(rounds)} rounds ({slots} side by side at most)"), flush=True)
    if not args.prepare_only:
        for k, r in enumerate(rounds):
            desc = " || ".join(f"{c['pipeline']} {c['precision']} {c['devices']} GPU ~{c['estimate']['total']:.0f} s" for c in r)
            print(f"  round {k + 1}: {desc}", flush=True)
    print(f"overall estimate: {total_est:.0f} s ({total_est / 60:.1f} min); --budget {args.budget:.0f} s\n", flush=True)

    # ---- prepare: every data set, once, before any timed configuration
    data: dict[str, dict] = {}
    t_prep = time.time()
    for pipe in args.pipelines:
        t = time.time()
        try:
            data[pipe] = prepare(pipe, args.data_dir, args.lidar_tar, args.molecules, args.smoke, workers)
        except PrepareError as exc:
            print(f"prepare {pipe}: {exc}", file=sys.stderr, flush=True)
            return 2
        print(f"prepared {pipe:24s} {time.time() - t:6.1f} s  {data[pipe]['note']}", flush=True)
    prep_s = time.time() - t_prep
    print(f"prepare: {prep_s:.1f} s in all ({workers} processes) -> {args.data_dir}\n", flush=True)
    if args.prepare_only:
        return 0

    env = {**os.environ, **SAFE_ENV}
    env.setdefault("OMP_NUM_THREADS", "1" if args.device == "cpu" else "4")
    accel = "gpu" if args.device == "cuda" else "cpu"
    rows: list[dict] = []
    ratios: list[float] = []  # measured wall / estimate of finished configurations
    tmp_holder = tempfile.TemporaryDirectory(prefix="scaling-")
    tmp = Path(tmp_holder.name)
    log_dir = args.log_dir or tmp
    log_dir.mkdir(parents=True, exist_ok=True)
    k = 0
    started: list[Launch] = []
    try:
        for rnd in rounds:
            scale = max(1.0, sorted(ratios)[len(ratios) // 2]) if ratios else 1.0
            left = args.budget - (time.time() - t_start)
            runnable = []
            for c in rnd:
                row = {"pipeline": c["pipeline"], "precision": c["precision"], "devices": c["devices"], "batch": c["batch"],
                       "estimate_s": c["estimate"]["total"] * scale, "estimate_parts": c["estimate"]}
                if args.device == "cpu" and c["pipeline"] == "semantickitti-rapidseg" and c["precision"].startswith("bf16"):
                    # spconv's autocast hook casts sparse convs to float16 on CUDA only; on CPU they get bf16
                    # features, for which spconv 2.3 has no kernels (geometry/rapid/rapidseg.py, PRECISIONS)
                    row.update(ok=False, error="skipped: spconv has no bfloat16 CPU kernels")
                elif row["estimate_s"] > left:
                    row.update(ok=False, error=f"skipped: estimate {row['estimate_s']:.0f} s > {max(left, 0):.0f} s left of --budget")
                if "error" in row:
                    rows.append(row)
                    _print_row(row)
                    continue
                runnable.append((c, row))
            if not runnable:
                continue
            launches = []
            for slot, (c, row) in enumerate(runnable):
                k += 1
                d = data[c["pipeline"]]
                size = SIZES[c["pipeline"]]
                n = c["devices"]
                overrides = [*COMMON, *(size["smoke"] if args.smoke else size["paper"]), *d["extra"],
                             f"trainer.batch_size={c['batch']}", f"trainer.devices={n}", f"trainer.accelerator={accel}",
                             # the 1-GPU baseline is an ordinary single-device run, not DDP with one process
                             f"trainer.strategy={'ddp' if n > 1 else 'auto'}",
                             f"trainer.precision={c['precision']}", *args.extra]
                spec = {"pipeline": c["pipeline"], "overrides": overrides, "data": d["data"], "pairs": d["pairs"],
                        "run_dir": str(tmp / f"run{k}"), "out": str(tmp / f"result{k}.json"), "warmup": c["warmup"],
                        "steps": c["steps"], "batch": c["batch"], "devices": n}
                left = args.budget - (time.time() - t_start)
                timeout = min(max(args.min_timeout, args.timeout_factor * row["estimate_s"]), max(left, 10.0))
                gpus = None
                if args.device == "cuda":
                    gpus = gpu_ids[:n] if n > 1 else [gpu_ids[slot % len(gpu_ids)]]
                row.update(timeout_s=timeout, gpus=gpus or [], overrides=overrides,
                           side_by_side=[f"{o['pipeline']} {o['precision']}" for o, _ in runnable if o is not c])
                print(f"[{time.strftime('%H:%M:%S')} +{time.time() - t_start:.0f} s] start {c['pipeline']} {c['precision']} "
                      f"{n} GPU{'' if gpus is None else ' (CUDA_VISIBLE_DEVICES=' + ','.join(gpus) + ')'}: estimate "
                      f"{row['estimate_s']:.0f} s (start {c['estimate']['start']:.0f} + DDP {c['estimate']['ddp']:.0f} + first "
                      f"{c['estimate']['first']:.0f} + {c['warmup']}+{c['steps']} steps {c['estimate']['steps']:.0f}"
                      f"{'' if scale == 1.0 else f', x{scale:.2f} from finished runs'}), time limit {timeout:.0f} s", flush=True)
                launches.append((Launch(spec, timeout, env, gpus, log_dir / f"{k:02d}-{c['pipeline']}-{c['precision']}-{n}gpu.log"), c, row))
                started.append(launches[-1][0])
            pending = list(launches)
            while pending:
                time.sleep(0.5)
                for item in list(pending):
                    launch, c, row = item
                    if not launch.poll():
                        continue
                    pending.remove(item)
                    result = launch.result
                    oom = not result.get("ok") and "out of memory" in result.get("log", "").lower()
                    left = args.budget - (time.time() - t_start)
                    if oom and c["batch"] > 1 and left > row["estimate_s"]:  # the paper's batch does not fit: half of it, say so
                        batch = c["batch"] // 2
                        print(f"{c['pipeline']:24s} {c['precision']:10s} {c['devices']} GPU: out of memory at batch "
                              f"{c['batch']}, retrying with {batch}", flush=True)
                        spec = dict(launch.spec, batch=batch, run_dir=launch.spec["run_dir"] + "b", out=launch.spec["out"] + "b",
                                    overrides=[o for o in launch.spec["overrides"] if not o.startswith("trainer.batch_size=")]
                                    + [f"trainer.batch_size={batch}"])
                        retry = Launch(spec, min(launch.timeout, left), env, launch.gpus,
                                       launch.log.with_name(launch.log.stem + "-retry.log"))
                        started.append(retry)
                        row.update(batch=batch, note=f"batch {c['batch']} out of memory", overrides=spec["overrides"])
                        c = dict(c, batch=batch)
                        pending.append((retry, c, row))
                        continue
                    row.update(result)
                    if result.get("ok"):
                        ratios.append(result["wall_s"] / c["estimate"]["total"])
                    rows.append(row)
                    _print_row(row)
                    if args.json:
                        args.json.write_text(json.dumps(rows, indent=1))
    finally:  # Ctrl-C or an error here: no worker outlives the parent
        for launch in started:
            launch.kill()
        tmp_holder.cleanup()

    order = {(c["pipeline"], c["precision"], c["devices"]): i for i, c in enumerate(configs)}
    rows.sort(key=lambda r: order[(r["pipeline"], r["precision"], r["devices"])])
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print("\n" + table(rows))
    print(f"\nper-GPU batch and model: see SIZES in benchmarks/scaling.py; warm-up/timed steps x{args.steps_scale}; "
          f"prepare {prep_s:.0f} s; total {time.time() - t_start:.0f} s (estimate {total_est:.0f} s)", flush=True)
    return 0 if all(r.get("ok") or r.get("error", "").startswith("skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
