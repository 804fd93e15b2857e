"""Octree tokens -> the masked next-token training sequence of Uni-3DAR.

Every item (tree node or atom) of a structure becomes a pair of positions: a ``[MASK]`` placed at
the item's position, whose output predicts the item, followed by the item's own token (Uni-3DAR,
Sec. 3.2, "masked next-token prediction"). Under causal attention the mask sees every earlier item
and where the next one is, which the octree's breadth-first order always fixes before the item
itself is known.

Positions are physical, in ``resolution`` units (0.01 Å): a tree node and its mask sit at the node
centre; an atom's mask at its finest-cell centre and the atom token at its exact quantised position.
Levels: ``depth`` (root) .. 1 for tree nodes, 0 for atoms.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from threefold.science.octree import OctreeTokens
from threefold.science.vocab import Vocabulary

KIND_NONE, KIND_TREE, KIND_ATOM = 0, 1, 2


@dataclass
class SequenceBatch:
    """Padded model inputs (B, L) and targets, right-padded (causal attention never sees padding).

    tokens (B, L) long vocab ids; level (B, L) long; pos (B, L, 3) float, 0.01 Å units;
    xyz_in (B, L, 3) long in-cell offsets of atom tokens (``bins`` = none); kind (B, L) long: at
    mask positions 1 = predicts a tree token, 2 = predicts an atom, else 0; tree_target (B, L)
    long 0..254 (mask - 1); type_target (B, L) long vocab id; xyz_target (B, L, 3) long;
    tree_index (B, L) long: which tree of the structure a position belongs to (a crystal's
    lattice tree 0, atom tree 1; always 0 for molecules).
    """

    tokens: torch.Tensor
    level: torch.Tensor
    pos: torch.Tensor
    xyz_in: torch.Tensor
    kind: torch.Tensor
    tree_target: torch.Tensor
    type_target: torch.Tensor
    xyz_target: torch.Tensor
    tree_index: torch.Tensor

    def to(self, device: torch.device | str) -> SequenceBatch:
        return SequenceBatch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def drop_level1_nodes(tokens: OctreeTokens, max_ratio: float, rng: np.random.Generator) -> np.ndarray:
    """Keep-mask (T,) of tree nodes for the reference's tree-node deletion augmentation.

    Each structure draws a ratio uniformly in ``[0, max_ratio)`` (0.1 for molecules, 0.4 for
    proteins in the reference) and deletes each of its level-1 nodes with that probability; the
    deleted nodes' mask/token pairs leave the sequence, the atoms below them stay.
    """
    owner = np.repeat(np.arange(len(tokens)), np.diff(tokens.tree_ptr))
    ratio = rng.random(len(tokens)) * max_ratio
    return ~((tokens.tree_level == 1) & (rng.random(len(owner)) < ratio[owner]))


def build_sequences(
    tokens: OctreeTokens, vocab: Vocabulary, keep: np.ndarray | None = None, tree_index: int = 0
) -> SequenceBatch:
    """Vectorised layout of a token batch into padded sequences of length ``2 * (nodes + atoms)``."""
    spec = tokens.spec
    B = len(tokens)
    keep = np.ones(len(tokens.tree), bool) if keep is None else keep
    t_owner = np.repeat(np.arange(B), np.diff(tokens.tree_ptr))[keep]
    a_owner = np.repeat(np.arange(B), np.diff(tokens.atom_ptr))
    tree_n = np.bincount(t_owner, minlength=B)
    atom_n = np.diff(tokens.atom_ptr)
    items = tree_n + atom_n
    t_rank = np.arange(len(t_owner)) - np.concatenate([[0], np.cumsum(tree_n)])[t_owner]
    a_rank = np.arange(len(a_owner)) - tokens.atom_ptr[a_owner]
    t_slot = t_rank  # item index within its structure: tree nodes first, then atoms
    a_slot = tree_n[a_owner] + a_rank
    L = int(2 * items.max())

    level_t = tokens.tree_level[keep]
    cell_t = tokens.tree_cell[keep]
    half = (1 << level_t)[:, None] * spec.bins / 2.0
    pos_t = cell_t * spec.bins + half
    pos_mask_a = tokens.atom_cell * spec.bins + spec.bins / 2.0
    pos_a = (tokens.atom_cell * spec.bins + tokens.atom_xyz).astype(np.float64)

    tok = np.full((B, L), vocab.pad, np.int64)
    level = np.zeros((B, L), np.int64)
    pos = np.zeros((B, L, 3), np.float32)
    xyz_in = np.full((B, L, 3), spec.bins, np.int64)
    kind = np.zeros((B, L), np.int64)
    tree_target = np.zeros((B, L), np.int64)
    type_target = np.zeros((B, L), np.int64)
    xyz_target = np.zeros((B, L, 3), np.int64)

    m, tk = 2 * t_slot, 2 * t_slot + 1
    tok[t_owner, m] = vocab.mask
    tok[t_owner, tk] = vocab.tree_ids(tokens.tree[keep])
    level[t_owner, m] = level[t_owner, tk] = level_t
    pos[t_owner, m] = pos[t_owner, tk] = pos_t
    kind[t_owner, m] = KIND_TREE
    tree_target[t_owner, m] = tokens.tree[keep] - 1

    m, tk = 2 * a_slot, 2 * a_slot + 1
    tok[a_owner, m] = vocab.mask
    tok[a_owner, tk] = tokens.atom_type
    pos[a_owner, m] = pos_mask_a
    pos[a_owner, tk] = pos_a
    xyz_in[a_owner, tk] = tokens.atom_xyz
    kind[a_owner, m] = KIND_ATOM
    type_target[a_owner, m] = tokens.atom_type
    xyz_target[a_owner, m] = tokens.atom_xyz
    t = torch.from_numpy
    return SequenceBatch(
        t(tok), t(level), t(pos), t(xyz_in), t(kind), t(tree_target), t(type_target), t(xyz_target),
        torch.full(tok.shape, tree_index, dtype=torch.long),
    )  # fmt: skip


def join_sequences(parts: list[SequenceBatch], pad: int, bins: int) -> SequenceBatch:
    """Concatenate per structure the sequences of several trees (e.g. lattice then atoms), each part's
    real positions (token != ``pad``) directly after the previous part's, right-padded again
    (``bins`` is the "no offset" value of ``xyz_in``)."""
    lengths = torch.stack([(p.tokens != pad).sum(1) for p in parts], 1)  # (B, parts)
    B, L = lengths.shape[0], int(lengths.sum(1).max())
    offset = torch.cumsum(lengths, 1) - lengths
    fields = SequenceBatch.__dataclass_fields__
    out = {}
    for f in fields:
        like = getattr(parts[0], f)
        fill = {"tokens": pad, "xyz_in": bins}.get(f, 0)
        out[f] = torch.full((B, L, *like.shape[2:]), fill, dtype=like.dtype)
    for k, p in enumerate(parts):
        valid = p.tokens != pad
        b, j = valid.nonzero(as_tuple=True)
        dest = offset[b, k] + j
        for f in fields:
            out[f][b, dest] = getattr(p, f)[b, j]
    return SequenceBatch(**out)
