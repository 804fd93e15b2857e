"""Uni-3DAR model speed at the reference size (12 layers x 768, 12 heads) on one GPU.

Measures, on QM9-like molecules of the embedded sample (tokenized with the QM9 octree, random
rotations), with bf16 autocast:
- training: tokens per second of forward + backward + AdamW step, and peak memory, for
  ``scaled_dot_product_attention`` with its default kernel choice (flash / memory-efficient) and
  with the math kernel forced (the peer: what attention costs without fused kernels);
- sampling: molecules per second of the batched level-by-level sampler with a key/value cache, run
  for the mean QM9-like item count (tree nodes + atoms) per molecule. The weights are random, so
  the sampled trees are not molecules; the work per step is the same as for a trained model.

    python benchmarks/uni3dar_gpu.py --batch 64 --steps 20 --samples 1000
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from threefold.datasets.molecule_samples import embedded_molecules
from threefold.science.octree import OctreeTokenizer, random_rigid_motion
from threefold.science.uni3dar import Uni3DAR, Uni3DARConfig, build_sequences, generate


def batch_of(tok: OctreeTokenizer, mols, n: int, seed: int):
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(mols), n)
    counts = np.array([len(mols[i]["numbers"]) for i in pick])
    pos, _, _ = random_rigid_motion(np.concatenate([mols[i]["positions"] for i in pick]), counts, rng)
    tokens = tok.tokenize_batch(np.concatenate([mols[i]["numbers"] for i in pick]), pos, counts)
    return build_sequences(tokens, tok.vocab), tokens


def train_rate(model: Uni3DAR, seqs, steps: int, math_only: bool) -> tuple[float, float]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    backends = [SDPBackend.MATH] if math_only else [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                                    SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]  # fmt: skip
    torch.cuda.reset_peak_memory_stats()
    tokens = 0
    with sdpa_kernel(backends):
        for i in range(steps + 3):
            if i == 3:
                torch.cuda.synchronize()
                t0, tokens = time.perf_counter(), 0
            s = seqs[i % len(seqs)]
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model.loss(s)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tokens += int((s.tokens != 0).sum())
        torch.cuda.synchronize()
    return tokens / (time.perf_counter() - t0), torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    dev = torch.device("cuda")
    print(f"machine: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"python {platform.python_version()}")  # fmt: skip
    tok = OctreeTokenizer("qm9")
    mols = embedded_molecules()
    seqs = [batch_of(tok, mols, args.batch, seed)[0].to(dev) for seed in range(4)]
    _, tokens = batch_of(tok, mols, 2000, 99)
    items = float((np.diff(tokens.tree_ptr) + np.diff(tokens.atom_ptr)).mean())
    cfg = Uni3DARConfig(vocab_size=len(tok.vocab), bins=tok.spec.bins, depth=tok.spec.depth,
                        d_model=args.d_model, layers=args.layers, heads=args.heads)  # fmt: skip
    torch.manual_seed(0)
    model = Uni3DAR(cfg).to(dev)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"model: {args.layers} x {args.d_model}, {args.heads} heads, {params:.1f} M parameters; "
          f"batch {args.batch} molecules, padded to {seqs[0].tokens.shape[1]} positions")  # fmt: skip
    fused, mem_fused = train_rate(model, seqs, args.steps, math_only=False)
    math, mem_math = train_rate(model, seqs, args.steps, math_only=True)
    print(f"{'workload':<34}{'implementation':<30}{'rate':>14}{'peak GiB':>10}{'ratio':>8}")
    print(f"{'training, bf16 (tokens/s)':<34}{'SDPA math kernel (peer)':<30}{math:>14,.0f}{mem_math:>10.2f}{1.0:>8.2f}")
    print(f"{'training, bf16 (tokens/s)':<34}{'SDPA fused kernels':<30}{fused:>14,.0f}{mem_fused:>10.2f}"
          f"{fused / math:>8.2f}")  # fmt: skip
    allowed = torch.as_tensor(tok.vocab.element_ids(np.array([1, 6, 7, 8, 9])))
    model.eval()
    steps = int(round(items))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        generate(model, tok.spec, tok.vocab, 8, allowed_types=allowed,
                 generator=torch.Generator(device=dev).manual_seed(0), max_items=8)  # warm-up  # fmt: skip
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        generate(model, tok.spec, tok.vocab, args.samples, allowed_types=allowed,
                 generator=torch.Generator(device=dev).manual_seed(0), max_items=steps)  # fmt: skip
        torch.cuda.synchronize()
    rate = args.samples / (time.perf_counter() - t0)
    print(f"{'sampling, bf16 (molecules/s)':<34}{f'KV cache, batch {args.samples}, {steps} items':<30}{rate:>14,.1f}"
          f"{torch.cuda.max_memory_allocated() / 2**30:>10.2f}{'':>8}")  # fmt: skip


if __name__ == "__main__":
    main()
