"""Validity of generated crystals, after CDVAE (Xie et al., ICLR 2022) as used by Uni-3DAR on MP-20.

- Structural validity: the shortest interatomic distance over periodic images is above 0.5 Å and
  the cell volume above 0.1 Å³.
- Composition validity: some assignment of one common oxidation state per element makes the
  formula charge-neutral, with every anion more electronegative (Pauling) than every cation; a
  composition of metals only (an alloy or an element) is valid. CDVAE runs this test with SMACT's
  oxidation-state lists; the table below holds the common states of the elements through Bi
  (standard textbook values), so an element outside it makes a composition count as invalid
  (reported, never silently dropped) rather than guessed.
"""

from __future__ import annotations

import itertools

import numpy as np

# Common oxidation states; Pauling electronegativities.
_OX: dict[int, tuple[int, ...]] = {
    1: (-1, 1), 3: (1,), 4: (2,), 5: (3,), 6: (-4, 4, 2), 7: (-3, 3, 5), 8: (-2,), 9: (-1,), 11: (1,), 12: (2,),
    13: (3,), 14: (-4, 4), 15: (-3, 3, 5), 16: (-2, 4, 6), 17: (-1, 1, 3, 5, 7), 19: (1,), 20: (2,), 21: (3,),
    22: (4, 3, 2), 23: (5, 4, 3, 2), 24: (3, 6, 2), 25: (2, 4, 7, 3), 26: (3, 2), 27: (2, 3), 28: (2, 3), 29: (2, 1),
    30: (2,), 31: (3,), 32: (4, -4, 2), 33: (3, 5, -3), 34: (-2, 4, 6), 35: (-1, 1, 3, 5), 37: (1,), 38: (2,),
    39: (3,), 40: (4,), 41: (5, 3), 42: (6, 4, 3), 43: (7, 4), 44: (3, 4), 45: (3,), 46: (2, 4), 47: (1,), 48: (2,),
    49: (3,), 50: (4, 2, -4), 51: (3, 5, -3), 52: (-2, 4, 6), 53: (-1, 1, 5, 7), 55: (1,), 56: (2,), 57: (3,),
    58: (3, 4), 59: (3,), 60: (3,), 62: (3, 2), 63: (3, 2), 64: (3,), 65: (3,), 66: (3,), 67: (3,), 68: (3,),
    69: (3,), 70: (3, 2), 71: (3,), 72: (4,), 73: (5,), 74: (6, 4), 75: (7, 4), 76: (4,), 77: (4, 3), 78: (2, 4),
    79: (3, 1), 80: (2, 1), 81: (1, 3), 82: (2, 4), 83: (3,),
}  # fmt: skip
_CHI: dict[int, float] = {
    1: 2.20, 3: 0.98, 4: 1.57, 5: 2.04, 6: 2.55, 7: 3.04, 8: 3.44, 9: 3.98, 11: 0.93, 12: 1.31, 13: 1.61, 14: 1.90,
    15: 2.19, 16: 2.58, 17: 3.16, 19: 0.82, 20: 1.00, 21: 1.36, 22: 1.54, 23: 1.63, 24: 1.66, 25: 1.55, 26: 1.83,
    27: 1.88, 28: 1.91, 29: 1.90, 30: 1.65, 31: 1.81, 32: 2.01, 33: 2.18, 34: 2.55, 35: 2.96, 37: 0.82, 38: 0.95,
    39: 1.22, 40: 1.33, 41: 1.60, 42: 2.16, 43: 1.90, 44: 2.20, 45: 2.28, 46: 2.20, 47: 1.93, 48: 1.69, 49: 1.78,
    50: 1.96, 51: 2.05, 52: 2.10, 53: 2.66, 55: 0.79, 56: 0.89, 57: 1.10, 58: 1.12, 59: 1.13, 60: 1.14, 62: 1.17,
    63: 1.20, 64: 1.20, 65: 1.20, 66: 1.22, 67: 1.23, 68: 1.24, 69: 1.25, 70: 1.10, 71: 1.27, 72: 1.30, 73: 1.50,
    74: 2.36, 75: 1.90, 76: 2.20, 77: 2.20, 78: 2.28, 79: 2.54, 80: 2.00, 81: 1.62, 82: 2.33, 83: 2.02,
}  # fmt: skip
_NONMETALS = {1, 2, 5, 6, 7, 8, 9, 10, 14, 15, 16, 17, 18, 32, 33, 34, 35, 36, 51, 52, 53, 54, 85, 86}


def min_periodic_distance(frac: np.ndarray, lattice: np.ndarray) -> float:
    """Shortest distance (Å) between two atoms or an atom and its image over the 27 neighbouring cells.

    frac (N, 3) fractional coordinates, lattice (3, 3) rows a, b, c in Å.
    """
    frac = np.asarray(frac, np.float64) % 1.0
    shifts = np.array(list(itertools.product((-1, 0, 1), repeat=3)), np.float64)  # (27, 3)
    diff = frac[:, None, None, :] - frac[None, :, None, :] + shifts[None, None]  # (N, N, 27, 3)
    dist = np.linalg.norm(diff @ np.asarray(lattice, np.float64), axis=-1)
    self_image = np.eye(len(frac), dtype=bool)[:, :, None] & (np.abs(shifts).sum(1) == 0)[None, None]
    return float(np.where(self_image, np.inf, dist).min())


def structure_valid(frac: np.ndarray, lattice: np.ndarray, cutoff: float = 0.5, min_volume: float = 0.1) -> bool:
    """CDVAE structural validity: shortest periodic distance > ``cutoff`` Å and volume > ``min_volume`` Å³."""
    volume = abs(float(np.linalg.det(np.asarray(lattice, np.float64))))
    return volume > min_volume and min_periodic_distance(frac, lattice) > cutoff


def composition_valid(numbers: np.ndarray) -> bool:
    """Charge neutrality with common oxidation states plus the Pauling electronegativity test
    (see module docstring); all-metal compositions are valid."""
    elements, counts = np.unique(np.asarray(numbers, np.int64), return_counts=True)
    if len(elements) == 1 or not (set(elements.tolist()) & _NONMETALS):
        return True
    if any(int(z) not in _OX or int(z) not in _CHI for z in elements):
        return False
    for states in itertools.product(*(_OX[int(z)] for z in elements)):
        if int(np.dot(states, counts)) != 0:
            continue
        cations = [_CHI[int(z)] for z, s in zip(elements, states) if s > 0]
        anions = [_CHI[int(z)] for z, s in zip(elements, states) if s < 0]
        if not cations or not anions or max(cations) < min(anions):
            return True
    return False
