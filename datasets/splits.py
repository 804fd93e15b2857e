"""Deterministic, seeded dataset splits and the one seeding entry point of every pipeline.

A split depends only on ``(n, fractions, seed)`` — never on global random state — so the same
config gives the same train/val/test membership on any machine and in any process. Permutations
come from NumPy's ``PCG64`` (``numpy.random.default_rng``), whose stream NumPy keeps stable across
releases, rather than ``torch.randperm``, whose output may change with the torch version or device.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence

import numpy as np
import torch

from threefold.datasets.errors import ConfigError

_MAX_SEED = 2**32 - 1  # numpy.random.seed accepts [0, 2**32 - 1]


def _check_seed(seed: int, name: str = "seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ConfigError(f"{name}: expected an int in [0, {_MAX_SEED}], got {seed!r} ({type(seed).__name__})")
    if not 0 <= int(seed) <= _MAX_SEED:
        raise ConfigError(f"{name}: expected an int in [0, {_MAX_SEED}], got {seed}")
    return int(seed)


def _check_n(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ConfigError(f"n: expected a non-negative int (number of samples), got {n!r}")
    return int(n)


def seed_everything(seed: int) -> int:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and every CUDA device).

    Also sets ``PYTHONHASHSEED`` so that worker processes started afterwards hash strings alike.
    Returns ``seed`` so a pipeline can record it: ``cfg.seed = seed_everything(cfg.seed)``.
    Raises :class:`ConfigError` unless ``seed`` is an int in ``[0, 2**32 - 1]``.
    """
    seed = _check_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too
    return seed


def split_indices(n: int, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Shuffle ``range(n)`` with ``seed`` and cut it into parts of the given ``fractions``.

    ``fractions`` are non-negative and sum to 1 (within 1e-6). Part sizes are ``floor(f * n)`` with the
    remaining samples given one each to the parts with the largest fractional remainders (ties to the
    earlier part), so sizes differ from ``f * n`` by less than one and always add up to ``n``.
    Returns one int64 array per part, in shuffled order: the parts are disjoint and together cover ``range(n)``.
    """
    n = _check_n(n)
    seed = _check_seed(seed)
    frac = np.asarray(list(fractions), dtype=np.float64)
    if frac.ndim != 1 or frac.size == 0:
        raise ConfigError(f"fractions: expected a non-empty list of numbers, got {fractions!r}")
    if not np.all(np.isfinite(frac)) or np.any(frac < 0) or abs(frac.sum() - 1.0) > 1e-6:
        raise ConfigError(f"fractions: expected non-negative numbers summing to 1, got {list(frac)} (sum {frac.sum()})")
    exact = frac * n
    sizes = np.floor(exact).astype(np.int64)
    short = n - int(sizes.sum())
    # largest remainder first; a stable sort keeps ties in part order
    order = np.argsort(-(exact - sizes), kind="stable")
    sizes[order[:short]] += 1
    perm = np.random.default_rng(seed).permutation(n).astype(np.int64)
    return np.split(perm, np.cumsum(sizes)[:-1])


def kfold_indices(n: int, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """K-fold cross-validation on a seeded shuffle of ``range(n)``: ``k`` pairs ``(train, val)``.

    The validation folds are consecutive chunks of the permutation with the sizes of scikit-learn's
    ``KFold`` (the first ``n % k`` folds hold one extra sample); every index is in exactly one
    validation fold. Arrays are int64. Raises :class:`ConfigError` unless ``2 <= k <= n``.
    """
    n = _check_n(n)
    seed = _check_seed(seed)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 2 <= k <= n:
        raise ConfigError(f"k: expected an int with 2 <= k <= n={n}, got {k!r}")
    perm = np.random.default_rng(seed).permutation(n).astype(np.int64)
    folds = np.array_split(perm, int(k))
    return [(np.concatenate(folds[:i] + folds[i + 1 :]), folds[i]) for i in range(int(k))]


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A CPU ``torch.Generator`` for the augmentation of one dataset item in one epoch.

    Seeded from ``(seed, epoch, index)`` through NumPy's ``SeedSequence`` (well-mixed 64-bit state),
    so an item draws the same augmentation in whichever DataLoader worker loads it, and a new one
    each epoch.
    """
    hi, lo = np.random.SeedSequence([_check_seed(seed), int(epoch), int(index)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(hi) << 32 | int(lo))
