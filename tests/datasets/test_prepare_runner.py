"""The shared preprocessing runner: shards partition the items exactly, resumption skips finished
items, 1 and 2 worker processes do the same work, a failing item raises naming it."""

from __future__ import annotations

import itertools
import os
from functools import partial
from pathlib import Path

import pytest

from threefold.datasets.errors import ConfigError
from threefold.datasets.prepare_runner import PrepareItemError, parse_shard, run_prepare, shard_items


def test_shards_partition_the_items_exactly():
    items = [f"scan{i:03d}" for i in (7, 3, 11, 0, 5, 9, 1, 2, 8, 4, 6, 10, 12)]  # unsorted on purpose
    for n in range(1, 7):
        shards = [shard_items(items, (i, n)) for i in range(n)]
        assert sorted(itertools.chain(*shards)) == sorted(items)  # union = all ...
        for a, b in itertools.combinations(shards, 2):
            assert not set(a) & set(b)  # ... pairwise disjoint
        # item j of the sorted list goes to shard j % n, whatever the input order
        ordered = sorted(items)
        assert shards == [[x for j, x in enumerate(ordered) if j % n == i] for i in range(n)]
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert shard_items(list(reversed(items)), (1, 3)) == shard_items(items, (1, 3))
    # more shards than items: the extra shards are empty, not an error
    assert [shard_items(items[:2], (i, 4)) for i in range(4)] == [["scan003"], ["scan007"], [], []]


@pytest.mark.parametrize("text", ["3/3", "-1/2", "0/0", "1", "a/b", "1/2/3", "", "1.5/2"])
def test_bad_shard(text):
    with pytest.raises(ConfigError, match="--shard"):
        parse_shard(text)


def test_parse_shard():
    assert parse_shard("0/1") == (0, 1) and parse_shard("3/4") == (3, 4)


_done = os.path.exists  # module-level and picklable, as the spawned workers need
@pytest.mark.parametrize("workers", [1, 2])
def test_run_counts_resume_and_shards(tmp_path, workers):
    items = [tmp_path / f"entry{i:02d}" for i in range(9)]
    items[4].touch()  # finished by an earlier run
    build = Path.touch  # module-level, picklable for the spawned workers
    first = run_prepare(items, build, _done, workers=workers, shard=(0, 2), progress=False)
    assert {k: first[k] for k in ("items", "shard_items", "computed", "skipped")} == \
        {"items": 9, "shard_items": 5, "computed": 4, "skipped": 1}
    assert first["seconds"] > 0 and first["items_per_s"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"entry{i:02d}" for i in (0, 2, 4, 6, 8)]
    second = run_prepare(items, build, _done, workers=workers, shard=(1, 2), progress=False)
    assert (second["shard_items"], second["computed"], second["skipped"]) == (4, 4, 0)
    again = run_prepare(items, build, _done, workers=workers, progress=False)
    assert (again["shard_items"], again["computed"], again["skipped"]) == (9, 0, 9)


@pytest.mark.parametrize("workers", [1, 2])
def test_failing_item_is_named(tmp_path, workers):
    good = [tmp_path / f"ok{i}" for i in range(3)]
    bad = tmp_path / "no-such-folder" / "entry"
    with pytest.raises(PrepareItemError, match=r"item .*no-such-folder/entry failed: FileNotFoundError"):
        run_prepare(good + [bad], partial(Path.touch, exist_ok=True), _done, workers=workers, progress=False)


def test_failing_done_check_is_named(tmp_path):
    def done(item):
        raise OSError("unreadable input")

    with pytest.raises(PrepareItemError, match=r"item .*entry0 failed: OSError: unreadable input"):
        run_prepare([tmp_path / "entry0"], Path.touch, done, progress=False)


def test_bad_workers(tmp_path):
    with pytest.raises(ConfigError, match="workers=0"):
        run_prepare([tmp_path / "a"], Path.touch, _done, workers=0, progress=False)
