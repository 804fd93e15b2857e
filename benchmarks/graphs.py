"""Speed of the issue-#9 graph self-supervision code: IsoC-VGAE and SelfTask epoch times, and the
cost of the SelfTask pretext-target precomputation on PubMed (~19.7k nodes), which must never build
a dense N×N matrix.

    python benchmarks/graphs.py --data /path/to/shared/data [--device cpu|cuda|all] [--repeats 3]

Data: Cora from ``planetoid/raw``; PubMed's graph and labels from ``planetoid/raw`` (when
``ind.pubmed.allx`` is missing, as in the threefold test data, features are seeded random
non-negative 500-d rows — timing depends on the graph and the width, not on the values); MUTAG from
``tu/`` as one disjoint union. Prints a table with the machine, versions and the time ratio GPU/CPU.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import time
from pathlib import Path

import numpy as np
import torch
from torch_geometric.data import Batch, Data
from torch_geometric.transforms import NormalizeFeatures

from threefold.datasets.errors import MissingFileError
from threefold.datasets.planetoid import load_planetoid
from threefold.datasets.safe_pickle import safe_load_pickle
from threefold.datasets.tu import load_tu
from threefold.graphs.isocvgae import IsoCVGAE
from threefold.graphs.selftask import TASKS, build_task
from threefold.graphs.selftask.joint import SelfTaskGCN


def pubmed(root: Path) -> tuple[Data, str]:
    """PubMed from raw files; without ``ind.pubmed.allx`` the real graph and labels with random features."""
    try:
        return NormalizeFeatures()(load_planetoid(root, "pubmed")), "pubmed"
    except MissingFileError:
        raw = root / "raw" if (root / "raw").is_dir() else root
        graph = safe_load_pickle(raw / "ind.pubmed.graph")
        n = len(graph)
        src = np.repeat(np.fromiter(graph.keys(), np.int64), [len(v) for v in graph.values()])
        dst = np.fromiter((u for v in graph.values() for u in v), np.int64)
        keep = src != dst
        ei = torch.from_numpy(np.unique(np.stack([np.r_[src[keep], dst[keep]], np.r_[dst[keep], src[keep]]]), axis=1))
        ally, ty = safe_load_pickle(raw / "ind.pubmed.ally"), safe_load_pickle(raw / "ind.pubmed.ty")
        test = np.loadtxt(raw / "ind.pubmed.test.index", dtype=np.int64)
        y = np.zeros(n, np.int64)
        y[: ally.shape[0]] = ally.argmax(1)
        y[test] = ty.argmax(1)
        x = np.abs(np.random.default_rng(0).standard_normal((n, 500))).astype(np.float32)
        masks = {k: torch.zeros(n, dtype=torch.bool) for k in ("train_mask", "val_mask", "test_mask")}
        masks["train_mask"][:60] = True
        masks["val_mask"][60:560] = True
        masks["test_mask"][torch.from_numpy(test)] = True
        data = Data(x=torch.from_numpy(x), y=torch.from_numpy(y), edge_index=ei, num_nodes=n, **masks)
        return NormalizeFeatures()(data), "pubmed (graph+labels; random features: allx missing)"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_epochs(step, device: str, repeats: int) -> float:
    step()  # warm-up (allocations, cuDNN / cuBLAS handles)
    _sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        step()
    _sync(device)
    return (time.perf_counter() - t) / repeats


def isoc_epoch(data: Data, device: str, conv: str, repeats: int) -> float:
    torch.manual_seed(0)
    model = IsoCVGAE(data.num_features, (512, 512), conv=conv).to(device)
    opt = torch.optim.Adam(model.parameter_groups())
    x, ei = data.x.to(device), data.edge_index.to(device)
    gen = torch.Generator(device=device).manual_seed(0)

    def step() -> None:
        loss, _, _ = model(x, ei, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return time_epochs(step, device, repeats)


def selftask_epoch(data: Data, name: str, task: str | None, device: str, repeats: int) -> tuple[float, float]:
    """(pretext precomputation s, joint epoch s)."""
    torch.manual_seed(0)
    classes = int(data.y.max()) + 1
    g = data.to(device)
    gen = torch.Generator().manual_seed(0)
    t = None
    prep = 0.0
    if task is not None:
        t = build_task(task, 128, classes, name.split()[0])
        _sync(device)
        t0 = time.perf_counter()
        t.prepare(g, gen)
        _sync(device)
        prep = time.perf_counter() - t0
    model = SelfTaskGCN(data.num_features, 128, classes, 0.5, t).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=5e-4)

    def step() -> None:
        ce, ssl = model.losses(g, gen)
        loss = ce + 10 * ssl
        opt.zero_grad()
        loss.backward()
        opt.step()

    return prep, time_epochs(step, device, repeats)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _peak_child(task: str, data: Data, out) -> None:
    # reset the resident-set high-water mark (Linux >= 4.0), so VmHWM is the peak of prepare() alone
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    build_task(task, 128, int(data.y.max()) + 1, "pubmed").prepare(data, torch.Generator().manual_seed(0))
    out.put((time.perf_counter() - t0, (_status_kib("VmHWM") - before) / 1024))


def precompute_memory(data: Data, task: str) -> tuple[float, float]:
    """(seconds, peak resident-memory growth MiB) of ``task.prepare`` in a forked child (CPU, Linux):
    the child resets its high-water mark through ``/proc/self/clear_refs`` before starting."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_peak_child, args=(task, data, q))
    p.start()
    res = q.get()
    p.join()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="folder with planetoid/raw and tu/")
    ap.add_argument("--device", default="all", choices=["cpu", "cuda", "all"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated SelfTask tasks")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-timing", action="store_true")
    args = ap.parse_args()
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]

    cora = NormalizeFeatures()(load_planetoid(args.data / "planetoid", "cora"))
    pub, pub_name = pubmed(args.data / "planetoid")
    mutag = Batch.from_data_list([Data(x=g.x, edge_index=g.edge_index, num_nodes=g.num_nodes) for g in load_tu(args.data / "tu", "MUTAG")])
    print(f"machine: {platform.node()} | {platform.processor() or platform.machine()} | torch threads {torch.get_num_threads()}")
    print(f"versions: python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}")
    if torch.cuda.is_available():
        print(f"gpu: {torch.cuda.get_device_name(0)}")
    print(f"graphs: cora N={cora.num_nodes} E={cora.edge_index.shape[1]}; {pub_name} N={pub.num_nodes} "
          f"E={pub.edge_index.shape[1]}; MUTAG union N={mutag.num_nodes} E={mutag.edge_index.shape[1]}")
    print(f"(a dense float32 N×N matrix for PubMed would take {pub.num_nodes**2 * 4 / 2**30:.2f} GiB)\n")

    ratio_head = " | cuda/cpu |" if len(devices) == 2 else " |"

    def head(title: str) -> None:
        line = f"| {title} | graph | " + " | ".join(f"{d} s" for d in devices) + ratio_head
        print(line)
        print("|---" * (line.count("|") - 1) + "|", flush=True)

    def row(what: str, graph: str, t: dict[str, float]) -> None:
        ratio = f" | {t['cuda'] / t['cpu']:.3f} |" if len(devices) == 2 else " |"
        print(f"| {what} | {graph} | " + " | ".join(f"{t[d]:.4f}" for d in devices) + ratio, flush=True)

    # rows are printed as they are measured, so a long run can be read while it goes
    if not args.skip_timing:
        head("epoch time (forward + backward + Adam step, full batch)")
        prep_rows: list[tuple[str, str, dict[str, float]]] = []
        for label, data in (("cora", cora), ("pubmed", pub)):
            for task in [None, *args.tasks.split(",")]:
                res = {d: selftask_epoch(data, label, task, d, args.repeats) for d in devices}
                row(f"SelfTask GCN-128 + {task or 'no task'}", label, {d: r[1] for d, r in res.items()})
                if task is not None:
                    prep_rows.append((f"precompute {task}", label, {d: r[0] for d, r in res.items()}))
        for label, data, conv in (("cora", cora, "gcn"), ("MUTAG", mutag, "gin"), ("pubmed", pub, "gcn")):
            row(f"IsoC-VGAE 512-512 ({conv})", label, {d: isoc_epoch(data, d, conv, args.repeats) for d in devices})
        print()
        head("pretext-target precomputation")
        for r in prep_rows:
            row(*r)
        print()
    if not args.skip_memory:
        print("| pretext targets on pubmed (CPU, forked child) | seconds | peak RSS growth MiB |")
        print("|---|---|---|")
        for task in args.tasks.split(","):
            sec, mib = precompute_memory(pub.to("cpu"), task)
            print(f"| {task} | {sec:.2f} | {mib:.0f} |", flush=True)


if __name__ == "__main__":
    main()
