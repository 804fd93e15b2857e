"""Crash-safe training: a data loader that resumes mid-epoch, and the RNG state kept in checkpoints.

A run killed mid-epoch (SIGKILL, pre-emption, out of memory) and resumed from its last checkpoint
should continue as if it had never stopped: same next batch, same shuffling order, same dropout
masks. Lightning 2.6 restores the model, optimizer, scheduler and loop counters; it also saves and
restores the ``state_dict()`` of any train dataloader that has ``state_dict``/``load_state_dict``
(``FitLoop.on_save_checkpoint`` stores them under ``loops.fit_loop.combined_loader``, and
``FitLoop.setup_data`` loads them before it first iterates the loader). This module supplies the two
pieces Lightning leaves to the user:

- :class:`ResumableDataLoader`: a ``DataLoader`` over a map-style dataset whose order depends only on
  ``(seed, epoch)`` (:class:`EpochSampler`) and whose state is "epoch ``e``, ``k`` batches finished".
  On resume the sampler starts at sample ``k * batch_size`` of epoch ``e``'s order, so skipped
  batches are never loaded. "Finished" means the training step returned
  (:class:`ResumeStateCallback` counts them in ``on_train_batch_end``), not "fetched": Lightning
  prefetches one batch ahead, and workers further, so a fetch count would skip unseen batches.
- :class:`ResumeStateCallback`: stores the Python, NumPy, torch CPU (and CUDA) generator states in the
  checkpoint and restores them at ``on_train_start`` — after Lightning has prefetched the first batch,
  exactly where the interrupted run stood when it wrote the checkpoint.

``RunContext.trainer`` attaches the callback to every trainer, so a pipeline opts in by returning a
``ResumableDataLoader`` from its ``train_dataloader``::

    def train_dataloader(self):
        return ResumableDataLoader(self.train_set, batch_size=cfg.trainer.batch_size, seed=cfg.seed,
                                   collate_fn=collate_points, num_workers=cfg.trainer.num_workers)

Exactness holds when data loading itself draws no numbers from the process-global generators (a
random transform takes its own ``torch.Generator`` or runs in a worker, whose seed here depends
only on ``(seed, epoch)``). Under DDP every rank keeps its shard of one padded permutation
(``DistributedSampler`` semantics), and the checkpoint holds every rank's generator states (gathered
while the checkpoint is dumped, which all ranks do), so each rank resumes with its own dropout masks.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator, Sized
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from threefold.datasets.errors import ConfigError

# An odd 64-bit multiplier spreads (seed, epoch) pairs so that seed s, epoch e+1 never equals seed s+1, epoch e.
_EPOCH_MIX = 0x9E3779B97F4A7C15


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s permutation and worker seeds: a fixed mix of ``(seed, epoch)``."""
    return (seed * _EPOCH_MIX + epoch) % (1 << 63)


class EpochSampler(DistributedSampler):
    """Sample indices in an order fixed by ``(seed, epoch)``, sharded by rank, able to start mid-epoch.

    ``num_samples`` is the dataset length. With ``shuffle`` the order of epoch ``e`` is
    ``torch.randperm(num_samples, generator=Generator().manual_seed(epoch_seed(seed, e)))``, else
    ``0..num_samples-1``. With ``W`` replicas the order is padded by wrapping to ``ceil(n / W) * W`` and
    rank ``r`` takes every ``W``-th index from ``r`` (as ``DistributedSampler``); ``num_replicas`` and
    ``rank`` default to the initialised process group's, else 1 and 0, resolved when iterated.

    It subclasses ``DistributedSampler`` so that Lightning keeps it under DDP instead of wrapping
    it in its own sampler (which would lose the mid-epoch position); its ``__init__`` does not need
    an initialised process group.
    """

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True,
                 num_replicas: int | None = None, rank: int | None = None) -> None:
        if num_samples < 0:
            raise ConfigError(f"EpochSampler: num_samples={num_samples} must be >= 0")
        self.dataset_len = int(num_samples)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self.drop_last = False
        self.start = 0  # indices of this rank's order skipped by the next __iter__ (set on resume)
        self._num_replicas, self._rank = num_replicas, rank

    @property
    def num_replicas(self) -> int:
        if self._num_replicas is not None:
            return self._num_replicas
        dist = torch.distributed
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    @property
    def rank(self) -> int:
        if self._rank is not None:
            return self._rank
        dist = torch.distributed
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    def __len__(self) -> int:
        return math.ceil(self.dataset_len / self.num_replicas) if self.dataset_len else 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self, epoch: int) -> torch.Tensor:
        """This rank's full index order of ``epoch``: (len(self),) int64."""
        n, world = self.dataset_len, self.num_replicas
        if self.shuffle:
            g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
            perm = torch.randperm(n, generator=g)
        else:
            perm = torch.arange(n)
        total = len(self) * world
        if total > n:
            perm = torch.cat([perm, perm.repeat(math.ceil((total - n) / max(n, 1)))[: total - n]])
        return perm[self.rank : total : world]

    def __iter__(self) -> Iterator[int]:
        start, self.start = self.start, 0
        return iter(self.order(self.epoch)[start:].tolist())


class RankShardSampler(torch.utils.data.Sampler[int]):
    """Rank ``rank``'s share of an index stream that every rank draws identically: the positions
    ``rank, rank + W, rank + 2W, ...`` of ``base`` (``W = num_replicas``), as ``DistributedSampler``
    shards a permutation. For samplers that are not permutations, e.g. a seeded
    ``RandomSampler(replacement=True, num_samples=W * n)``: the W ranks then together take the first
    ``W * n`` draws, each draw once, and with W = 1 the stream is ``base`` itself.

    Hand it to a ``DataLoader`` of a fit with ``use_distributed_sampler=False`` (Lightning would
    otherwise wrap it a second time).
    """

    def __init__(self, base: torch.utils.data.Sampler[int], num_replicas: int = 1, rank: int = 0) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ConfigError(f"RankShardSampler: rank {rank} of num_replicas {num_replicas}")
        self.base, self.num_replicas, self.rank = base, int(num_replicas), int(rank)

    def __len__(self) -> int:
        return max(0, math.ceil((len(self.base) - self.rank) / self.num_replicas))  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.base), self.rank, None, self.num_replicas)


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose position inside an epoch is saved in Lightning checkpoints and restored.

    ``dataset`` is map-style (has ``__len__``). Batches are ``batch_size`` consecutive indices of
    :class:`EpochSampler`'s order (the last one shorter unless ``drop_last``); ``seed`` fixes every
    epoch's order and the worker seeds (``torch.initial_seed()`` in worker ``w`` of epoch ``e`` is a
    function of ``(seed, e, w)`` only). Other keyword arguments go to ``DataLoader``; ``sampler``,
    ``batch_sampler`` and ``generator`` are owned by this class and refused.

    ``state_dict()`` -> ``{"epoch", "batches_done", "seed", "batch_size", "dataset_len", "num_replicas"}``;
    a state saved after the last batch of an epoch points at batch 0 of the next epoch.
    ``load_state_dict`` refuses a state from a different seed, batch size, dataset length or world size
    (:class:`~threefold.datasets.errors.ConfigError`): the position would then name other samples.
    """

    def __init__(self, dataset: Dataset, batch_size: int = 1, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, **kwargs: Any) -> None:
        owned = sorted({"sampler", "batch_sampler", "generator"} & kwargs.keys())
        if owned:
            raise ConfigError(f"ResumableDataLoader: {', '.join(owned)} cannot be set (it owns its sampler and generator)")
        if not isinstance(dataset, Sized):
            raise ConfigError(f"ResumableDataLoader: dataset {type(dataset).__name__} has no __len__ (map-style needed)")
        super().__init__(dataset, batch_size=batch_size, sampler=EpochSampler(len(dataset), seed, shuffle),
                         drop_last=drop_last, generator=torch.Generator(), **kwargs)
        self._seed = int(seed)
        self._finished = 0  # training steps finished in the current epoch
        self._epoch_done = False
        self._pending: tuple[int, int] | None = None  # (epoch, batches_done) from load_state_dict

    def __iter__(self):
        sampler: EpochSampler = self.sampler
        if self._pending is not None:
            epoch, done = self._pending
            self._pending = None
            sampler.set_epoch(epoch)
            sampler.start = done * self.batch_size
            self._finished = done
        else:
            self._finished = 0
        self._epoch_done = False
        # DataLoader draws the workers' base seed from this generator at each iter(); seeding it from
        # (seed, epoch) makes a resumed epoch's workers identical and keeps the global RNG untouched.
        self.generator.manual_seed(epoch_seed(self._seed, sampler.epoch) ^ 1)
        return super().__iter__()

    def batch_finished(self, last: bool) -> None:
        """Record that a training step on one of this loader's batches returned (``last``: the epoch's last)."""
        self._finished += 1
        self._epoch_done = self._epoch_done or last

    def state_dict(self) -> dict[str, int]:
        sampler: EpochSampler = self.sampler
        epoch, done = (sampler.epoch + 1, 0) if self._epoch_done else (sampler.epoch, self._finished)
        return {"epoch": epoch, "batches_done": done, "seed": self._seed, "batch_size": int(self.batch_size),
                "dataset_len": sampler.dataset_len, "num_replicas": sampler.num_replicas}

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler: EpochSampler = self.sampler
        now = {"seed": self._seed, "batch_size": int(self.batch_size), "dataset_len": sampler.dataset_len,
               "num_replicas": sampler.num_replicas}
        differ = {k: (state.get(k), v) for k, v in now.items() if state.get(k) != v}
        if differ:
            detail = ", ".join(f"{k}: checkpoint {a} vs now {b}" for k, (a, b) in differ.items())
            raise ConfigError(f"ResumableDataLoader: cannot resume mid-epoch with a different setup ({detail})")
        self._pending = (int(state["epoch"]), int(state["batches_done"]))


def _flatten(obj: Any) -> list[Any]:
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _flatten(v)]
    if isinstance(obj, (list, tuple)):
        return [x for v in obj for x in _flatten(v)]
    return [obj]


def _rng_state() -> dict[str, Any]:
    """The process-global Python, NumPy, torch CPU (and initialised CUDA) generator states, in a form
    ``torch.load(weights_only=True)`` accepts (tensors and plain Python values, no numpy arrays)."""
    version, keys, gauss = random.getstate()
    name, mt, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(keys), "gauss_next": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(mt.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(s: dict[str, Any]) -> None:
    py = s["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    n = s["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


class ResumeStateCallback(L.Callback):
    """Saves the process-global RNG states in each checkpoint and restores them when a fit resumes;
    advances every :class:`ResumableDataLoader`'s count of finished training steps."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None
        self._trainer: L.Trainer | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        """Rank 0's states at the top level (the single-process layout) and, under DDP, every rank's
        under ``"ranks"``. Lightning dumps checkpoints on all ranks (only rank 0 writes), so the
        gather below is a collective every rank reaches."""
        state = _rng_state()
        world = self._trainer.world_size if self._trainer is not None else 1
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks: list[Any] = [None] * world
            torch.distributed.all_gather_object(ranks, state)
            return {**ranks[0], "ranks": ranks}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is None:
            return
        s, self._pending = self._pending, None
        ranks = s.get("ranks")
        if ranks is not None and len(ranks) != trainer.world_size:
            raise ConfigError(f"the checkpoint holds the RNG states of {len(ranks)} ranks but this run has "
                              f"{trainer.world_size}: resume with the world size it was saved with")
        _set_rng_state(ranks[trainer.global_rank] if ranks is not None else s)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        last = bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)
        for loader in _flatten(trainer.train_dataloader):
            if isinstance(loader, ResumableDataLoader):
                loader.batch_finished(last)
