"""``qm9-uni3dar``: train the Uni-3DAR decoder on octree tokens of molecules, sample, evaluate.

Lu et al., "Uni-3DAR: Unified 3D Generation and Understanding via Autoregression on Compressed
Spatial Tokens" (2025). Each molecule (hydrogens kept) is tokenized by
:class:`~threefold.science.octree.OctreeTokenizer` (0.24 Å cells, depth 6 for QM9 / 7 for
GEOM-DRUGS), augmented per batch (uniform random rotation, one Gaussian translation of sigma
0.12 Å, a random placement shift of up to one cell, level-1 node deletion with ratio up to 10 %),
laid out for masked next-token prediction and fed to :class:`~threefold.science.uni3dar.Uni3DAR`.

After training the run reports, on the held-out molecules, the per-token cross-entropy of each
token type (tree, atom type, x, y, z; nats) beside a unigram baseline fitted on the training
tokens, then samples ``sample.num`` molecules (filtering off unless ``sample.keep_fraction < 1``,
which is then reported; per-type temperatures ``sample.tree_temperature`` / ``atom_temperature`` /
``xyz_temperature``, the shipped config has the reference's QM9 values 0.9 / 0.3 / 0.3) and scores validity, uniqueness, novelty and EDM stability, plus molecules
generated per second. With ``optim.ema_decay > 0`` (the shipped configs: 0.999, as the reference)
validation, held-out CE, sampling and the exported weights use an EMA of the weights
(:mod:`threefold.pipelines.ema`); ``metrics.json`` then also holds the held-out CE of the last
training weights (``heldout_cross_entropy_training_weights``).

Data: without ``--data`` the embedded sample (419 QM9-like NCI molecules, RDKit ETKDG conformers,
see :mod:`threefold.datasets.molecule_samples`) is used and written to ``run_dir/data`` as XYZ;
samples go to ``run_dir/samples.xyz``. Without RDKit (the GPU image) validity is left to
:func:`score_xyz_samples`, run later where RDKit is installed.
``--data`` takes a QM9 folder (``dsgdb9nsd_*.xyz``), an SDF file or a plain multi-frame XYZ file.

``tokenize_command`` implements ``threefold tokenize --input FILE --out tokens.json [--decode]``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Union

import lightning as L
import numpy as np
import torch

from threefold.datasets.errors import ConfigError, DataFormatError, MissingExtraError, MissingFileError, require
from threefold.datasets.splits import seed_everything
from threefold.pipelines.config import RunConfig, config_to_dict
from threefold.pipelines.ema import EMACallback, ema_callback, ema_state_dict
from threefold.pipelines.engine import RunContext, load_checkpoint
from threefold.pipelines.registry import Pipeline, register_pipeline
from threefold.science.octree import PRESETS, OctreeSpec, OctreeTokenizer, detokenize, random_rigid_motion
from threefold.science.uni3dar import Uni3DAR, Uni3DARConfig, build_sequences, drop_level1_nodes
from threefold.science.uni3dar.sampling import filter_best_fraction, generate
from threefold.science.uni3dar.sequence import KIND_ATOM, KIND_TREE, SequenceBatch

TOKEN_TYPES = ("tree", "type", "x", "y", "z")


@dataclass
class ModelSection:
    d_model: int = 64
    layers: int = 3
    heads: int = 4
    dropout: float = 0.0  # the reference uses 0.1 (residual, attention, embedding, head)
    mlp_heads: bool = True  # the reference's two-layer TaskHead (False: single linear heads, the old layout)
    loss_norm: str = "type"  # "type": per-type means; "token": the reference's sum over tokens / items
    xyz_weight: float = 0.1  # reference --loss-ratio-xyz 0.1


@dataclass
class OptimSection:
    lr: float = 1.0e-3
    weight_decay: float = 0.01  # decoupled (AdamW); the reference: 1e-4
    warmup_steps: int = 100
    beta2: float = 0.999  # the reference: Adam betas (0.9, 0.99), eps 1e-6
    eps: float = 1.0e-8
    # EMA of the weights for validation, held-out CE, sampling and model.safetensors (pipelines/ema.py;
    # warm-up min(decay, (1 + n) / (10 + n))); 0 = off. The reference validates with 0.999.
    ema_decay: float = 0.0


@dataclass
class AugmentSection:
    rotate: bool = True
    translation_sigma: float = 0.12  # Å, one translation per molecule (half a cell, as the reference)
    shift_cells: int = 1  # random placement shift of up to this many cells per axis
    level1_delete: float = 0.1  # max ratio of level-1 nodes deleted (0.1 molecules, 0.4 proteins)


@dataclass
class SampleSection:
    num: int = 1000
    batch_size: int = 500
    temperature: float = 1.0
    # per token type (reference QM9 inference: tree 0.9, atom 0.3, xyz 0.3); None: ``temperature``
    tree_temperature: Union[float, None] = None
    atom_temperature: Union[float, None] = None
    xyz_temperature: Union[float, None] = None
    top_k: int = 0
    max_items: int = 400  # tree nodes + atoms per molecule before a sample counts as incomplete
    keep_fraction: float = 1.0  # best-fraction filtering by atom perplexity: 1.0 = off


@dataclass
class Uni3DARRunConfig(RunConfig):
    octree: str = "qm9"  # preset: qm9 | drug | mp20 | protein
    cutoff: bool = False
    heldout_fraction: float = 0.1
    limit_molecules: int = 0  # 0 = all
    token_cache: str = ""  # `threefold prepare qm9 --out CACHE` (with --data the same QM9 folder); "" = parse and tokenize here
    compile: bool = False  # torch.compile the transformer blocks for training (GPUs; the first steps compile)
    model: ModelSection = field(default_factory=ModelSection)
    optim: OptimSection = field(default_factory=OptimSection)
    augment: AugmentSection = field(default_factory=AugmentSection)
    sample: SampleSection = field(default_factory=SampleSection)


# --- data -----------------------------------------------------------------------------------------------------


def load_molecules(data: Path | None, run_dir: Path, limit: int = 0) -> tuple[list[dict[str, Any]], str]:
    """Molecule samples (``numbers``, ``positions`` Å) and a name of their source."""
    if data is None:
        from threefold.datasets.molecule_samples import embedded_molecules

        mols = embedded_molecules(limit=limit or None)
        write_xyz(run_dir / "data" / "embedded_qm9_like.xyz", [(m["numbers"], m["positions"]) for m in mols],
                  OctreeTokenizer("qm9").vocab)  # fmt: skip
        return mols, "embedded (419 QM9-like NCI molecules, RDKit ETKDG seed 42)"
    if not data.exists():
        raise MissingFileError(f"--data {data}: no such file or folder")
    if data.is_dir() and any(data.glob("*.pickle")):  # GEOM-DRUGS rdkit_folder/drugs
        from threefold.datasets.geom_drugs import read_geom_pickle

        mols = [m for p in sorted(data.glob("*.pickle")) for m in read_geom_pickle(p)]
    elif data.is_dir():
        from threefold.datasets.qm9 import read_qm9_folder

        mols = read_qm9_folder(data, limit=limit or None)
    elif data.suffix.lower() in (".sdf", ".mol"):
        from threefold.datasets.molecules import read_sdf

        mols = read_sdf(data, sanitize=False)
    elif data.suffix.lower() == ".xyz":
        mols = [{"numbers": z, "positions": p.astype(np.float32)} for z, p in read_xyz_frames(data)]
    elif data.suffix.lower() == ".csv":
        from threefold.datasets.qm9 import read_qm9_structures_csv

        mols = read_qm9_structures_csv(data)
    else:
        raise DataFormatError(
            f"--data {data}: expected a QM9 folder, an .sdf, a plain multi-frame .xyz or a QM9 structures .csv"
        )
    return (mols[:limit] if limit else mols), str(data)


class TokenCollate:
    """Indices -> augmented, tokenized, padded :class:`SequenceBatch`; one vectorised tokenizer call per batch.

    The random stream of a batch is seeded by (seed, batch indices), so a batch is reproducible
    wherever and whenever it is built (workers, resumption).
    """

    def __init__(
        self, mols: list[dict[str, Any]], tokenizer: OctreeTokenizer, augment: AugmentSection | None, seed: int
    ) -> None:
        self.numbers = [np.asarray(m["numbers"], np.int64) for m in mols]
        self.positions = [np.asarray(m["positions"], np.float64) for m in mols]
        self.tokenizer = tokenizer
        self.augment = augment
        self.seed = seed

    def tokens(self, indices: list[int]):
        rng = np.random.default_rng([self.seed, *indices])
        counts = np.array([len(self.numbers[i]) for i in indices])
        numbers = np.concatenate([self.numbers[i] for i in indices])
        pos = np.concatenate([self.positions[i] for i in indices])
        aug = self.augment
        shift = None
        if aug is not None:
            pos, _, _ = random_rigid_motion(pos, counts, rng, rotate=aug.rotate, sigma=aug.translation_sigma)
            if aug.shift_cells:
                shift = rng.integers(-aug.shift_cells, aug.shift_cells + 1, (len(indices), 3))
        tokens = self.tokenizer.tokenize_batch(numbers, pos, counts, shift=shift, rng=rng)
        keep = drop_level1_nodes(tokens, aug.level1_delete, rng) if aug is not None and aug.level1_delete else None
        return tokens, keep

    def __call__(self, indices: list[int]) -> SequenceBatch:
        tokens, keep = self.tokens(indices)
        return build_sequences(tokens, self.tokenizer.vocab, keep)


class CachedTokenCollate(TokenCollate):
    """:class:`TokenCollate` with the canonical tokens of ``threefold prepare qm9``: a batch without
    augmentation (and without cutoff cropping) takes its molecules' stored tokens, identical to
    tokenizing them here; an augmented batch is tokenized after its random motion, as without the cache."""

    def __init__(self, mols, tokenizer: OctreeTokenizer, augment: AugmentSection | None, seed: int, *, cached) -> None:
        super().__init__(mols, tokenizer, augment, seed)
        self.cached = cached
        a = augment
        self.use_cache = not tokenizer.cutoff and (a is None or (not a.rotate and a.translation_sigma == 0
                                                                 and a.shift_cells == 0 and a.level1_delete == 0))

    def tokens(self, indices: list[int]):
        if not self.use_cache:
            return super().tokens(indices)
        from threefold.science.qm9_tokens import take_structures

        return take_structures(self.cached, indices), None


class _Subset(torch.utils.data.Dataset):
    def __init__(self, idx: np.ndarray) -> None:
        self.idx = idx

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i: int) -> int:
        return int(self.idx[i])


class MoleculeTokenData(L.LightningDataModule):
    """Training molecules (augmented every batch) and held-out molecules (one fixed random rotation)."""

    def __init__(
        self, mols, train_idx, heldout_idx, tokenizer, augment, batch_size, seed, num_workers=0, collate_cls=None
    ) -> None:
        super().__init__()
        collate_cls = collate_cls or TokenCollate
        self.train_collate = collate_cls(mols, tokenizer, augment, seed)
        rotate_only = AugmentSection(rotate=True, translation_sigma=0.0, shift_cells=0, level1_delete=0.0)
        self.eval_collate = collate_cls(mols, tokenizer, rotate_only, seed + 1)
        self.train_idx, self.heldout_idx = train_idx, heldout_idx
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers

    def train_dataloader(self):
        g = torch.Generator().manual_seed(self.seed)
        return torch.utils.data.DataLoader(
            _Subset(self.train_idx), batch_size=self.batch_size, shuffle=True, generator=g,
            collate_fn=self.train_collate, num_workers=self.num_workers, drop_last=len(self.train_idx) > self.batch_size,
        )  # fmt: skip

    def val_dataloader(self):
        return torch.utils.data.DataLoader(
            _Subset(self.heldout_idx), batch_size=self.batch_size, collate_fn=self.eval_collate,
            num_workers=self.num_workers,
        )  # fmt: skip


# --- module ---------------------------------------------------------------------------------------------------


class Uni3DARModule(L.LightningModule):
    """The decoder and its weighted loss; hyper-parameters kept as a plain dict."""

    def __init__(self, hparams: dict[str, Any]) -> None:
        super().__init__()
        self.save_hyperparameters(hparams)
        self.model = Uni3DAR(Uni3DARConfig(**hparams["model"]))
        if hparams.get("config", {}).get("compile"):
            self.model.compile_blocks()

    def transfer_batch_to_device(self, batch: SequenceBatch, device: torch.device, dataloader_idx: int) -> SequenceBatch:
        return batch.to(device)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # steady-state step time (after 10 warm-up steps: kernel selection, first allocations), so that
        # a time-limited run can size its schedule from a short probe (``train_seconds`` includes set-up)
        if self.global_step == 10:
            self._t_step10 = time.perf_counter()
        elif self.global_step > 10 and hasattr(self, "_t_step10"):
            self.steady_seconds_per_step = (time.perf_counter() - self._t_step10) / (self.global_step - 10)

    def training_step(self, batch: SequenceBatch, batch_idx: int) -> torch.Tensor:
        out = self.model.loss(batch)
        n = batch.tokens.shape[0]
        self.log("train_loss", out["loss"], batch_size=n, prog_bar=True)
        for k in TOKEN_TYPES:
            self.log(f"train_ce_{k}", out[k], batch_size=n)
        return out["loss"]

    def validation_step(self, batch: SequenceBatch, batch_idx: int) -> None:
        out = self.model.loss(batch)
        n = batch.tokens.shape[0]
        self.log("val_loss", out["loss"], batch_size=n, sync_dist=True)
        for k in TOKEN_TYPES:
            self.log(f"val_ce_{k}", out[k], batch_size=n, sync_dist=True)

    def configure_optimizers(self):
        o = self.hparams["optim"]
        opt = torch.optim.AdamW(self.model.parameters(), lr=o["lr"], weight_decay=o["weight_decay"],
                                betas=(0.9, o.get("beta2", 0.999)), eps=o.get("eps", 1e-8))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = max(1, min(o["warmup_steps"], total // 10))

        def schedule(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# --- evaluation -----------------------------------------------------------------------------------------------


def _targets(batch: SequenceBatch) -> dict[str, torch.Tensor]:
    tree_m, atom_m = batch.kind == KIND_TREE, batch.kind == KIND_ATOM
    xyz = batch.xyz_target[atom_m]
    return {"tree": batch.tree_target[tree_m], "type": batch.type_target[atom_m],
            "x": xyz[:, 0], "y": xyz[:, 1], "z": xyz[:, 2]}  # fmt: skip


@torch.no_grad()
def heldout_cross_entropy(
    model: Uni3DAR, loader, unigram: dict[str, torch.Tensor], device: torch.device
) -> dict[str, dict[str, float]]:
    """Per token type (and ``all`` tokens pooled): model CE and unigram CE on the held-out tokens
    (nats per token), and their ratio."""
    model.eval()
    sums = {k: [0.0, 0.0, 0] for k in TOKEN_TYPES}
    for batch in loader:
        batch = batch.to(device)
        h = model.hidden(batch.tokens, batch.level, batch.pos, batch.xyz_in, tree_index=batch.tree_index)
        tgt = _targets(batch)
        tree_m, atom_m = batch.kind == KIND_TREE, batch.kind == KIND_ATOM
        ha = h[atom_m]
        xyz = batch.xyz_target[atom_m]
        logits = {"tree": model.tree_head(h[tree_m]), "type": model.atom_logits(ha, step=0)}
        for axis, name in enumerate("xyz"):
            logits[name] = model.atom_logits(ha, tgt["type"], xyz, step=axis + 1)
        for k in TOKEN_TYPES:
            ce = torch.nn.functional.cross_entropy(logits[k].float(), tgt[k], reduction="sum")
            uni = -unigram[k].to(device)[tgt[k]].sum()
            sums[k][0] += float(ce)
            sums[k][1] += float(uni)
            sums[k][2] += int(tgt[k].numel())
    sums["all"] = [sum(v[i] for v in sums.values()) for i in range(3)]  # every predicted token alike
    out = {}
    for k, (ce, uni, n) in sums.items():
        out[k] = {"model_nats": ce / max(n, 1), "unigram_nats": uni / max(n, 1), "tokens": n}
        out[k]["ratio"] = out[k]["model_nats"] / out[k]["unigram_nats"] if uni > 0 else float("nan")
    return out


def unigram_log_probs(loader, vocab_size: int, bins: int) -> dict[str, torch.Tensor]:
    """Add-one-smoothed unigram log-probabilities of each token type over the training tokens."""
    counts = {"tree": torch.ones(255), "type": torch.ones(vocab_size)}
    counts.update({k: torch.ones(bins) for k in "xyz"})
    for batch in loader:
        for k, t in _targets(batch).items():
            counts[k] += torch.bincount(t, minlength=len(counts[k])).float()
    return {k: (c / c.sum()).log() for k, c in counts.items()}


def sample_and_score(
    model: Uni3DAR, tokenizer: OctreeTokenizer, train_mols: list[dict[str, Any]], cfg: SampleSection,
    allowed_numbers: np.ndarray, seed: int, device: torch.device, out_xyz: Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Generate ``cfg.num`` molecules in batches and score them; filtering is reported when on.
    Samples go to ``out_xyz`` (an incomplete one as an empty frame)."""
    from threefold.science.molecule_metrics import canonical_smiles, stability

    vocab = tokenizer.vocab
    allowed = torch.as_tensor(vocab.element_ids(allowed_numbers))
    g = torch.Generator(device=device).manual_seed(seed)
    parts = []
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for start in range(0, cfg.num, cfg.batch_size):
        n = min(cfg.batch_size, cfg.num - start)
        parts.append(
            generate(model, tokenizer.spec, vocab, n, allowed_types=allowed, generator=g,
                     temperature=cfg.temperature, top_k=cfg.top_k, max_items=cfg.max_items,
                     tree_temperature=cfg.tree_temperature, atom_temperature=cfg.atom_temperature,
                     xyz_temperature=cfg.xyz_temperature)  # fmt: skip
        )
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    mols, complete, perplexity = [], [], []
    for gen in parts:
        for b in range(len(gen)):
            a0, a1 = gen.atom_ptr[b], gen.atom_ptr[b + 1]
            mols.append((vocab.atomic_numbers(gen.types[a0:a1]), gen.positions[a0:a1]))
        complete.append(gen.complete)
        perplexity.append(gen.perplexity)
    complete_all = np.concatenate(complete)
    scored = [m if ok else (m[0][:0], m[1][:0]) for m, ok in zip(mols, complete_all)]
    result: dict[str, Any] = {
        "num_sampled": cfg.num,
        "incomplete": int((~complete_all).sum()),
        "molecules_per_second": cfg.num / seconds,
        "sampling_seconds": seconds,
        "filtering": "off" if cfg.keep_fraction >= 1.0 else f"best {cfg.keep_fraction:.0%} by atom perplexity",
        "temperature": cfg.temperature,
        "temperatures": {k: (cfg.temperature if t is None else t) for k, t in
                         (("tree", cfg.tree_temperature), ("atom", cfg.atom_temperature), ("xyz", cfg.xyz_temperature))},
        "top_k": cfg.top_k,
    }
    if out_xyz is not None:
        write_xyz(out_xyz, scored, vocab)
    try:
        require("rdkit", extra="mol")
    except MissingExtraError:  # the GPU image: stability only; rescore samples.xyz with score_xyz_samples
        stab = [stability(z, p) for z, p in scored]
        atoms = sum(len(z) for z, _ in scored)
        result["atom_stability"] = sum(a for a, _ in stab) / max(atoms, 1)
        result["molecule_stability"] = sum(m for _, m in stab) / max(len(stab), 1)
        result["validity"] = "not computed: RDKit missing (run score_xyz_samples on samples.xyz)"
        return result
    train_smiles = {s for s in (canonical_smiles(m["numbers"], m["positions"]) for m in train_mols) if s}
    result.update(_score(scored, train_smiles))
    if cfg.keep_fraction < 1.0:
        merged = filter_best_fraction(_concat_generated(parts), cfg.keep_fraction)
        result["filtered"] = _score([m for m, k in zip(scored, merged.kept) if k], train_smiles)
    result["training_molecules_valid"] = len(train_smiles)
    return result


def _score(mols: list[tuple[np.ndarray, np.ndarray]], train_smiles: set[str]) -> dict[str, float]:
    from threefold.pipelines.metrics.molecules import MoleculeGenerationMetrics

    # every sample scored in this process (rank 0 after a DDP fit): no cross-rank sync at compute()
    acc = MoleculeGenerationMetrics(training_smiles=train_smiles, sync_on_compute=False)
    acc.update(mols)
    return {k: float(v) for k, v in acc.compute().items()}


def write_xyz(path: Path, mols: list[tuple[np.ndarray, np.ndarray]], vocab) -> None:
    """Multi-frame XYZ of (numbers, positions Å); an empty frame marks an incomplete sample."""
    lines = []
    for i, (z, p) in enumerate(mols):
        lines += [str(len(z)), f"sample {i}"]
        lines += [f"{vocab.tokens[vocab.element_offset + a - 1]} {x:.4f} {y:.4f} {w:.4f}"
                  for a, (x, y, w) in zip(np.asarray(z).tolist(), np.asarray(p).tolist())]  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def read_xyz_frames(path: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """Frames of a plain multi-frame XYZ (element symbols) as (numbers, positions Å)."""
    from threefold.science.vocab import ELEMENTS

    index = {s: i + 1 for i, s in enumerate(ELEMENTS)}
    lines = Path(path).read_text().splitlines()
    out, i = [], 0
    while i < len(lines) and lines[i].strip():
        n = int(lines[i])
        rows = [lines[i + 2 + k].split() for k in range(n)]
        try:
            z = np.array([index[r[0]] for r in rows], np.int64)
        except KeyError as exc:
            raise DataFormatError(f"{path}: unknown element {exc.args[0]!r} in frame {len(out)}") from exc
        out.append((z, np.array([[float(v) for v in r[1:4]] for r in rows]).reshape(n, 3)))
        i += n + 2
    return out


def score_xyz_samples(samples: Path, training: Path | None = None) -> dict[str, Any]:
    """Score a ``samples.xyz`` written by a run (e.g. on a machine without RDKit) against the
    training molecules (default: the embedded sample). Needs RDKit."""
    from threefold.science.molecule_metrics import canonical_smiles

    mols = read_xyz_frames(samples)
    train = read_xyz_frames(training) if training is not None else [
        (m["numbers"], m["positions"]) for m in load_molecules(None, Path(samples).parent / "rescore")[0]
    ]  # fmt: skip
    train_smiles = {s for s in (canonical_smiles(z, p) for z, p in train) if s}
    return _score(mols, train_smiles)


def _concat_generated(parts):
    from threefold.science.uni3dar.sampling import Generated

    def cat_ptr(ptrs):
        out = [np.zeros(1, np.int64)]
        for p in ptrs:
            out.append(p[1:] + out[-1][-1])
        return np.concatenate(out)

    return Generated(
        np.concatenate([p.types for p in parts]), np.concatenate([p.positions for p in parts]),
        cat_ptr([p.atom_ptr for p in parts]), np.concatenate([p.tree for p in parts]),
        cat_ptr([p.tree_ptr for p in parts]), np.concatenate([p.complete for p in parts]),
        np.concatenate([p.perplexity for p in parts]), np.concatenate([p.kept for p in parts]),
        np.concatenate([p.atom_tree for p in parts]), np.concatenate([p.node_tree for p in parts]),
    )  # fmt: skip


# --- pipeline -------------------------------------------------------------------------------------------------


def build_module(cfg: Uni3DARRunConfig, tokenizer: OctreeTokenizer, num_trees: int = 1) -> Uni3DARModule:
    spec = tokenizer.spec
    model = Uni3DARConfig(
        vocab_size=len(tokenizer.vocab), bins=spec.bins, depth=spec.depth, num_trees=num_trees, d_model=cfg.model.d_model,
        layers=cfg.model.layers, heads=cfg.model.heads, dropout=cfg.model.dropout, mlp_heads=cfg.model.mlp_heads,
        loss_norm=cfg.model.loss_norm, xyz_weight=cfg.model.xyz_weight,
    )  # fmt: skip
    return Uni3DARModule({"config": config_to_dict(cfg), "model": model.to_dict(), "optim": asdict(cfg.optim)})


def fit_with_ema(ctx: RunContext, module: L.LightningModule, data: L.LightningDataModule, ema_decay: float):
    """``ctx.fit`` with an :class:`~threefold.pipelines.ema.EMACallback` when ``ema_decay > 0``
    (validation then uses the EMA weights); returns the trainer and the callback (``None`` when off)."""
    ema = ema_callback(ema_decay)
    fit_ctx = ctx if ema is None else replace(ctx, extra_callbacks=[*ctx.extra_callbacks, ema])
    return fit_ctx.fit(module, data), ema


def ema_metrics(ema: EMACallback | None) -> dict[str, Any]:
    """``metrics.json`` fields saying which weights were evaluated."""
    if ema is None:
        return {"ema_decay": 0.0, "evaluated_weights": "training"}
    return {"ema_decay": ema.decay, "ema_updates": ema.num_updates, "evaluated_weights": "ema"}


def final_heldout(module: L.LightningModule, ema: EMACallback | None, data: L.LightningDataModule,
                  vocab_size: int, bins: int) -> tuple[torch.nn.Module, torch.device, dict[str, Any]]:
    """After training (rank 0): the model on the evaluation device with the EMA weights swapped in when
    there are any (sampling and the exported weights then use them too), and ``metrics.json``'s held-out
    cross-entropies — of the EMA weights and, for comparison, of the last training weights."""
    device = _device()
    model = module.model.to(device)
    unigram = unigram_log_probs(data.train_dataloader(), vocab_size, bins)
    out: dict[str, Any] = {}
    if ema is not None:
        out["heldout_cross_entropy_training_weights"] = heldout_cross_entropy(model, data.val_dataloader(), unigram, device)
        ema.swap_in(module)
    out["heldout_cross_entropy"] = heldout_cross_entropy(model, data.val_dataloader(), unigram, device)
    return model, device, out


def _prepared(cfg: Uni3DARRunConfig, data: Path | None):
    """Molecules, source name and collate class from the ``threefold prepare qm9`` cache ``cfg.token_cache``."""
    from functools import partial

    from threefold.science.qm9_tokens import load_prepared_qm9

    if data is None or not data.is_dir():
        raise ConfigError(f"token_cache={cfg.token_cache}: needs --data, the QM9 folder (dsgdb9nsd_*.xyz) it was prepared from")
    mols, tokens = load_prepared_qm9(data, cfg.token_cache, cfg.octree, cfg.limit_molecules or None)
    return mols, f"{data} (tokens cached in {cfg.token_cache})", partial(CachedTokenCollate, cached=tokens)


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class _Uni3DARPipelineBase(Pipeline):
    config_class = Uni3DARRunConfig

    def run(self, cfg: Uni3DARRunConfig, ctx: RunContext) -> dict[str, Any]:
        seed_everything(cfg.seed)
        if cfg.octree not in PRESETS:
            raise ConfigError(f"octree={cfg.octree!r}: expected one of {sorted(PRESETS)}")
        tokenizer = OctreeTokenizer(cfg.octree, cutoff=cfg.cutoff)
        collate_cls = None
        if cfg.token_cache:
            mols, source, collate_cls = _prepared(cfg, ctx.data)
        else:
            mols, source = load_molecules(ctx.data, ctx.run_dir, cfg.limit_molecules)
        order = np.random.default_rng(cfg.seed).permutation(len(mols))
        n_held = max(1, int(round(cfg.heldout_fraction * len(mols))))
        heldout_idx, train_idx = np.sort(order[:n_held]), np.sort(order[n_held:])
        data = MoleculeTokenData(
            mols, train_idx, heldout_idx, tokenizer, cfg.augment, cfg.trainer.batch_size, cfg.seed,
            cfg.trainer.num_workers, collate_cls,
        )  # fmt: skip
        module = build_module(cfg, tokenizer)
        t0 = time.perf_counter()
        trainer, ema = fit_with_ema(ctx, module, data, cfg.optim.ema_decay)
        train_seconds = time.perf_counter() - t0
        metrics: dict[str, Any] = {
            "pipeline": self.name, "data": source, "train_molecules": len(train_idx),
            "heldout_molecules": len(heldout_idx), "seed": cfg.seed, "global_step": int(trainer.global_step),
            "train_seconds": train_seconds,
            "seconds_per_step": getattr(module, "steady_seconds_per_step", train_seconds / max(1, trainer.global_step)),
            **ema_metrics(ema),
        }  # fmt: skip
        if not trainer.is_global_zero:
            return metrics
        model, device, heldout = final_heldout(module, ema, data, len(tokenizer.vocab), tokenizer.spec.bins)
        metrics.update(heldout)
        train_mols = [mols[i] for i in train_idx]
        elements = np.unique(np.concatenate([np.asarray(m["numbers"]) for m in train_mols]))
        metrics["sampling"] = sample_and_score(
            model, tokenizer, train_mols, cfg.sample, elements, cfg.seed, device, ctx.run_dir / "samples.xyz"
        )
        ctx.export_weights(module.model)
        if ema is not None:
            ema.swap_back(module)
        return metrics

    def evaluate(self, cfg: Uni3DARRunConfig, ctx: RunContext, checkpoint: Path) -> dict[str, Any]:
        module = _module_from_checkpoint(checkpoint)
        tokenizer = OctreeTokenizer(module.hparams["config"]["octree"])
        mols, _ = load_molecules(ctx.data, ctx.run_dir, cfg.limit_molecules)
        elements = np.unique(np.concatenate([np.asarray(m["numbers"]) for m in mols]))
        device = _device()
        return {"pipeline": self.name, "checkpoint": str(checkpoint), "weights": module.weights_source,
                "sampling": sample_and_score(module.model.to(device), tokenizer, mols, cfg.sample, elements,
                                             cfg.seed, device)}  # fmt: skip

    def load(self, cfg: Uni3DARRunConfig, checkpoint: Path) -> "Uni3DARSampler":
        return Uni3DARSampler(_module_from_checkpoint(checkpoint))

    def figures(self, cfg: Uni3DARRunConfig, run_dir: Path, metrics: dict[str, Any]) -> list[Path]:
        """Curves; tree-token lengths of the run's molecules with and without the two-level
        compression; the first 16 samples of ``samples.xyz`` as RDKit depictions with validity marks
        (skipped with a logged note where RDKit is missing)."""
        import logging

        from threefold.pipelines.figures import figures_dir
        from threefold.pipelines.figures_molecules import plot_molecule_grid

        paths = super().figures(cfg, run_dir, metrics)
        out = figures_dir(run_dir)
        data_file, embedded = run_dir / "data_path.txt", run_dir / "data" / "embedded_qm9_like.xyz"
        if data_file.is_file():
            mols, _ = load_molecules(Path(data_file.read_text().strip()), run_dir, cfg.limit_molecules)
            pairs = [(np.asarray(m["numbers"]), np.asarray(m["positions"])) for m in mols]
        elif embedded.is_file():
            pairs = read_xyz_frames(embedded)
        else:
            pairs = []
        if pairs:
            tokens = OctreeTokenizer(cfg.octree, cutoff=cfg.cutoff)
            paths.append(token_length_figure(out, [tokens.tokenize_batch(*_concat(chunk)).compression()
                                                   for chunk in _chunks(pairs[:TOKEN_FIGURE_LIMIT])],
                                             cfg.octree, len(pairs)))
        samples = run_dir / "samples.xyz"
        if samples.is_file():
            try:
                paths.append(plot_molecule_grid(out / "samples.png", read_xyz_frames(samples)))
            except MissingExtraError as exc:
                logging.getLogger(__name__).warning("samples.png skipped: %s", exc)
        return paths


#: Structures tokenized for the length histograms (the first ones of the data set).
TOKEN_FIGURE_LIMIT = 20_000


def _chunks(items: list, size: int = 1024) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _concat(pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(numbers (N,), positions (N, 3), counts (B,)) of a list of molecules, for ``tokenize_batch``."""
    return (np.concatenate([np.asarray(z, np.int64) for z, _ in pairs]),
            np.concatenate([np.asarray(p, np.float64).reshape(-1, 3) for _, p in pairs]),
            np.array([len(z) for z, _ in pairs], np.int64))  # fmt: skip


def token_length_figure(out: Path, compressions: list[dict[str, Any]], octree: str, total: int) -> Path:
    """Histogram of tree tokens per structure: the two-level encoding (one occupancy token per
    non-empty node) vs one token per occupied child node vs one binary token per child slot, from
    :meth:`OctreeTokens.compression` of consecutive chunks of the data set."""
    from threefold.pipelines.figures_molecules import plot_token_lengths

    tree, child, slot = (np.concatenate([c[k] for c in compressions]) for k in ("tree_tokens", "child_tokens", "slot_tokens"))
    caption = (f"Octree tree tokens per structure ({octree} preset; {len(tree)} of {total} structures as stored, "
               f"no augmentation): two-level encoding (one occupancy token per non-empty node, Uni-3DAR) mean "
               f"{tree.mean():.2f}; one token per occupied child node mean {child.mean():.2f} (ratio "
               f"{(child / tree).mean():.3f}); one binary token per child slot mean {slot.mean():.2f} (ratio "
               f"{(slot / tree).mean():.3f}). Atom tokens (type and in-cell xyz) are the same in all three.")
    return plot_token_lengths(out / "token_lengths.png", {"two-level (Uni-3DAR)": tree, "one per occupied child": child,
                                                          "one per child slot": slot},
                              "tree tokens per structure", caption)  # fmt: skip


def _module_from_checkpoint(checkpoint: Path) -> Uni3DARModule:
    """The module of a run's checkpoint, with the EMA weights when the run kept an EMA
    (``weights_source``: ``"ema"`` or ``"training"``)."""
    ckpt = load_checkpoint(checkpoint)
    hp = ckpt.get("hyper_parameters", {})
    if "model" not in hp or "config" not in hp:
        raise ConfigError(f"checkpoint {checkpoint} was not written by a uni3dar pipeline (no hyper_parameters)")
    hp = {**hp, "model": {"mlp_heads": False, **hp["model"]}}  # written before the MLP heads: linear ones
    module = Uni3DARModule(hp)
    ema = ema_state_dict(ckpt)
    module.load_state_dict(ckpt["state_dict"] if ema is None else ema)
    module.weights_source = "training" if ema is None else "ema"
    return module.eval()


class Uni3DARSampler:
    """Inference entry point: ``predict(num, seed) -> list of (numbers (N,), positions (N, 3) Å)``."""

    def __init__(self, module: Uni3DARModule) -> None:
        self.module = module
        self.tokenizer = OctreeTokenizer(module.hparams["config"]["octree"])

    def predict(self, num: int = 100, seed: int = 0, elements: tuple[int, ...] = (1, 6, 7, 8, 9), **kw: Any):
        device = next(self.module.parameters()).device
        vocab = self.tokenizer.vocab
        g = torch.Generator(device=device).manual_seed(seed)
        gen = generate(self.module.model, self.tokenizer.spec, vocab, num,
                       allowed_types=torch.as_tensor(vocab.element_ids(np.array(elements))), generator=g, **kw)  # fmt: skip
        return [
            (vocab.atomic_numbers(gen.types[gen.atom_ptr[b] : gen.atom_ptr[b + 1]]),
             gen.positions[gen.atom_ptr[b] : gen.atom_ptr[b + 1]])
            for b in range(num) if gen.complete[b]
        ]  # fmt: skip


@register_pipeline
class QM9Uni3DAR(_Uni3DARPipelineBase):
    name = "qm9-uni3dar"
    description = "Uni-3DAR octree tokens + masked next-token decoder on QM9 (train, sample, evaluate)"


@register_pipeline
class GeomDrugsUni3DAR(_Uni3DARPipelineBase):
    name = "geomdrugs-uni3dar"
    description = "Uni-3DAR on GEOM-DRUGS conformers (depth-7 octree; --data: SDF or XYZ of conformers)"


# --- tokenize CLI verb ----------------------------------------------------------------------------------------


def _smallest_spec(positions: list[np.ndarray], cell: float = 0.24) -> OctreeSpec:
    extent = max(float(np.ptp(p, axis=0).max()) for p in positions)
    for depth in range(6, 11):
        spec = OctreeSpec(cell, 0.01, depth)
        if extent < spec.box - 2 * spec.cell:
            return spec
    raise DataFormatError(f"structure extent {extent:.1f} Å exceeds the largest octree box (depth 10)")


def _spec_of(data: dict, source: Path) -> OctreeSpec:
    try:
        return OctreeSpec(data["spec"]["cell"], data["spec"]["resolution"], data["spec"]["depth"])
    except (KeyError, TypeError) as exc:
        raise DataFormatError(f"{source}: no valid 'spec' (cell, resolution, depth) in the tokens file") from exc


def _decode(input: Path, out: Path) -> Path:
    data = json.loads(input.read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    if data.get("format") == "threefold-uni3dar-crystal-tokens/1":
        from threefold.datasets.crystals import write_cif
        from threefold.science.octree import CrystalTokens

        tok = OctreeTokenizer(_spec_of(data["lattice"], input))
        crystal = CrystalTokens(tok.from_json(data["lattice"], str(input)), tok.from_json(data["atoms"], str(input)))
        numbers, positions, lattice = tok.detokenize_crystal(crystal)
        return write_cif({"numbers": numbers, "positions": positions, "lattice": lattice}, out)
    tok = OctreeTokenizer(_spec_of(data, input))
    tokens = tok.from_json(data, str(input))
    types, positions, _ = detokenize(tokens)
    names = [tok.vocab.tokens[t] for t in types.tolist()]
    protein = all("_" in n for n in names)
    lines = []
    for b in range(len(tokens)):
        a0, a1 = tokens.atom_ptr[b], tokens.atom_ptr[b + 1]
        back = a0 + np.argsort(tokens.atom_index[a0:a1])  # input atom order
        if protein:  # wwPDB ATOM records of the Cα trace, one MODEL per structure
            lines.append(f"MODEL     {b + 1:4d}")
            for k, i in enumerate(back.tolist()):
                res = names[i].split("_")[0]
                x, y, z = positions[i]
                lines.append(f"ATOM  {k + 1:5d}  CA  {res:3s} A{k + 1:4d}    {x:8.3f}{y:8.3f}{z:8.3f}  1.00  0.00           C")
            lines.append("ENDMDL")
        else:
            lines += [str(a1 - a0), f"decoded from {input.name} structure {b}"]
            lines += [f"{names[i]} {x:.4f} {y:.4f} {w:.4f}" for i, (x, y, w) in zip(back.tolist(), positions[back].tolist())]
    out.write_text("\n".join(lines + (["END"] if protein else [])) + "\n")
    return out


def tokenize_command(input: Path, out: Path, decode: bool = False) -> Path:
    """``threefold tokenize --input FILE --out tokens.json [--decode]``.

    Molecules (.sdf / .mol / .xyz; 0.24 Å cells, the smallest depth 6..10 whose box holds them),
    crystals (.cif with a cell; MP-20 preset, lattice and atom trees) and protein Cα traces (.pdb,
    or an mmCIF .cif with ``_atom_site`` coordinates; 0.48 Å cells) -> a tokens JSON. With
    ``decode``: a tokens JSON -> XYZ (molecules), CIF (crystals) or PDB (Cα traces), atoms in the
    input order, positions within 0.005 Å per axis of the tokenized input.
    """
    input, out = Path(input), Path(out)
    if not input.is_file():
        raise MissingFileError(f"--input {input}: no such file")
    if decode:
        return _decode(input, out)
    suffix = input.suffix.lower()
    text_head = input.read_text(errors="replace")[:200000] if suffix == ".cif" else ""
    if suffix == ".pdb" or (suffix == ".cif" and "_atom_site.Cartn_x" in text_head):
        from threefold.datasets.proteins import read_mmcif_ca, read_pdb_ca

        trace = read_pdb_ca(input) if suffix == ".pdb" else read_mmcif_ca(input)
        tok = OctreeTokenizer(_smallest_spec([trace["positions"].astype(np.float64)], cell=0.48))
        payload = tok.to_json(tok.tokenize_protein(trace["residues"], trace["positions"]))
    elif suffix == ".cif":
        from threefold.datasets.crystals import read_cif

        crystal = read_cif(input)
        tok = OctreeTokenizer("mp20")
        ct = tok.tokenize_crystal(crystal["numbers"], crystal["positions"], crystal["lattice"])
        payload = {"format": "threefold-uni3dar-crystal-tokens/1", "lattice": tok.to_json(ct.lattice),
                   "atoms": tok.to_json(ct.atoms)}  # fmt: skip
    elif suffix in (".sdf", ".mol", ".xyz"):
        if suffix == ".xyz":
            mols = [{"numbers": z, "positions": p} for z, p in read_xyz_frames(input)]
        else:
            from threefold.datasets.molecules import read_sdf

            mols = read_sdf(input, sanitize=False)
        positions = [np.asarray(m["positions"], np.float64) for m in mols]
        tok = OctreeTokenizer(_smallest_spec(positions))
        numbers = np.concatenate([np.asarray(m["numbers"], np.int64) for m in mols])
        tokens = tok.tokenize_batch(numbers, np.concatenate(positions), np.array([len(p) for p in positions]),
                                    names=[f"{input.name} record {i}" for i in range(len(mols))])  # fmt: skip
        payload = tok.to_json(tokens)
    else:
        raise DataFormatError(f"--input {input}: expected .sdf, .mol, .xyz, .cif or .pdb (or tokens .json with --decode)")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload))
    return out
