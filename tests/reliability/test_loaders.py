"""Unit checks of the resumable loader machinery (the end-to-end SIGKILL test is test_resume.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from threefold.datasets.errors import ConfigError
from threefold.pipelines.loaders import EpochSampler, ResumableDataLoader, ResumeStateCallback


@pytest.mark.parametrize("n, world", [(10, 1), (10, 3), (7, 2), (2, 4), (0, 2)])
def test_unshuffled_shards_match_torch_distributed_sampler(n, world):
    data = list(range(n))
    for rank in range(world):
        ref = list(DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False))
        ours = EpochSampler(n, shuffle=False, num_replicas=world, rank=rank)
        assert list(ours) == ref and len(ours) == len(ref)


def test_shuffled_order_is_a_function_of_seed_and_epoch_and_shards_cover_every_sample():
    a, b = EpochSampler(50, seed=1, num_replicas=3, rank=0), EpochSampler(50, seed=1, num_replicas=3, rank=0)
    a.set_epoch(4), b.set_epoch(4)
    assert list(a) == list(b)
    b.set_epoch(5)
    assert list(a) != list(b)
    assert list(EpochSampler(50, seed=2)) != list(EpochSampler(50, seed=1))
    shards = []
    for rank in range(3):
        s = EpochSampler(50, seed=1, num_replicas=3, rank=rank)
        s.set_epoch(4)
        shards += list(s)
    assert len(shards) == 51 and set(shards) == set(range(50))  # one wrapped pad sample, as DistributedSampler


def _batches(loader) -> list[list[int]]:
    return [b.tolist() for b in loader]


def test_state_resumes_at_the_next_batch_of_the_same_epoch():
    data = list(range(23))
    loader = ResumableDataLoader(data, batch_size=4, seed=9)
    loader.sampler.set_epoch(2)
    full = _batches(loader)
    assert sorted(sum(full, [])) == data and len(full) == 6
    it = iter(loader)
    for _ in range(3):
        next(it)
        loader.batch_finished(last=False)
    state = loader.state_dict()
    assert state["epoch"] == 2 and state["batches_done"] == 3
    fresh = ResumableDataLoader(data, batch_size=4, seed=9)
    fresh.load_state_dict(state)
    assert _batches(fresh) == full[3:]
    assert _batches(fresh) == full  # the skip applies once: the next iteration is a whole epoch


def test_state_after_the_last_batch_points_at_the_next_epoch():
    loader = ResumableDataLoader(list(range(8)), batch_size=4, seed=0)
    for i, _ in enumerate(loader):
        loader.batch_finished(last=i == 1)
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["batches_done"] == 0


@pytest.mark.parametrize("change", [{"seed": 1}, {"batch_size": 3}])
def test_resuming_with_another_setup_is_refused(change):
    state = ResumableDataLoader(list(range(10)), batch_size=2, seed=0).state_dict()
    kwargs = {"batch_size": 2, "seed": 0, **change}
    with pytest.raises(ConfigError, match=next(iter(change))):
        ResumableDataLoader(list(range(10)), **kwargs).load_state_dict(state)
    with pytest.raises(ConfigError, match="dataset_len"):
        ResumableDataLoader(list(range(11)), batch_size=2, seed=0).load_state_dict(state)


def test_owned_arguments_are_refused():
    for kw in ({"sampler": None}, {"generator": torch.Generator()}, {"batch_sampler": None}):
        with pytest.raises(ConfigError, match=next(iter(kw))):
            ResumableDataLoader(list(range(4)), **kw)


def test_iterating_does_not_touch_the_global_generator():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    _batches(ResumableDataLoader(list(range(10)), batch_size=3, seed=5))
    assert torch.equal(torch.rand(3), expected)


def test_rng_state_round_trips_through_weights_only_serialisation(tmp_path):
    import random

    cb = ResumeStateCallback()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # leaves a cached Gaussian in NumPy's legacy state
    torch.save(cb.state_dict(), tmp_path / "s.pt")
    expected = (random.random(), np.random.randn(3), torch.rand(3))
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    cb.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    cb.on_train_start(None, None)
    got = (random.random(), np.random.randn(3), torch.rand(3))
    assert got[0] == expected[0] and np.array_equal(got[1], expected[1]) and torch.equal(got[2], expected[2])


@pytest.mark.gpu
def test_cuda_generator_state_is_restored():
    cb = ResumeStateCallback()
    torch.cuda.manual_seed_all(11)
    torch.rand(1, device="cuda")  # initialises CUDA so the callback records its generators
    state = cb.state_dict()
    assert "cuda" in state
    expected = torch.rand(4, device="cuda")
    torch.cuda.manual_seed_all(12)
    cb.load_state_dict(state)
    cb.on_train_start(None, None)
    assert torch.equal(torch.rand(4, device="cuda"), expected)
