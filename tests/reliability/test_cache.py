"""FeatureCache (issue #10 §3): keyed by input content / stat and parameters, written atomically,
corrupt entries detected and rebuilt. The kill-mid-write cases SIGKILL a real child process at the
two dangerous moments (payload half flushed; complete temp file not yet renamed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from threefold.datasets.cache import MAGIC, FeatureCache
from threefold.datasets.errors import ConfigError, DataFormatError, MissingFileError


class Builder:
    """Counts calls so a test can tell a hit (no call) from a miss."""

    def __init__(self, value: dict[str, np.ndarray]) -> None:
        self.value, self.calls = value, 0

    def __call__(self) -> dict[str, np.ndarray]:
        self.calls += 1
        return self.value


@pytest.fixture
def scan(tmp_path) -> Path:
    p = tmp_path / "scan.bin"
    p.write_bytes(np.arange(40, dtype="<f4").tobytes())
    return p


def _value() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"coord": rng.normal(size=(100, 3)).astype(np.float32), "label": rng.integers(0, 5, 100)}


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


def test_hit_returns_the_stored_arrays_without_building(tmp_path, scan):
    cache = FeatureCache(tmp_path / "c", "voxels", {"size": 0.05, "axes": [0, 1]})
    b = Builder(_value())
    first = cache.get_or_build([scan], b)
    second = FeatureCache(tmp_path / "c", "voxels", {"axes": [0, 1], "size": 0.05}).get_or_build([scan], b)
    assert b.calls == 1 and _same(first, _value()) and _same(second, _value())
    (entry,) = (tmp_path / "c" / "voxels").rglob("*.entry")
    assert entry.read_bytes().startswith(MAGIC)
    assert not list((tmp_path / "c").rglob("*.tmp"))


@pytest.mark.parametrize("change", ["param", "namespace", "content", "touch", "extra_input"])
def test_any_change_of_key_material_is_a_miss(tmp_path, scan, change):
    b = Builder(_value())
    FeatureCache(tmp_path / "c", "voxels", {"size": 0.05}, key_by="stat").get_or_build([scan], b)
    params, ns, inputs = {"size": 0.05}, "voxels", [scan]
    if change == "param":
        params = {"size": 0.1}
    elif change == "namespace":
        ns = "voxels2"
    elif change == "content":  # same size, different bytes, mtime forced equal: only key_by="content" sees it
        st = scan.stat()
        scan.write_bytes(np.arange(1, 41, dtype="<f4").tobytes())
        os.utime(scan, ns=(st.st_atime_ns, st.st_mtime_ns))
        FeatureCache(tmp_path / "c", ns, params, key_by="stat").get_or_build(inputs, b)
        assert b.calls == 1  # documented limit of key_by="stat": same size and mtime look unchanged
        FeatureCache(tmp_path / "c2", ns, params).get_or_build(inputs, b)  # the default: content
        assert b.calls == 2
        FeatureCache(tmp_path / "c3", ns, params, key_by="content").get_or_build(inputs, b)
        assert b.calls == 3
        FeatureCache(tmp_path / "c3", ns, params, key_by="content").get_or_build(inputs, b)
        assert b.calls == 3
        scan.write_bytes(np.arange(40, dtype="<f4").tobytes())
        FeatureCache(tmp_path / "c3", ns, params, key_by="content").get_or_build(inputs, b)
        assert b.calls == 4
        return
    elif change == "touch":
        st = scan.stat()
        os.utime(scan, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    else:
        other = tmp_path / "labels.bin"
        other.write_bytes(b"\0" * 8)
        inputs = [scan, other]
    FeatureCache(tmp_path / "c", ns, params, key_by="stat").get_or_build(inputs, b)
    assert b.calls == 2


@pytest.mark.parametrize("damage", ["truncate", "flip_payload", "flip_digest", "empty", "garbage"])
def test_corrupt_entry_is_detected_and_rebuilt(tmp_path, scan, damage):
    cache = FeatureCache(tmp_path / "c", "voxels", {"size": 0.05})
    b = Builder(_value())
    cache.get_or_build([scan], b)
    entry = cache.path(cache.key([scan]))
    blob = entry.read_bytes()
    header = len(MAGIC) + 32
    bad = {"truncate": blob[: len(blob) // 2], "empty": b"", "garbage": os.urandom(len(blob)),
           "flip_payload": blob[:-10] + bytes([blob[-10] ^ 0xFF]) + blob[-9:],
           "flip_digest": blob[:header - 1] + bytes([blob[header - 1] ^ 1]) + blob[header:]}[damage]
    entry.write_bytes(bad)
    with pytest.raises(DataFormatError, match=str(entry.name)):
        cache.load(cache.key([scan]))
    with pytest.warns(RuntimeWarning, match="rebuilding"):
        again = cache.get_or_build([scan], b)
    assert b.calls == 2 and _same(again, _value())
    assert entry.read_bytes() == blob  # rebuilt entry is the complete one
    assert _same(cache.get_or_build([scan], b), _value()) and b.calls == 2


CHILD = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from threefold.datasets.cache import FeatureCache
    root, scan, when = sys.argv[1], sys.argv[2], sys.argv[3]
    if when == "mid-write":
        # the payload is half on disk when the process dies
        real_open = os.fdopen
        class Half:
            def __init__(self, f): self.f = f
            def __enter__(self): return self
            def __exit__(self, *a): return False
            def write(self, b):
                if len(b) > 1000:
                    self.f.write(b[: len(b) // 2]); self.f.flush(); os.kill(os.getpid(), signal.SIGKILL)
                return self.f.write(b)
            def __getattr__(self, k): return getattr(self.f, k)
        os.fdopen = lambda fd, mode: Half(real_open(fd, mode))
    else:
        # the temp file is complete and fsynced, the rename has not happened
        os.replace = lambda a, b: os.kill(os.getpid(), signal.SIGKILL)
    value = {"x": np.arange(100_000, dtype=np.float64)}
    FeatureCache(root, "ns", {"p": 1}).get_or_build([scan], lambda: value)
    print("not killed")
""")


@pytest.mark.parametrize("when", ["mid-write", "before-rename"])
def test_process_killed_while_writing_leaves_no_entry(tmp_path, scan, when):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "c"), str(scan), when],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == -signal.SIGKILL, out.stdout + out.stderr
    leftovers = list((tmp_path / "c").rglob("*"))
    assert [p for p in leftovers if p.suffix == ".tmp"], "the child did not get as far as writing"
    assert not [p for p in leftovers if p.suffix == ".entry"], "a half-written entry became visible"
    cache = FeatureCache(tmp_path / "c", "ns", {"p": 1})
    assert cache.load(cache.key([scan])) is None
    b = Builder({"x": np.arange(100_000, dtype=np.float64)})
    assert _same(cache.get_or_build([scan], b), b.value) and b.calls == 1


def test_bad_arguments_raise_threefold_errors(tmp_path, scan):
    with pytest.raises(ConfigError, match="namespace"):
        FeatureCache(tmp_path, "../up", {})
    with pytest.raises(ConfigError, match="JSON"):
        FeatureCache(tmp_path, "ns", {"f": object()})
    with pytest.raises(ConfigError, match="JSON"):
        FeatureCache(tmp_path, "ns", {"f": float("nan")})
    with pytest.raises(MissingFileError, match="missing.bin"):
        FeatureCache(tmp_path, "ns", {}).key([tmp_path / "missing.bin"])
    with pytest.raises(DataFormatError, match="object arrays"):
        FeatureCache(tmp_path, "ns", {}).get_or_build([scan], lambda: {"o": np.array([{}, 1], dtype=object)})


def test_a_planted_pickle_in_an_entry_is_not_executed(tmp_path, scan):
    """An attacker who can write the cache folder still cannot make a load run code: npz objects
    need allow_pickle, which the cache never passes."""
    import hashlib
    import io

    cache = FeatureCache(tmp_path / "c", "ns", {})
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    np.savez(buf, x=np.array([Evil(str(marker))], dtype=object), allow_pickle=True)
    payload = buf.getvalue()
    entry = cache.path(cache.key([scan]))
    entry.parent.mkdir(parents=True)
    entry.write_bytes(MAGIC + hashlib.sha256(payload).digest() + payload)
    with pytest.warns(RuntimeWarning, match="rebuilding"):
        cache.get_or_build([scan], lambda: {"x": np.zeros(2)})
    assert not marker.exists()


class Evil:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))
