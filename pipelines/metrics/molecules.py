"""Generated-molecule accumulator: validity, uniqueness, novelty, EDM atom / molecule stability.

Definitions are those of :mod:`threefold.science.molecule_metrics` (validity by RDKit bond
perception of the largest fragment, identity by canonical SMILES, EDM bond-order stability). For
summing across ranks, molecules are reduced per ``update`` to counts (sum states) and to a 63-bit
BLAKE2b hash of each valid canonical SMILES (a concatenated state), so uniqueness and novelty are
computed once over every rank's molecules. Hash collisions between distinct SMILES have
probability about n² / 2⁶⁴ (below 10⁻⁸ for a million molecules).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from threefold.science.molecule_metrics import canonical_smiles, stability


def smiles_hash(smiles: str) -> int:
    """63-bit non-negative BLAKE2b hash of a SMILES string (stable across processes and runs)."""
    return int.from_bytes(hashlib.blake2b(smiles.encode(), digest_size=8).digest(), "little") >> 1


class MoleculeGenerationMetrics(Metric):
    """Streaming generation metrics. ``update(molecules)`` takes (numbers (N,), positions (N, 3) Å)
    pairs (an empty molecule counts as an invalid, unstable sample); ``compute()`` returns float64
    tensors: validity, uniqueness (of valid), valid_and_unique, novelty (of valid unique, when
    ``training_smiles`` were given), atom_stability, molecule_stability, and num_molecules."""

    full_state_update = False

    def __init__(self, training_smiles: Iterable[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in ("molecules", "valid", "atoms", "stable_atoms", "stable_molecules"):
            self.add_state(name, default=torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("hashes", default=[], dist_reduce_fx="cat")
        if training_smiles is not None:
            self.training_hashes = torch.tensor(sorted({smiles_hash(s) for s in training_smiles}), dtype=torch.int64)
        else:
            self.training_hashes = None

    def update(self, molecules: Iterable[tuple[np.ndarray, np.ndarray]]) -> None:
        hashes = []
        for numbers, positions in molecules:
            self.molecules += 1
            self.atoms += len(numbers)
            n_stable, mol_stable = stability(np.asarray(numbers), np.asarray(positions, np.float64))
            self.stable_atoms += n_stable
            self.stable_molecules += int(mol_stable)
            smi = canonical_smiles(numbers, positions)
            if smi is not None:
                self.valid += 1
                hashes.append(smiles_hash(smi))
        self.hashes.append(torch.tensor(hashes, dtype=torch.int64, device=self.valid.device))

    def compute(self) -> dict[str, Tensor]:
        # a list of per-update tensors, or one tensor once synced across ranks (torchmetrics' cat state)
        hashes = dim_zero_cat(self.hashes) if len(self.hashes) else torch.zeros(0, dtype=torch.int64)
        unique = torch.unique(hashes)
        n, valid = self.molecules.double(), self.valid.double()
        out = {
            "num_molecules": self.molecules.double(),
            "validity": valid / n,
            "uniqueness": unique.numel() / valid,
            "valid_and_unique": unique.numel() / n,
            "atom_stability": self.stable_atoms.double() / self.atoms.double(),
            "molecule_stability": self.stable_molecules.double() / n,
        }
        if self.training_hashes is not None:
            seen = torch.isin(unique, self.training_hashes.to(unique.device))
            out["novelty"] = (~seen).sum().double() / unique.numel()
        return out
