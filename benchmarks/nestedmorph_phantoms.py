"""NestedMorph vs MONAI VoxelMorph on the embedded registration phantoms (issue #6, acceptance 2).

Both networks are trained with the same budget — the same training pairs, the same number of
optimiser steps of batch 1, the recipe of the ``hcp-*`` pipelines (``-LNCC²`` window 9 + λ‖∇u‖² on
the flow, Adam amsgrad, poly decay 0.9) — for each of ``--seeds`` seeds (network initialisation and
pair order), then scored on the same held-out pairs with the pipeline's metrics.

Loss: the paper's ``-LNCC²(9)`` with the diffusion penalty on the flow, but λ = 10 by default
(``--smoothness-weight``), not the paper's 1. Optimising a free displacement field directly
against the objective on two 64³ test phantoms (Adam, lr 0.05, 300 iterations; no network) gives
the end-point error in the brain (voxels; identity 1.14 / 1.59):

    λ = 1 (150 it.): 1.30 / –      λ = 3: 1.09 / 1.25      λ = 10: 0.88 / 1.07      λ = 30: 0.86 / 1.15
    MI (Parzen) λ = 1 (150 it.): 1.42 / –     MI λ = 10 (150 it.): 1.06 / –

With λ = 1 the optimum of the objective lies *farther* from the true deformation than the identity
(the field matches intensities, not anatomy: the phantom contrasts are related non-monotonically,
background 0 → 0, CSF 0.25 → 0.95, white matter 0.82 → 0.36); λ = 10 recovers about a third of it.

    python benchmarks/nestedmorph_phantoms.py --device cuda              # the documented run (≤ 9 min, one H100)
    python benchmarks/nestedmorph_phantoms.py --device cpu --size 32 --steps 60 --train-pairs 8 --test-pairs 2 --seeds 1

Needs MONAI (VoxelMorph). Phantoms are generated on CPU worker processes and kept in memory.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from threefold.datasets.registration_phantoms import LABELS, RegistrationPhantoms
from threefold.medical.registration.losses import registration_loss
from threefold.medical.registration.nestedmorph import REFERENCE_PARAMETERS, count_parameters
from threefold.pipelines.config import config_to_dict
from threefold.pipelines.metrics.registration import registration_pair_metrics, spacing_from_affine
from threefold.pipelines.registration import RegistrationConfig, build_network

KEYS = {
    "EPE brain (vox)": "EPE[vox,brain]/after",
    "NCC": "NCC[global]/after",
    "SSIM": "SSIM3D[win=7,data_range=1]/after",
    "MI": "MI[hist32,nats]/after",
    "Dice": "Dice[labels]/after",
    "HD95 mm": "HD95[max-directed,mm]/after",
    "fold %": "folding%[J<=0]",
    "SDlogJ+": "SDlogJ[positive]",
    "SDlogJ L2R": "SDlogJ[learn2reg]",
}
BEFORE = {"EPE brain (vox)": "EPE[vox,brain]/before", "NCC": "NCC[global]/before", "SSIM": "SSIM3D[win=7,data_range=1]/before",
          "MI": "MI[hist32,nats]/before", "Dice": "Dice[labels]/before", "HD95 mm": "HD95[max-directed,mm]/before"}
IDENTITY, ORACLE = "identity (affine-only)", "true deformation (oracle)"
METHODS = {"NestedMorph": ("nestedmorph", False), "NestedMorph-diffeo": ("nestedmorph", True), "VoxelMorph (MONAI)": ("voxelmorph", False)}


def _item(args: tuple[int, int, str, int]) -> dict:
    n, size, split, index = args
    item = RegistrationPhantoms(n, size=size, seed=0, split=split)[index]
    return {k: v for k, v in item.items() if k != "subject"}


def phantoms(n: int, size: int, split: str, workers: int) -> list[dict]:
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_item, [(n, size, split, i) for i in range(n)]))


def train(method: str, diffeomorphic: bool, pairs: list[dict], steps: int, lr: float, seed: int, device: torch.device,
          similarity: str = "lncc", smoothness_weight: float = 1.0) -> tuple[torch.nn.Module, float]:
    cfg = RegistrationConfig(method=method)
    cfg.model.diffeomorphic = diffeomorphic
    torch.manual_seed(seed)
    net = build_network(cfg).to(device).train()
    opt = torch.optim.Adam(net.parameters(), lr=lr, amsgrad=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(1.0 - s / steps, 0.0) ** cfg.optim.poly_power)
    order = np.random.default_rng(seed).permutation(np.resize(np.arange(len(pairs)), steps + len(pairs)))
    moving = torch.stack([p["moving"] for p in pairs]).to(device)
    fixed = torch.stack([p["fixed"] for p in pairs]).to(device)
    start = time.perf_counter()
    for step in range(steps):
        i = int(order[step])
        out = net(moving[i : i + 1], fixed[i : i + 1])
        loss = registration_loss(out.warped, fixed[i : i + 1], out.ddf, similarity, smoothness_weight)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return net.eval(), time.perf_counter() - start


def evaluate(net, pairs: list[dict], device: torch.device | None, truth: bool = False) -> list[dict]:
    """Metrics per test pair of ``net``'s field; ``net=None``: the identity, or with ``truth`` the true field."""
    rows = []
    for p in pairs:
        b = {k: v[None] for k, v in p.items() if isinstance(v, torch.Tensor)}
        if net is None:
            ddf = b["ddf_true"] if truth else torch.zeros_like(b["ddf_true"])
        else:
            with torch.no_grad():
                ddf = net(b["moving"].to(device), b["fixed"].to(device)).ddf.float().cpu()
        rows.append(registration_pair_metrics(b["moving"], b["fixed"], ddf, spacing_from_affine(p["affine"]),
                                              b["moving_label"], b["fixed_label"], LABELS, b["ddf_true"]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--train-pairs", type=int, default=48)
    ap.add_argument("--test-pairs", type=int, default=8)
    ap.add_argument("--steps", default="auto",
                    help="optimiser steps (batch 1) per network and seed; 'auto': as many as fit --train-budget")
    ap.add_argument("--train-budget", type=float, default=360.0,
                    help="seconds of training for all networks and seeds together when --steps auto")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--similarity", default="lncc", choices=["lncc", "mi"], help="similarity term of the loss")
    ap.add_argument("--smoothness-weight", type=float, default=10.0, help="λ of the diffusion penalty on the flow")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--workers", type=int, default=8, help="processes generating phantoms")
    ap.add_argument("--json", default=None, help="also write the per-seed results here")
    ap.add_argument("--seed", type=int, default=None, help="train only this seed (one process per GPU; merge with --table)")
    ap.add_argument("--table", nargs="+", default=[], help="print the table from these --json parts; train nothing")
    args = ap.parse_args()
    if args.table:
        parts = [json.loads(Path(f).read_text()) for f in args.table]
        merged: dict[str, list[dict[str, float]]] = {}
        for part in parts:
            for name, per_seed in part["results"].items():
                if name in (IDENTITY, ORACLE):
                    merged[name] = per_seed  # the same test pairs in every part
                else:
                    merged.setdefault(name, []).extend(per_seed)
        times = {name: [t for part in parts for t in part["train_s"].get(name, [])] for name in merged}
        print_table(merged, {k: v for part in parts for k, v in part["params"].items()}, {k: v for k, v in times.items() if v})
        return
    seeds = list(range(args.seeds)) if args.seed is None else [args.seed]
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    t0 = time.perf_counter()
    train_pairs = phantoms(args.train_pairs, args.size, "train", args.workers)
    test_pairs = phantoms(args.test_pairs, args.size, "test", args.workers)
    t_data = time.perf_counter() - t0
    import monai

    print(f"machine: {platform.node()} | {platform.processor() or platform.machine()} | device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"torch {torch.__version__}, monai {monai.__version__}")
    loss_name = "-LNCC²(9)" if args.similarity == "lncc" else "-MI(Parzen, 23 bins)"
    recipe = (f"lr {args.lr} (Adam amsgrad, poly 0.9), loss {loss_name} + {args.smoothness_weight:g}·diffusion(flow); {args.train_pairs} train / "
              f"{args.test_pairs} test phantom pairs of {args.size}³ (seed 0); seeds {seeds}; "
              f"phantoms generated in {t_data:.0f} s")

    if args.steps == "auto":
        # time 10 steps of each network after 3 warm-up steps, then give every network the same
        # number of steps so that all of them, all seeds, fit the budget
        per_step = {}
        for name in args.methods:
            method, diffeo = METHODS[name]
            _, t_warm = train(method, diffeo, train_pairs, 3, args.lr, 0, device, args.similarity, args.smoothness_weight)
            _, t_13 = train(method, diffeo, train_pairs, 13, args.lr, 0, device, args.similarity, args.smoothness_weight)
            per_step[name] = max(t_13 - t_warm, 1e-6) / 10
        args.steps = max(int(args.train_budget / (len(seeds) * sum(per_step.values()))), 1)
        print("measured s/step: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in per_step.items())
              + f" -> {args.steps} steps each within a {args.train_budget:.0f} s training budget")
    else:
        args.steps = int(args.steps)
    print(f"budget: {args.steps} steps of batch 1 per network and seed, {recipe}", flush=True)
    identity = evaluate(None, test_pairs, None)
    oracle = evaluate(None, test_pairs, None, truth=True)
    results: dict[str, list[dict[str, float]]] = {
        IDENTITY: [{k: float(np.mean([r[v] for r in identity])) for k, v in BEFORE.items()}],
        # the scores a perfect registration gets: similarity above these is intensity matching, not anatomy
        ORACLE: [{k: float(np.mean([r[v] for r in oracle])) for k, v in KEYS.items()}],
    }
    params, times = {}, {}

    def save() -> None:
        # after every trained network, not only at the end: a run stopped by a time limit keeps its rows
        # (--table merges the parts; a network with no finished seed is left out)
        if args.json:
            done = {k: v for k, v in results.items() if v}
            tmp = Path(args.json).with_suffix(".json.tmp")
            tmp.write_text(json.dumps({"args": vars(args), "results": done, "params": params, "train_s": times,
                                       "config": config_to_dict(RegistrationConfig())}, indent=2))
            tmp.replace(args.json)

    for name in args.methods:
        method, diffeo = METHODS[name]
        results[name] = []
        for seed in seeds:
            net, dt = train(method, diffeo, train_pairs, args.steps, args.lr, seed, device, args.similarity,
                            args.smoothness_weight)
            params[name] = count_parameters(net)
            times.setdefault(name, []).append(dt)
            rows = evaluate(net, test_pairs, device)
            results[name].append({k: float(np.mean([r[v] for r in rows])) for k, v in KEYS.items()})
            print(f"  {name} seed {seed}: trained in {dt:.0f} s; " + ", ".join(f"{k} {v:.4g}" for k, v in results[name][-1].items()), flush=True)
            save()

    print_table(results, params, times)
    print(f"total wall time {time.perf_counter() - t0:.0f} s")


def print_table(results: dict[str, list[dict[str, float]]], params: dict[str, int], times: dict[str, list[float]]) -> None:
    """Mean ± std over seeds per method; the identity row is the affine-only baseline."""
    cols = list(KEYS)
    print()
    print("| method | params | train s | " + " | ".join(cols) + " |")
    print("|---|---|---|" + "---|" * len(cols))
    for name, per_seed in results.items():
        cells = []
        for c in cols:
            v = [r[c] for r in per_seed if c in r]
            cells.append("–" if not v else (f"{np.mean(v):.4g} ± {np.std(v):.2g}" if len(v) > 1 else f"{v[0]:.4g}"))
        p = f"{params[name] / 1e6:.2f} M" if name in params else "–"
        t = f"{np.mean(times[name]):.0f}" if name in times else "–"
        print(f"| {name} | {p} | {t} | " + " | ".join(cells) + " |")
    ref = ", ".join(f"{k}: {v / 1e6:.2f} M" for k, v in REFERENCE_PARAMETERS.items())
    if "NestedMorph" in params:
        print(f"\nNestedMorph parameters: {params['NestedMorph'] / 1e6:.2f} M (reference repository {ref})")


if __name__ == "__main__":
    main()
