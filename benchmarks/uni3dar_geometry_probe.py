"""Geometry probe of the Uni-3DAR model (issue #8): can it learn precise relative geometry at all?

Toy data where the geometry is fully determined: a diatomic C-O (bond 1.20 Å) and a rigid triatomic
O-C-N (C-O 1.20 Å, C-N 1.35 Å, angle 120°), uniformly random orientation, elements fixed. Each
molecule is tokenized with the package's ``OctreeTokenizer("qm9")`` and laid out with
``build_sequences``; the model is the package's ``Uni3DAR`` trained with its own ``loss`` on fresh
molecules every step (no reuse, so the held-out CE measures what was learnt, not memorised).

Placement: ``--placement shift`` (default) keeps the box fixed and translates the molecule by a
continuous uniform offset of up to half a cell per axis, so the sub-cell and sub-voxel position is
uniform and the second atom is only determined by the first through the bond geometry.
``--placement bbox`` is the tokenizer's default placement with no translation at all (each molecule's
bounding-box centre at the origin): a diatomic's two atoms then sit point-symmetric, q2 = -q1, a
control where atom 2's offsets are a per-axis function of atom 1's. (Until 2026-11-26 the tokenizer
centred every structure on its quantised bounding box, which cancelled the training pipeline's
translation jitter and put the pipeline in this situation — q2 = 1536 - q1 then; see docs/uni3dar.md.)

Also printed: the RMSE (0.01 Å) of a ridge-regression probe, fitted on half the held-out set, of the
vector from the last atom's [MASK] position to the previous atom token's exact position, read from
that mask's final hidden state.

Reported per atom index in the sequence (Morton order), held-out teacher-forced CE (nats) of the x,
y | x and z | x, y heads on 1,024 fresh molecules, against the uniform ln 24 = 3.178 and a Monte
Carlo estimate of the Bayes CE (``ideal_*``):

- diatomic atom 2: given atom 1's exact quantised position q1 and atom 2's finest cell c2 (both known
  to the model at atom 2's [MASK]: q1 from the atom-1 token, c2 from the tree), atom 2 lies on the
  sphere of 1.20 Å about the continuous p1 (uniform in q1's 0.01 Å voxel) intersected with c2;
  directions are sampled in the cap that covers c2, quantised, and histogrammed in the cell, giving
  P(x2), P(y2 | x2), P(z2 | x2, y2).
- triatomic atom 3: given the two earlier atoms exactly, the third lies on a circle about their
  axis (same histogram method); atom 2: an upper bound, the sphere about atom 1 with the bond length
  of that pair, ignoring atom 3's cell (and for a non-bonded pair the 1–3 distance of the rigid body).
- diatomic atom 1 (``--atom1-cases N``, slow): its offsets are not uniform either, the tree fixes
  both cells, so atom 1 must be 1.20 Å from some point of c2; P(q1 | c1, c2) is proportional to the
  chance that the partner lands in c2, counted for all 24^3 candidates.

The histogram estimates are biased upwards by the finite sample (about 0.01-0.03 nats per axis at
200,000 samples against 1,000,000; the default is 500,000).

Run (defaults: diatomic, variants default / theta100 / norope, 1,500 steps each; about 8-9 minutes
on one thread of the shared 2-core machine, 0.10-0.12 s per step, plus 30-110 s for the estimates)::

    OMP_NUM_THREADS=1 python benchmarks/uni3dar_geometry_probe.py
    OMP_NUM_THREADS=1 python benchmarks/uni3dar_geometry_probe.py --data triatomic \
        --variants default,theta100 --steps 1000
    OMP_NUM_THREADS=1 python benchmarks/uni3dar_geometry_probe.py --placement bbox --variants default --steps 600
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace

import numpy as np
import torch

from threefold.science.octree import OctreeTokenizer, random_rotations
from threefold.science.uni3dar import Uni3DAR, Uni3DARConfig, build_sequences
from threefold.science.uni3dar.sequence import KIND_ATOM

BINS = 24
LN24 = math.log(BINS)

# rigid bodies: atomic numbers and positions (Å) in the molecule frame
BODIES = {
    "diatomic": (np.array([6, 8]), np.array([[0.0, 0.0, 0.0], [1.20, 0.0, 0.0]])),
    "triatomic": (
        np.array([8, 6, 7]),
        np.array([[1.20, 0, 0], [0, 0, 0], [1.35 * math.cos(2 * math.pi / 3), 1.35 * math.sin(2 * math.pi / 3), 0]]),
    ),
}

# model variants: (description, config overrides, position scale applied to batch.pos)
VARIANTS = {
    "default": ("d128 x3 layers, 4 heads (head dim 32: 5 RoPE pairs/axis), theta 1e4", {}, 1.0),
    "hd64": ("2 heads (head dim 64: 10 pairs/axis), theta 1e4", {"heads": 2}, 1.0),
    "theta100": ("4 heads, theta 100 (5 pairs/axis, wavelengths 0.063-2.5 Å)", {"rope_theta": 100.0}, 1.0),
    "xyzw1": ("default with xyz_weight 1.0", {"xyz_weight": 1.0}, 1.0),
    "norope": ("default, all positions 0 (no RoPE information)", {}, 0.0),
}


def make_batch(tok: OctreeTokenizer, body: str, n: int, rng: np.random.Generator, placement: str):
    """Tokens and sequences of ``n`` randomly oriented copies of the rigid ``body``."""
    numbers, frame = BODIES[body]
    frame = frame - (frame.max(0) + frame.min(0)) / 2
    rot = random_rotations(n, rng)
    pos = np.einsum("nij,aj->nai", rot, frame)  # (n, atoms, 3), bounding-box centre near 0
    counts = np.full(n, len(numbers))
    kw = {}
    if placement == "shift":
        # a continuous translation uniform over one cell, box fixed: uniform sub-cell *and* sub-voxel
        # position (moving the box by whole 0.01 Å units instead keeps the midpoint on the grid, so
        # q1 + q2 = 2 * midpoint and atom 2's parity per axis follows from atom 1's: a 0.69 nat leak)
        pos = pos + rng.uniform(-0.5, 0.5, (n, 1, 3)) * tok.spec.cell
        kw["center"] = np.zeros((n, 3))
    tokens = tok.tokenize_batch(np.tile(numbers, n), pos.reshape(-1, 3), counts, **kw)
    return tokens, build_sequences(tokens, tok.vocab)


def probe_rmse(h: torch.Tensor, target: torch.Tensor, ridge: float = 1e-3) -> float:
    """RMSE (target units) of a ridge-regression probe h -> target fitted on the first half, tested on the second."""
    x = torch.cat([h.double(), torch.ones(len(h), 1, dtype=torch.float64)], 1)
    y, n = target.double(), len(h) // 2
    w = torch.linalg.solve(x[:n].T @ x[:n] + ridge * n * torch.eye(x.shape[1], dtype=torch.float64), x[:n].T @ y[:n])
    return ((x[n:] @ w - y[n:]) ** 2).mean().sqrt().item()


def delta_last(batch) -> torch.Tensor:
    """q(previous atom token) - position of the last atom's [MASK] (B, 3), 0.01 Å units."""
    j = (batch.kind == KIND_ATOM).long().cumsum(1).argmax(1)  # last atom mask of each row
    rows = torch.arange(len(j))
    return batch.pos[rows, j - 1] - batch.pos[rows, j]


def per_atom_ce(model: Uni3DAR, batch, pos_scale: float, n_atoms: int) -> tuple[np.ndarray, float]:
    """Teacher-forced CE (nats) (n_atoms, 3) of x, y | x, z | x, y at each atom index (Morton order), and
    the linear-probe RMSE (0.01 Å) of ``delta_last`` from the last atom's [MASK] state."""
    with torch.no_grad():
        h = model.hidden(batch.tokens, batch.level, batch.pos * pos_scale, batch.xyz_in)
        atom_m = batch.kind == KIND_ATOM
        index = (atom_m.cumsum(1) - 1)[atom_m]
        ha, ty, xyz = h[atom_m], batch.type_target[atom_m], batch.xyz_target[atom_m]
        out = np.zeros((n_atoms, 3))
        for axis in range(3):
            ce = torch.nn.functional.cross_entropy(
                model.atom_logits(ha, ty, xyz, step=axis + 1).float(), xyz[:, axis], reduction="none"
            )
            for a in range(n_atoms):
                out[a, axis] = ce[index == a].mean().item()
        last = (batch.kind == KIND_ATOM).long().cumsum(1).argmax(1)
        rmse = probe_rmse(h[torch.arange(len(last)), last], delta_last(batch))
    return out, rmse


def _chain_ce(counts: np.ndarray, target: np.ndarray, alpha: float = 0.1) -> np.ndarray:
    """-log P(x), -log P(y|x), -log P(z|x,y) of the target offsets under a (24, 24, 24) count histogram."""
    c = counts + alpha
    x, y, z = target
    px = c.sum((1, 2))
    pyx = c[x].sum(1)
    pzxy = c[x, y]
    return -np.log(np.array([px[x] / px.sum(), pyx[y] / pyx.sum(), pzxy[z] / pzxy.sum()]))


def _hist_in_cell(q: np.ndarray, cell: np.ndarray) -> np.ndarray:
    off = q - cell * BINS
    ok = ((off >= 0) & (off < BINS)).all(1)
    o = off[ok]
    return np.bincount((o[:, 0] * BINS + o[:, 1]) * BINS + o[:, 2], minlength=BINS**3).reshape(BINS, BINS, BINS)


def _cap_directions(e: np.ndarray, cos_min: float, n: int, rng) -> np.ndarray:
    """``n`` unit vectors uniform over the cap of directions within arccos(cos_min) of the unit vector e."""
    cos_t = rng.uniform(cos_min, 1, n)
    phi = rng.uniform(0, 2 * math.pi, n)
    a = np.array([1.0, 0, 0]) if abs(e[0]) < 0.9 else np.array([0, 1.0, 0])
    n1 = np.cross(e, a)
    n1 /= np.linalg.norm(n1)
    n2 = np.cross(e, n1)
    sin_t = np.sqrt(1 - cos_t**2)
    return cos_t[:, None] * e + sin_t[:, None] * (np.cos(phi)[:, None] * n1 + np.sin(phi)[:, None] * n2)


def sphere_ce(q1: np.ndarray, cell2: np.ndarray, q2: np.ndarray, radius: float, rng, samples: int) -> np.ndarray:
    """Bayes CE (3,) of atom 2's x, y|x, z|x,y given q1 exact and atom 2 on a sphere (radius in 0.01 Å units)."""
    p1 = q1 + rng.uniform(-0.5, 0.5, (samples, 3))
    centre = cell2 * BINS + BINS / 2
    d = centre - q1
    D = np.linalg.norm(d)
    rc = BINS * math.sqrt(3) / 2 + 1.0
    cos_min = np.clip((radius**2 + D**2 - rc**2) / (2 * radius * D), -1, 1)
    u = _cap_directions(d / D, cos_min, samples, rng)
    return _chain_ce(_hist_in_cell(np.rint(p1 + radius * u).astype(np.int64), cell2), q2 - cell2 * BINS)


def circle_ce(qa, qb, cell3, q3, t: float, r: float, rng, samples: int) -> np.ndarray:
    """Bayes CE (3,) of a third atom at axial distance t and radius r (units) from atom a on the a->b axis."""
    pa = qa + rng.uniform(-0.5, 0.5, (samples, 3))
    pb = qb + rng.uniform(-0.5, 0.5, (samples, 3))
    e = pb - pa
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    a = np.array([1.0, 0, 0]) if abs(e[0, 0]) < 0.9 else np.array([0, 1.0, 0])
    n1 = np.cross(e, a)
    n1 /= np.linalg.norm(n1, axis=1, keepdims=True)
    n2 = np.cross(e, n1)
    phi = rng.uniform(0, 2 * math.pi, samples)[:, None]
    p3 = pa + t * e + r * (np.cos(phi) * n1 + np.sin(phi) * n2)
    return _chain_ce(_hist_in_cell(np.rint(p3).astype(np.int64), cell3), q3 - cell3 * BINS)


def atom1_ce(cell1, cell2, q1, radius: float, rng, dirs: int) -> np.ndarray:
    """Bayes CE (3,) of the diatomic's atom 1 given both cells (the tree): P(q1 | c1, c2) is proportional
    to the chance that the partner at ``radius`` lands in c2 (uniform prior on q1), counted for each
    of the 24^3 candidate q1 over ``dirs`` shared directions in the cap covering c2."""
    o = np.stack(np.meshgrid(*[np.arange(BINS)] * 3, indexing="ij"), -1).reshape(-1, 3)
    base = cell1 * BINS + o
    d = (cell2 - cell1) * BINS
    D = np.linalg.norm(d)
    e = d / D
    rc = BINS * math.sqrt(3) + 2.0
    u = _cap_directions(e, np.clip((radius**2 + D**2 - rc**2) / (2 * radius * D), -1, 1), dirs, rng)
    hits = np.zeros(len(base))
    for k in range(0, dirs, 250):
        p2 = base[:, None, :] + rng.uniform(-0.5, 0.5, (len(base), 1, 3)) + radius * u[None, k : k + 250]
        off = np.rint(p2).astype(np.int64) - cell2 * BINS
        hits += ((off >= 0) & (off < BINS)).all(-1).sum(1)
    return _chain_ce(hits.reshape(BINS, BINS, BINS), q1 - cell1 * BINS, alpha=0.01)


def ideal_ce(
    tok: OctreeTokenizer, body: str, placement: str, cases: int, samples: int, seed: int, atom1_cases: int = 0
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Monte Carlo Bayes CE (mean, standard error) per atom index (1-based: 2 for the diatomic, and 1 on
    the first ``atom1_cases`` cases; 2 (upper bound) and 3 for the triatomic)."""
    rng = np.random.default_rng(seed + 12345)
    tokens, _ = make_batch(tok, body, cases, rng, placement)
    numbers, frame = BODIES[body]
    ids = tok.vocab.element_ids(numbers, "probe")
    k = len(numbers)
    q = tokens.atom_cell * BINS + tokens.atom_xyz
    types = tokens.atom_type.reshape(cases, k)
    q, cells = q.reshape(cases, k, 3), tokens.atom_cell.reshape(cases, k, 3)
    res = tok.spec.resolution
    out: dict[int, list] = {2: []} if k == 2 else {2: [], 3: []}
    if k == 2 and atom1_cases:
        out[1] = [atom1_ce(cells[i, 0], cells[i, 1], q[i, 0], 1.20 / res, rng, 1500) for i in range(atom1_cases)]
    for i in range(cases):
        which = [int(np.flatnonzero(ids == t)[0]) for t in types[i]]  # frame index of each sequence atom
        f = frame[which] / res
        out[2].append(sphere_ce(q[i, 0], cells[i, 1], q[i, 1], np.linalg.norm(f[1] - f[0]), rng, samples))
        if k == 3:
            ab = f[1] - f[0]
            t = np.dot(f[2] - f[0], ab) / np.linalg.norm(ab)
            r = math.sqrt(max(np.sum((f[2] - f[0]) ** 2) - t**2, 0.0))
            out[3].append(circle_ce(q[i, 0], q[i, 1], cells[i, 2], q[i, 2], t, r, rng, samples))
    return {a: (np.mean(v, 0), np.std(v, 0) / math.sqrt(len(v))) for a, v in sorted(out.items())}


def train(variant: str, body: str, args, tok: OctreeTokenizer, held):
    """Train one variant; yields (step, per-atom CE (atoms, 3), probe RMSE, seconds of training so far)."""
    _, overrides, pos_scale = VARIANTS[variant]
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    cfg = replace(Uni3DARConfig(vocab_size=len(tok.vocab), depth=tok.spec.depth, d_model=args.d_model,
                                layers=args.layers, heads=4), **overrides)  # fmt: skip
    model = Uni3DAR(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
    n_atoms = len(BODIES[body][0])
    t0, t_eval = time.perf_counter(), 0.0
    evals = set(np.unique(np.linspace(0, args.steps, args.evals + 1).astype(int)).tolist())
    for step in range(args.steps + 1):
        if step in evals:
            t1 = time.perf_counter()
            model.eval()
            ce = per_atom_ce(model, held, pos_scale, n_atoms)
            model.train()
            t_eval += time.perf_counter() - t1
            yield step, *ce, time.perf_counter() - t0 - t_eval
        if step == args.steps:
            break
        _, batch = make_batch(tok, body, args.batch, rng, args.placement)
        batch.pos = batch.pos * pos_scale
        loss = model.loss(batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="diatomic", help="comma list of diatomic, triatomic")
    p.add_argument("--variants", default="default,theta100,norope", help="comma list of " + ", ".join(VARIANTS))
    p.add_argument("--placement", choices=("shift", "bbox"), default="shift")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--evals", type=int, default=3, help="evaluations of the held-out CE over the run")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--heldout", type=int, default=1024)
    p.add_argument("--ideal-cases", type=int, default=300)
    p.add_argument("--ideal-samples", type=int, default=500_000)
    p.add_argument("--atom1-cases", type=int, default=0, help="diatomic atom-1 Bayes estimate (about 2 s a case)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    tok = OctreeTokenizer("qm9")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, placement {args.placement}, "
          f"seed {args.seed}, batch {args.batch}, lr {args.lr}, {args.layers} x {args.d_model}; "
          f"CE nats, uniform ln 24 = {LN24:.3f}")  # fmt: skip
    for body in args.data.split(","):
        t0 = time.perf_counter()
        n_atoms = len(BODIES[body][0])
        if args.placement == "bbox":  # the sphere / circle estimates assume a uniform sub-cell placement
            ideal = {a: (np.full(3, np.nan),) * 2 for a in range(2, n_atoms + 1)}
        else:
            ideal = ideal_ce(
                tok, body, args.placement, args.ideal_cases, args.ideal_samples, args.seed, args.atom1_cases
            )
        print(f"\n## {body}: Bayes CE estimate (x, y|x, z|x,y; {args.ideal_cases} cases, "
              f"{args.ideal_samples} samples each, {time.perf_counter() - t0:.0f} s)")  # fmt: skip
        if args.placement == "bbox":
            print("not estimated: with bounding-box centring atom 2 is the point reflection of atom 1 (q2 = 1536 - q1)")
        for a, (v, se) in ideal.items() if args.placement == "shift" else ():
            bound = " (upper bound: ignores the third atom's cell)" if body == "triatomic" and a == 2 else ""
            print(f"atom {a}: {v[0]:.3f} / {v[1]:.3f} / {v[2]:.3f} (standard error {se[0]:.3f} / {se[1]:.3f} / "
                  f"{se[2]:.3f}), sum {v.sum():.2f} against 3 ln 24 = {3 * LN24:.2f}{bound}")
        _, held = make_batch(tok, body, args.heldout, np.random.default_rng(args.seed + 999), args.placement)
        head = " | ".join(f"atom {a + 1} x / y / z" for a in range(n_atoms))
        d = delta_last(held)
        print(f"linear probe of q(atom {n_atoms - 1} token) - atom {n_atoms}'s [MASK] position from that mask's "
              f"state (0.01 Å): predicting the mean {(d - d.mean(0)).pow(2).mean().sqrt():.1f}; knowing both cells "
              f"but not the offset {BINS / math.sqrt(12):.1f}")  # fmt: skip
        print(f"\n| variant | steps | {head} | ideal atom {n_atoms} x / y / z | probe RMSE | s |")
        print("|---|---|" + "---|" * n_atoms + "---|---|---|")
        for variant in args.variants.split(","):
            iv = ideal[n_atoms][0]
            for step, ce, rmse, sec in train(variant, body, args, tok, held):
                cells = " | ".join(" / ".join(f"{c:.2f}" for c in ce[a]) for a in range(n_atoms))
                ideal_cells = f"{iv[0]:.2f} / {iv[1]:.2f} / {iv[2]:.2f}"
                print(f"| {variant} | {step} | {cells} | {ideal_cells} | {rmse:.1f} | {sec:.0f} |", flush=True)
    print("\nvariants:", "; ".join(f"{k}: {v[0]}" for k, v in VARIANTS.items()))


if __name__ == "__main__":
    main()
