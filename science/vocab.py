"""The Uni-3DAR token vocabulary.

Uni-3DAR (Lu et al., "Uni-3DAR: Unified 3D Generation and Understanding via Autoregression on
Compressed Spatial Tokens", 2025) writes every structure as one token sequence drawn from one
vocabulary:

- special tokens ``[PAD] [CLS] [MASK] [UNK] [NULL]``;
- the 118 element symbols (``H`` ... ``Og``), in atomic-number order;
- protein residue-atom tokens ``<RES>_<ATOM>`` (``ALA_CA`` ...) for Cα traces typed by residue;
- crystal extras: the eight lattice-corner pseudo-atoms ``[LATTICE_000]`` ... ``[LATTICE_111]``
  (corner ``ijk`` sits at ``i*a + j*b + k*c``), composition-count tokens ``[COUNT_1]`` ...
  ``[COUNT_32]`` and the space-group-free composition marker ``[COMPOSITION]``;
- the 255 octree tokens ``[TREE_1]`` ... ``[TREE_255]``: a non-empty node's 8-bit child-occupancy
  mask (value 0 never occurs).

Differs from the reference dictionary: the reference marks all eight lattice corners with one
``[LATTICE_O]`` token and recovers which corner is which heuristically; distinct corner tokens make
the inverse exact. The coordinate bins are not vocabulary entries: they have their own heads.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from threefold.datasets.errors import DataFormatError

ELEMENTS: tuple[str, ...] = (
    "H", "He", "Li", "Be", "B", "C", "N", "O", "F", "Ne", "Na", "Mg", "Al", "Si", "P", "S", "Cl",
    "Ar", "K", "Ca", "Sc", "Ti", "V", "Cr", "Mn", "Fe", "Co", "Ni", "Cu", "Zn", "Ga", "Ge", "As",
    "Se", "Br", "Kr", "Rb", "Sr", "Y", "Zr", "Nb", "Mo", "Tc", "Ru", "Rh", "Pd", "Ag", "Cd", "In",
    "Sn", "Sb", "Te", "I", "Xe", "Cs", "Ba", "La", "Ce", "Pr", "Nd", "Pm", "Sm", "Eu", "Gd", "Tb",
    "Dy", "Ho", "Er", "Tm", "Yb", "Lu", "Hf", "Ta", "W", "Re", "Os", "Ir", "Pt", "Au", "Hg", "Tl",
    "Pb", "Bi", "Po", "At", "Rn", "Fr", "Ra", "Ac", "Th", "Pa", "U", "Np", "Pu", "Am", "Cm", "Bk",
    "Cf", "Es", "Fm", "Md", "No", "Lr", "Rf", "Db", "Sg", "Bh", "Hs", "Mt", "Ds", "Rg", "Cn", "Nh",
    "Fl", "Mc", "Lv", "Ts", "Og",
)  # fmt: skip

SPECIALS: tuple[str, ...] = ("[PAD]", "[CLS]", "[MASK]", "[UNK]", "[NULL]")

# The 20 standard amino acids plus the two genetically encoded extras and the unknown residue.
RESIDUES: tuple[str, ...] = (
    "ALA", "ARG", "ASN", "ASP", "CYS", "GLN", "GLU", "GLY", "HIS", "ILE", "LEU", "LYS", "MET",
    "PHE", "PRO", "SER", "THR", "TRP", "TYR", "VAL", "SEC", "PYL", "UNK",
)  # fmt: skip

LATTICE_CORNERS: tuple[str, ...] = tuple(f"[LATTICE_{i}{j}{k}]" for k in (0, 1) for j in (0, 1) for i in (0, 1))
MAX_COUNT = 32
COUNT_TOKENS: tuple[str, ...] = tuple(f"[COUNT_{n}]" for n in range(1, MAX_COUNT + 1))
TREE_TOKENS: tuple[str, ...] = tuple(f"[TREE_{v}]" for v in range(1, 256))


class Vocabulary:
    """Token <-> id map of Uni-3DAR; ids are contiguous and stable across versions of this list.

    Layout: specials, elements (id of element ``Z`` is ``element_offset + Z - 1``), residue-atom
    tokens (``<RES>_CA``), lattice corners, composition, counts, tree tokens (id of occupancy mask
    ``v`` in 1..255 is ``tree_offset + v - 1``).
    """

    def __init__(self, residue_atoms: Iterable[str] = ("CA",)) -> None:
        tokens: list[str] = list(SPECIALS)
        self.element_offset = len(tokens)
        tokens += ELEMENTS
        self.residue_offset = len(tokens)
        self.residue_atom_names = tuple(residue_atoms)
        tokens += [f"{res}_{atom}" for res in RESIDUES for atom in self.residue_atom_names]
        self.lattice_offset = len(tokens)
        tokens += LATTICE_CORNERS
        tokens.append("[COMPOSITION]")
        self.count_offset = len(tokens)
        tokens += COUNT_TOKENS
        self.tree_offset = len(tokens)
        tokens += TREE_TOKENS
        self.tokens: tuple[str, ...] = tuple(tokens)
        self._index = {t: i for i, t in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, token: str) -> int:
        if token not in self._index:
            raise DataFormatError(f"token {token!r} is not in the Uni-3DAR vocabulary")
        return self._index[token]

    def __contains__(self, token: str) -> bool:
        return token in self._index

    @property
    def pad(self) -> int:
        return self._index["[PAD]"]

    @property
    def mask(self) -> int:
        return self._index["[MASK]"]

    @property
    def cls(self) -> int:
        return self._index["[CLS]"]

    @property
    def num_elements(self) -> int:
        return len(ELEMENTS)

    def element_ids(self, numbers: np.ndarray, source: str = "structure") -> np.ndarray:
        """Atomic numbers (N,) int -> token ids (N,) int64; an unknown element raises naming it."""
        z = np.asarray(numbers, dtype=np.int64)
        bad = (z < 1) | (z > len(ELEMENTS))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataFormatError(f"{source}: atom {i} has atomic number {int(z[i])}, expected 1..{len(ELEMENTS)}")
        return z - 1 + self.element_offset

    def atomic_numbers(self, ids: np.ndarray) -> np.ndarray:
        """Element token ids (N,) -> atomic numbers (N,) int64; non-element ids raise."""
        i = np.asarray(ids, dtype=np.int64)
        z = i - self.element_offset + 1
        bad = (z < 1) | (z > len(ELEMENTS))
        if bad.any():
            raise DataFormatError(f"token id {int(i[np.flatnonzero(bad)[0]])} is not an element token")
        return z

    def symbol_ids(self, symbols: Iterable[str]) -> np.ndarray:
        """Element symbols or residue-atom names -> token ids (N,) int64."""
        return np.array([self[s] for s in symbols], dtype=np.int64)

    def residue_ids(self, residues: Iterable[str], atom: str = "CA") -> np.ndarray:
        """Residue names (three-letter, N) -> ``<RES>_<atom>`` ids (N,); non-standard residues map to UNK."""
        known = set(RESIDUES)
        return np.array(
            [self[f"{r if r in known else 'UNK'}_{atom}"] for r in (s.upper() for s in residues)], dtype=np.int64
        )

    def tree_ids(self, occupancy: np.ndarray) -> np.ndarray:
        """Occupancy masks (T,) in 1..255 -> tree token ids (T,)."""
        return np.asarray(occupancy, dtype=np.int64) - 1 + self.tree_offset

    def occupancy(self, ids: np.ndarray) -> np.ndarray:
        """Tree token ids (T,) -> occupancy masks (T,) in 1..255."""
        v = np.asarray(ids, dtype=np.int64) - self.tree_offset + 1
        if ((v < 1) | (v > 255)).any():
            raise DataFormatError("token id outside the tree-token range [TREE_1]..[TREE_255]")
        return v

    def lattice_ids(self) -> np.ndarray:
        """The eight lattice-corner ids, corner ``ijk`` at index ``i + 2 j + 4 k``."""
        return np.arange(self.lattice_offset, self.lattice_offset + 8, dtype=np.int64)
