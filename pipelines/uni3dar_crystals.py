"""``mp20-uni3dar``: Uni-3DAR on crystals: lattice-corner tree + atom tree, train, sample, evaluate.

Lu et al., "Uni-3DAR" (2025), crystals (MP-20): each crystal is two octrees in one box frame
centred on the lattice centre: the eight lattice-corner pseudo-atoms (distinct ``[LATTICE_ijk]``
tokens, so the lattice is recovered exactly) and the atoms wrapped into the cell (0.24 Å cells,
depth 8, 61.44 Å box). The sequences are joined per crystal (tree embedding 0 / 1); the sampler
generates the lattice tree, then the atom tree. Augmentation: a uniform random rotation of cell and
atoms together and a placement shift of up to one cell.

Reported: held-out per-token cross-entropy by token type beside a unigram baseline, and for
``sample.num`` sampled crystals the CDVAE structural validity (shortest periodic distance > 0.5 Å,
volume > 0.1 Å³), composition validity (charge neutrality with common oxidation states and the
Pauling test, see :mod:`threefold.science.crystal_metrics`), their conjunction, the fraction with a
well-formed lattice tree (each corner once, non-singular cell), and crystals per second. Match rate
against held-out structures needs pymatgen's ``StructureMatcher`` and is not computed.
With ``optim.ema_decay > 0`` these use an EMA of the weights, as in :mod:`threefold.pipelines.uni3dar`.

Data: ``--data`` an MP-20 CSV (``cif`` column); without it an embedded sample built with ASE: the
reference-state crystals that ``ase.build.bulk`` builds without extra input (fcc, bcc, hcp,
diamond, sc), plus the eight COD
CIFs shipped in ASE's test data, written to ``run_dir/data`` as CIF.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from threefold.datasets.errors import MissingFileError, require
from threefold.datasets.splits import seed_everything
from threefold.pipelines.engine import RunContext
from threefold.pipelines.registry import Pipeline, register_pipeline
from threefold.pipelines.uni3dar import (
    AugmentSection,
    MoleculeTokenData,
    Uni3DARRunConfig,
    build_module,
    ema_metrics,
    final_heldout,
    fit_with_ema,
)
from threefold.science.crystal_metrics import composition_valid, structure_valid
from threefold.science.octree import OctreeTokenizer, random_rotations
from threefold.science.uni3dar import build_sequences, generate
from threefold.science.uni3dar.sequence import SequenceBatch, join_sequences


def embedded_crystals(out_dir: Path | None = None) -> list[dict[str, Any]]:
    """ASE reference-state crystals (``ase.build.bulk``) and ASE's eight COD test CIFs."""
    ase_build = require("ase.build", extra="mol")
    import ase
    import ase.data

    from threefold.datasets.crystals import read_cif, write_cif

    out = []
    for z in range(1, 84):
        state = ase.data.reference_states[z]
        if not state or state.get("symmetry") not in ("fcc", "bcc", "hcp", "diamond", "sc"):
            continue
        try:
            atoms = ase_build.bulk(ase.data.chemical_symbols[z])
        except ValueError:  # reference state without a default basis in ASE: not part of the sample
            continue
        out.append({"numbers": atoms.numbers.astype(np.int64), "positions": atoms.get_positions().astype(np.float32),
                    "lattice": atoms.cell.array.astype(np.float32), "name": ase.data.chemical_symbols[z]})  # fmt: skip
    for p in sorted((Path(ase.__file__).parent / "test/testdata/minerals").glob("*.cif")):
        out.append(read_cif(p))
    if out_dir is not None:
        for i, c in enumerate(out):
            write_cif(c, out_dir / f"{i:03d}_{Path(str(c['name'])).stem}.cif")
    return out


def load_crystals(data: Path | None, run_dir: Path, limit: int = 0) -> tuple[list[dict[str, Any]], str]:
    if data is None:
        crystals = embedded_crystals(run_dir / "data")
        source = "embedded (ASE bulk reference states + ASE's 8 COD test CIFs)"
    else:
        if not data.is_file():
            raise MissingFileError(f"--data {data}: expected the MP-20 CSV file (with a 'cif' column)")
        from threefold.datasets.crystals import read_mp20_csv

        crystals, source = read_mp20_csv(data), str(data)
    return (crystals[:limit] if limit else crystals), source


class CrystalCollate:
    """Indices -> rotated (cell and atoms together), shifted, tokenized and joined two-tree sequences."""

    def __init__(self, crystals, tokenizer: OctreeTokenizer, augment: AugmentSection | None, seed: int) -> None:
        self.crystals, self.tokenizer, self.augment, self.seed = crystals, tokenizer, augment, seed

    def __call__(self, indices: list[int]) -> SequenceBatch:
        rng = np.random.default_rng([self.seed, *indices])
        cs = [self.crystals[i] for i in indices]
        counts = np.array([len(c["numbers"]) for c in cs])
        lattices = np.stack([np.asarray(c["lattice"], np.float64) for c in cs])
        pos = np.concatenate([np.asarray(c["positions"], np.float64) for c in cs])
        shift = None
        if self.augment is not None and self.augment.rotate:
            rot = random_rotations(len(cs), rng)
            mol = np.repeat(np.arange(len(cs)), counts)
            pos = np.einsum("nij,nj->ni", rot[mol], pos)
            lattices = np.einsum("bij,bkj->bki", rot, lattices)  # rows rotated: a' = R a
        if self.augment is not None and self.augment.shift_cells:
            shift = rng.integers(-self.augment.shift_cells, self.augment.shift_cells + 1, (len(cs), 3))
        numbers = np.concatenate([np.asarray(c["numbers"], np.int64) for c in cs])
        tokens = self.tokenizer.tokenize_crystals(numbers, pos, lattices, counts, shift=shift)
        vocab = self.tokenizer.vocab
        parts = [build_sequences(tokens.lattice, vocab, tree_index=0), build_sequences(tokens.atoms, vocab, tree_index=1)]
        return join_sequences(parts, vocab.pad, self.tokenizer.spec.bins)


def decode_crystal(types: np.ndarray, positions: np.ndarray, trees: np.ndarray, vocab) -> dict[str, Any] | None:
    """A sampled crystal (box-frame positions, Å) -> numbers, frac, lattice; None when the lattice
    tree does not hold each corner exactly once or the cell is singular."""
    corner = types[trees == 0] - vocab.lattice_offset
    if sorted(corner.tolist()) != list(range(8)):
        return None
    by_corner = np.empty((8, 3))
    by_corner[corner] = positions[trees == 0]
    lattice = by_corner[[1, 2, 4]] - by_corner[0]
    if abs(np.linalg.det(lattice)) < 1e-6:
        return None
    cart = positions[trees == 1] - by_corner[0]
    return {"numbers": vocab.atomic_numbers(types[trees == 1]), "frac": cart @ np.linalg.inv(lattice), "lattice": lattice}


@register_pipeline
class MP20Uni3DAR(Pipeline):
    name = "mp20-uni3dar"
    description = "Uni-3DAR crystal generation (lattice-corner tree + atom tree) on MP-20 (train, sample, evaluate)"
    config_class = Uni3DARRunConfig

    def run(self, cfg: Uni3DARRunConfig, ctx: RunContext) -> dict[str, Any]:
        seed_everything(cfg.seed)
        tokenizer = OctreeTokenizer(cfg.octree)
        crystals, source = load_crystals(ctx.data, ctx.run_dir, cfg.limit_molecules)
        order = np.random.default_rng(cfg.seed).permutation(len(crystals))
        n_held = max(1, int(round(cfg.heldout_fraction * len(crystals))))
        heldout_idx, train_idx = np.sort(order[:n_held]), np.sort(order[n_held:])
        data = MoleculeTokenData(crystals, train_idx, heldout_idx, tokenizer, cfg.augment, cfg.trainer.batch_size,
                                 cfg.seed, cfg.trainer.num_workers, collate_cls=CrystalCollate)  # fmt: skip
        module = build_module(cfg, tokenizer, num_trees=2)
        t0 = time.perf_counter()
        trainer, ema = fit_with_ema(ctx, module, data, cfg.optim.ema_decay)
        metrics: dict[str, Any] = {
            "pipeline": self.name, "data": source, "train_crystals": len(train_idx),
            "heldout_crystals": len(heldout_idx), "seed": cfg.seed, "global_step": int(trainer.global_step),
            "train_seconds": time.perf_counter() - t0, **ema_metrics(ema),
        }  # fmt: skip
        if not trainer.is_global_zero:
            return metrics
        model, device, heldout = final_heldout(module, ema, data, len(tokenizer.vocab), tokenizer.spec.bins)
        metrics.update(heldout)
        elements = np.unique(np.concatenate([np.asarray(crystals[i]["numbers"]) for i in train_idx]))
        metrics["sampling"] = self._sample(model, tokenizer, cfg, elements, device, ctx.run_dir / "samples.json")
        ctx.export_weights(module.model)
        if ema is not None:
            ema.swap_back(module)
        return metrics

    def figures(self, cfg: Uni3DARRunConfig, run_dir: Path, metrics: dict[str, Any]) -> list[Path]:
        """Curves; tree-token lengths (lattice + atom trees) of the run's crystals with and without
        the two-level compression; the first 12 sampled crystals in their cells with validity marks
        (structural and composition validity, as in the metrics)."""
        from threefold.pipelines.figures import figures_dir
        from threefold.pipelines.figures_molecules import plot_crystal_grid
        from threefold.pipelines.uni3dar import TOKEN_FIGURE_LIMIT, _chunks, token_length_figure

        paths = super().figures(cfg, run_dir, metrics)
        out = figures_dir(run_dir)
        data_file = run_dir / "data_path.txt"
        crystals, _ = load_crystals(Path(data_file.read_text().strip()) if data_file.is_file() else None, run_dir,
                                    cfg.limit_molecules)  # fmt: skip
        tok = OctreeTokenizer(cfg.octree)
        compressions = []
        for chunk in _chunks(crystals[:TOKEN_FIGURE_LIMIT]):
            t = tok.tokenize_crystals(np.concatenate([np.asarray(c["numbers"], np.int64) for c in chunk]),
                                      np.concatenate([np.asarray(c["positions"], np.float64) for c in chunk]),
                                      np.stack([np.asarray(c["lattice"], np.float64) for c in chunk]),
                                      np.array([len(c["numbers"]) for c in chunk]))  # fmt: skip
            lat, atoms = t.lattice.compression(), t.atoms.compression()
            compressions.append({k: lat[k] + atoms[k] for k in ("tree_tokens", "child_tokens", "slot_tokens")})
        if compressions:
            paths.append(token_length_figure(out, compressions, cfg.octree, len(crystals)))
        samples = run_dir / "samples.json"
        if samples.is_file():
            decoded = json.loads(samples.read_text())
            valid = [c is not None and len(c["numbers"]) > 0 and structure_valid(np.asarray(c["frac"]), np.asarray(c["lattice"]))
                     and composition_valid(np.asarray(c["numbers"])) for c in decoded]  # fmt: skip
            if decoded:
                paths.append(plot_crystal_grid(out / "samples.png", decoded, valid))
        return paths

    @staticmethod
    def _sample(model, tokenizer: OctreeTokenizer, cfg: Uni3DARRunConfig, elements, device, out: Path) -> dict:
        vocab, s = tokenizer.vocab, cfg.sample
        allowed = [torch.as_tensor(vocab.lattice_ids()), torch.as_tensor(vocab.element_ids(elements))]
        g = torch.Generator(device=device).manual_seed(cfg.seed)
        t0 = time.perf_counter()
        gens = [generate(model, tokenizer.spec, vocab, min(s.batch_size, s.num - k), allowed_types=allowed,
                         generator=g, temperature=s.temperature, top_k=s.top_k, max_items=s.max_items)
                for k in range(0, s.num, s.batch_size)]  # fmt: skip
        seconds = time.perf_counter() - t0
        decoded = []
        for gen in gens:
            for b in range(len(gen)):
                a0, a1 = gen.atom_ptr[b], gen.atom_ptr[b + 1]
                ok = gen.complete[b]
                decoded.append(decode_crystal(gen.types[a0:a1], gen.positions[a0:a1], gen.atom_tree[a0:a1], vocab)
                               if ok else None)  # fmt: skip
        struct = [c is not None and len(c["numbers"]) > 0 and structure_valid(c["frac"], c["lattice"]) for c in decoded]
        comp = [c is not None and len(c["numbers"]) > 0 and composition_valid(c["numbers"]) for c in decoded]
        out.write_text(json.dumps([None if c is None else {k: np.asarray(v).tolist() for k, v in c.items()}
                                   for c in decoded]))  # fmt: skip
        n = max(len(decoded), 1)
        result = {
            "num_sampled": s.num,
            "complete": float(np.mean([g.complete.mean() for g in gens])),
            "well_formed_lattice": sum(c is not None for c in decoded) / n,
            "structural_validity": sum(struct) / n,
            "composition_validity": sum(comp) / n,
            "valid": sum(a and b for a, b in zip(struct, comp)) / n,
            "crystals_per_second": s.num / seconds,
            "filtering": "off" if s.keep_fraction >= 1.0 else f"best {s.keep_fraction:.0%} by atom perplexity",
        }
        if s.keep_fraction < 1.0:
            from threefold.pipelines.uni3dar import _concat_generated
            from threefold.science.uni3dar.sampling import filter_best_fraction

            kept = filter_best_fraction(_concat_generated(gens), s.keep_fraction).kept
            k = max(int(kept.sum()), 1)
            result["filtered"] = {
                "num_kept": int(kept.sum()),
                "structural_validity": sum(v for v, keep in zip(struct, kept) if keep) / k,
                "composition_validity": sum(v for v, keep in zip(comp, kept) if keep) / k,
                "valid": sum(a and b for a, b, keep in zip(struct, comp, kept) if keep) / k,
            }
        return result
