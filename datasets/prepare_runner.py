"""One runner for every dataset-wide preprocessing step (``threefold prepare DATASET``).

A step is a list of *items* (a scan, a case, a shard of molecules), a picklable per-item function
that writes the item's cache entry, and a "done?" predicate (the entry exists). :func:`run_prepare`

- orders the items deterministically (sorted by ``key``) and keeps those of one **shard**
  ``(i, n)``: item ``j`` of the sorted list belongs to shard ``j % n``, so ``n`` machines given
  ``--shard 0/n`` .. ``--shard n-1/n`` cover the list exactly once, with no coordination other than
  the shared (or later merged) cache folder. Round-robin rather than contiguous blocks keeps the
  shards balanced when item cost drifts along the list (longer sequences, bigger cases);
- **resumes**: items whose entry exists are skipped, never recomputed. Entries are written
  atomically (:class:`~threefold.datasets.cache.FeatureCache`), so a killed run loses at most the
  items in flight;
- computes the rest in ``workers`` spawned processes (1 = in this process; the "done?" check runs
  there too, so hashing the inputs is parallel as well), with a tqdm progress bar, and stops at the first failing item with a :class:`PrepareItemError` naming it — an item is
  never dropped silently, and the entries finished before it stay for the rerun.

Returns counts ``{"items", "shard_items", "computed", "skipped", "seconds", "items_per_s"}``
(``items_per_s`` = computed items per wall-clock second).

Spawn, not fork: the parent may hold torch / OpenMP thread pools that a forked child would inherit
mid-state; spawned workers import only what the item function needs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from typing import Any, TypeVar

from threefold.datasets.errors import ConfigError, ThreefoldError

T = TypeVar("T")


class PrepareItemError(ThreefoldError):
    """One item of a preprocessing run failed; the message names the item and the cause."""


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``; anything else raises :class:`ConfigError`."""
    parts = str(text).split("/")
    try:
        if len(parts) != 2:
            raise ValueError
        i, n = int(parts[0]), int(parts[1])
    except ValueError:
        raise ConfigError(f"--shard {text!r}: expected i/n with whole numbers, e.g. 0/4") from None
    check_shard((i, n), f"--shard {text}")
    return i, n


def check_shard(shard: tuple[int, int], source: str = "shard") -> None:
    i, n = shard
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"{source}: shard index {i} of {n}; expected 0 <= i < n and n >= 1")


def shard_items(items: Sequence[T], shard: tuple[int, int] = (0, 1), key: Callable[[T], Any] = str) -> list[T]:
    """The items of shard ``(i, n)``: every ``n``-th item of ``items`` sorted by ``key``, from the ``i``-th."""
    check_shard(shard)
    i, n = shard
    ordered = sorted(items, key=key)
    return ordered[i::n]


def _describe(item: Any) -> str:
    text = str(item)
    return text if len(text) <= 300 else text[:297] + "..."


def _fail(desc: str, item: Any, exc: BaseException) -> PrepareItemError:
    return PrepareItemError(f"{desc}: item {_describe(item)} failed: {type(exc).__name__}: {exc}")


def _check_and_build(item: T, build: Callable[[T], Any], done: Callable[[T], bool]) -> bool:
    """True when ``item`` was computed, False when its entry already existed."""
    if done(item):
        return False
    build(item)
    return True


def run_prepare(items: Sequence[T], build: Callable[[T], Any], done: Callable[[T], bool], *,
                workers: int = 1, shard: tuple[int, int] = (0, 1), desc: str = "prepare", unit: str = "item",
                progress: bool = True, key: Callable[[T], Any] = str) -> dict[str, Any]:
    """Run ``build(item)`` for every item of ``shard`` whose ``done(item)`` is false (see module docstring).

    items    the whole dataset's items (every shard passes the same list; they are sorted by ``key``)
    build    module-level (picklable) function writing one item's cache entry; its return is ignored
    done     module-level (picklable) predicate, True when the item's entry already exists; evaluated
             where the item would be built (in the workers), so the content hashing it usually does
             runs in parallel too
    workers  processes; 1 computes in this process (no pickling, easiest to debug)
    shard    ``(i, n)``: this run owns sorted items ``j`` with ``j % n == i``
    """
    from tqdm import tqdm

    workers = int(workers)
    if workers < 1:
        raise ConfigError(f"{desc}: workers={workers}; expected at least 1")
    t0 = time.perf_counter()
    mine = shard_items(items, shard, key)
    with tqdm(total=len(mine), desc=desc, unit=unit, disable=not progress) as bar:
        if workers == 1 or len(mine) <= 1:
            computed = 0
            for item in mine:
                try:
                    computed += _check_and_build(item, build, done)
                except Exception as exc:  # noqa: BLE001 — re-raised with the item's name
                    raise _fail(desc, item, exc) from exc
                bar.update()
        else:
            computed = _run_pool(mine, build, done, min(workers, len(mine)), desc, bar)
    seconds = time.perf_counter() - t0
    return {"items": len(items), "shard_items": len(mine), "computed": computed, "skipped": len(mine) - computed,
            "seconds": seconds, "items_per_s": computed / seconds if seconds > 0 else float("nan")}


def _run_pool(mine: list, build: Callable, done: Callable, workers: int, desc: str, bar: Any) -> int:
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"))
    computed = 0
    try:
        futures = {pool.submit(_check_and_build, item, build, done): item for item in mine}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                exc = fut.exception()
                if exc is not None:
                    raise _fail(desc, futures[fut], exc) from exc
                computed += bool(fut.result())
                bar.update()
    except BaseException:
        # the first failure (or Ctrl-C) stops the run: queued items are dropped, running ones finish
        # their atomic write or leave nothing, so a rerun resumes cleanly
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return computed


def default_workers() -> int:
    """``min(4, cpu count)``: preprocessing is memory-bound past a few processes on most machines."""
    return min(4, os.cpu_count() or 1)


__all__ = ["PrepareItemError", "check_shard", "default_workers", "parse_shard", "run_prepare", "shard_items"]
