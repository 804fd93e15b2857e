"""Uni-3DAR octree tokenizer throughput on CPU: structures per second, batched and vectorised.

Compares, on the same randomly rotated molecules,
- ``threefold``: :func:`threefold.science.octree.tokenize_batch` (full tokens: tree masks in
  breadth-first Morton order, atom types, in-cell offsets, collision check) and its inverse;
- ``numpy-occupancy``: the bare peer of ``/work/shared/ANCHORS.md``: a batched NumPy pass that finds
  the occupied nodes of every level with ``np.unique`` and emits no tokens (about 75,000 QM9
  molecules/s on the 2-core development machine).

Molecules: RDKit ETKDG conformers (with H, seed 42) of the QM9-like SMILES bundled with threefold
(<= 9 heavy atoms C/N/O/F) for "QM9-sized", and the EGFR ligands of the RDKit wheel for
"drug-sized"; each set is tiled with random rotations to ``--n`` molecules.

    OMP_NUM_THREADS=2 python benchmarks/tokenizer.py --n 10000 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np

from threefold.science.octree import PRESETS, OctreeSpec, detokenize, morton_encode, random_rotations, tokenize_batch


def numpy_occupancy(positions: np.ndarray, counts: np.ndarray, spec: OctreeSpec) -> int:
    """The anchor: occupied nodes per level via ``np.unique`` of (structure, node) keys; no tokens."""
    mol = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    cell = np.floor(positions / spec.cell).astype(np.int64)
    cell -= np.minimum.reduceat(cell, np.concatenate([[0], np.cumsum(counts)[:-1]]))[mol]
    total = 0
    for level in range(spec.depth):
        total += len(np.unique((mol << 30) | morton_encode(cell >> level)))
    return total


def load_molecules(kind: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    from rdkit import Chem, RDLogger
    from rdkit.Chem import AllChem

    RDLogger.DisableLog("rdApp.*")
    z, pos = [], []
    if kind == "qm9":
        from threefold.datasets.molecule_samples import embedded_smiles

        for smi in embedded_smiles():
            m = Chem.AddHs(Chem.MolFromSmiles(smi))
            params = AllChem.ETKDGv3()
            params.randomSeed = 42
            if AllChem.EmbedMolecule(m, params) == 0:
                z.append(np.array([a.GetAtomicNum() for a in m.GetAtoms()]))
                pos.append(m.GetConformer().GetPositions())
    else:
        import rdkit

        path = Path(rdkit.__file__).parent / "Contrib/PBF/testData/egfr.sdf"
        for m in Chem.SDMolSupplier(str(path), removeHs=False, sanitize=False):
            z.append(np.array([a.GetAtomicNum() for a in m.GetAtoms()]))
            pos.append(m.GetConformer().GetPositions())
    return z, pos


def tile(z: list[np.ndarray], pos: list[np.ndarray], n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pick = np.arange(n) % len(z)
    counts = np.array([len(z[i]) for i in pick])
    rot = random_rotations(n, rng)
    mol = np.repeat(np.arange(n), counts)
    p = np.concatenate([pos[i] - pos[i].mean(0) for i in pick])
    return np.concatenate([z[i] for i in pick]), np.einsum("nij,nj->ni", rot[mol], p), counts


def best_rate(fn, n: int, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return n / float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    import rdkit
    import scipy

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")  # fmt: skip
    print(f"python {platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__}, rdkit {rdkit.__version__}")
    print(f"{'set':<12}{'atoms/mol':>10}{'depth':>6}  {'implementation':<28}{'mol/s':>12}{'ratio':>8}")
    for kind, spec in (("qm9", PRESETS["qm9"]), ("drug", PRESETS["drug"])):
        z, pos, counts = tile(*load_molecules(kind), args.n, seed=0)
        peer = best_rate(lambda: numpy_occupancy(pos, counts, spec), args.n, args.repeats)
        tokens = tokenize_batch(z, pos, counts, spec)
        ours = best_rate(lambda: tokenize_batch(z, pos, counts, spec), args.n, args.repeats)
        inverse = best_rate(lambda: detokenize(tokens), args.n, args.repeats)
        mean_atoms = counts.mean()
        for name, rate in (("numpy-occupancy (peer)", peer), ("threefold tokenize_batch", ours),
                           ("threefold detokenize", inverse)):  # fmt: skip
            print(f"{kind:<12}{mean_atoms:>10.1f}{spec.depth:>6}  {name:<28}{rate:>12,.0f}{rate / peer:>8.2f}")
        comp = tokens.compression()
        print(f"{kind:<12} tree tokens/mol {comp['mean_tree_tokens']:.1f}, one-token-per-occupied-child "
              f"{comp['mean_child_tokens']:.1f} (x{comp['mean_ratio_vs_child']:.2f}), "
              f"one-token-per-child-slot {8 * comp['mean_tree_tokens']:.1f} (x8)")  # fmt: skip


if __name__ == "__main__":
    main()
