"""Seeded splits: partitions, sizes from the largest-remainder rule, K-fold sizes against scikit-learn,
and seed_everything reproducing Python, NumPy and torch draws."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from sklearn.model_selection import KFold

from threefold.datasets.errors import ConfigError
from threefold.datasets.splits import item_generator, kfold_indices, seed_everything, split_indices


@pytest.mark.parametrize("n,fractions,sizes", [
    (10, (0.7, 0.2, 0.1), [7, 2, 1]),
    (7, (0.5, 0.5), [4, 3]),          # tie in the remainders: the earlier part gets the extra sample
    (11, (0.8, 0.1, 0.1), [9, 1, 1]),  # 8.8, 1.1, 1.1: the largest remainder (0.8) is first
    (3, (0.0, 1.0), [0, 3]),
    (0, (0.5, 0.5), [0, 0]),
])
def test_split_sizes_and_partition(n, fractions, sizes):
    parts = split_indices(n, fractions, seed=4)
    assert [len(p) for p in parts] == sizes
    assert all(p.dtype == np.int64 for p in parts)
    assert sorted(np.concatenate(parts).tolist()) == list(range(n))


def test_split_is_deterministic_and_seed_dependent():
    a = split_indices(100, (0.8, 0.2), seed=1)
    b = split_indices(100, (0.8, 0.2), seed=1)
    c = split_indices(100, (0.8, 0.2), seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], c[1])
    np.random.seed(0)  # global state must not matter
    assert np.array_equal(split_indices(100, (0.8, 0.2), seed=1)[1], a[1])


def test_split_errors():
    with pytest.raises(ConfigError, match="sum"):
        split_indices(10, (0.5, 0.4), seed=0)
    with pytest.raises(ConfigError, match="non-negative"):
        split_indices(10, (1.5, -0.5), seed=0)
    with pytest.raises(ConfigError, match="seed"):
        split_indices(10, (1.0,), seed=-1)
    with pytest.raises(ConfigError, match="n:"):
        split_indices(-3, (1.0,), seed=0)


@pytest.mark.parametrize("n,k", [(10, 3), (23, 5), (6, 6)])
def test_kfold_matches_sklearn_fold_sizes_and_covers_everything(n, k):
    folds = kfold_indices(n, k, seed=9)
    ref = [len(test) for _, test in KFold(n_splits=k).split(np.zeros(n))]
    assert [len(val) for _, val in folds] == ref
    assert sorted(np.concatenate([val for _, val in folds]).tolist()) == list(range(n))
    for train, val in folds:
        assert set(train.tolist()).isdisjoint(val.tolist()) and len(train) + len(val) == n
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, kfold_indices(n, k, seed=9)))
    with pytest.raises(ConfigError, match="k"):
        kfold_indices(n, n + 1, seed=0)


def test_seed_everything_reproduces_all_generators():
    assert seed_everything(123) == 123
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_everything(123)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first
    seed_everything(124)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) != first
    for bad in (1.5, "7", True, 2**32):
        with pytest.raises(ConfigError):
            seed_everything(bad)


def test_item_generator_depends_only_on_seed_epoch_index():
    draw = torch.rand(4, generator=item_generator(7, 0, 3))
    torch.manual_seed(999)  # global state must not matter
    assert torch.equal(torch.rand(4, generator=item_generator(7, 0, 3)), draw)
    others = [item_generator(7, 1, 3), item_generator(7, 0, 4), item_generator(8, 0, 3)]
    assert all(not torch.equal(torch.rand(4, generator=g), draw) for g in others)
