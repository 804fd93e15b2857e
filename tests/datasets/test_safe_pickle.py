"""The restricted unpickler refuses code-running globals before they run, and reads Planetoid files."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import scipy.sparse as sp

from threefold.datasets.errors import DataFormatError, MissingFileError, UnsafePickleError
from threefold.datasets.safe_pickle import PLANETOID_GLOBALS, safe_load_pickle

# the plain-pickle references below import the deprecated scipy.sparse.csr alias
pytestmark = pytest.mark.filterwarnings("ignore:Please import `csr_matrix`:DeprecationWarning")


class _SystemPayload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _ExecPayload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import builtins

        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("payload", [_SystemPayload, _ExecPayload])
@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_reduce_payload_is_refused_unexecuted(tmp_path, payload, protocol):
    marker = tmp_path / "marker"
    bad = tmp_path / "ind.evil.x"
    bad.write_bytes(pickle.dumps(payload(marker), protocol=protocol))
    with pytest.raises(UnsafePickleError) as err:
        safe_load_pickle(bad)
    assert not marker.exists()
    msg = str(err.value)
    assert str(bad) in msg
    assert ("system" in msg) if payload is _SystemPayload else ("builtins.exec" in msg)


def test_handwritten_python2_global_is_refused(tmp_path):
    # Protocol-0 stream as a Python-2 attacker would write it: GLOBAL "os system", then REDUCE.
    marker = tmp_path / "marker2"
    bad = tmp_path / "graph.pkl"
    bad.write_bytes(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    with pytest.raises(UnsafePickleError, match=r"os\.system"):
        safe_load_pickle(bad)
    assert not marker.exists()


def test_nested_payload_inside_allowed_container_is_refused(tmp_path):
    marker = tmp_path / "marker3"
    bad = tmp_path / "nested.pkl"
    bad.write_bytes(pickle.dumps({"x": np.zeros(3), "y": [1, _SystemPayload(marker)]}, protocol=2))
    with pytest.raises(UnsafePickleError):
        safe_load_pickle(bad)
    assert not marker.exists()


def test_allowed_content_round_trips(tmp_path):
    obj = {
        "x": sp.csr_matrix(np.array([[0, 1.5], [2, 0]], dtype=np.float32)),
        "y": np.eye(3, dtype=np.int32),
        "graph": {0: [1, 2], 1: [0]},
    }
    path = tmp_path / "ok.pkl"
    # protocol 4: Python 3 writes bytes under protocol 2 through _codecs.encode, which is not listed
    path.write_bytes(pickle.dumps(obj, protocol=4))
    out = safe_load_pickle(path)
    np.testing.assert_array_equal(out["x"].toarray(), obj["x"].toarray())
    np.testing.assert_array_equal(out["y"], obj["y"])
    assert out["graph"] == obj["graph"]


def test_narrow_allow_list_refuses_numpy(tmp_path):
    path = tmp_path / "arr.pkl"
    path.write_bytes(pickle.dumps(np.arange(4), protocol=2))
    with pytest.raises(UnsafePickleError, match="numpy"):
        safe_load_pickle(path, allowed={("builtins", "list")})


def test_missing_and_truncated(tmp_path):
    with pytest.raises(MissingFileError, match="nope.pkl"):
        safe_load_pickle(tmp_path / "nope.pkl")
    path = tmp_path / "cut.pkl"
    path.write_bytes(pickle.dumps(list(range(100)), protocol=2)[:20])
    with pytest.raises(DataFormatError, match="cut.pkl"):
        safe_load_pickle(path)


@pytest.mark.parametrize("key", ["x", "tx", "ally", "graph"])
def test_real_planetoid_pickles_match_plain_pickle(test_data, key):
    path = test_data / "planetoid" / "raw" / f"ind.cora.{key}"
    with path.open("rb") as f:
        reference = pickle.load(f, encoding="latin1")  # trusted, read-only test data
    out = safe_load_pickle(path, PLANETOID_GLOBALS)
    if key == "graph":
        assert dict(out) == dict(reference)
    elif sp.issparse(reference):
        assert (out != reference).nnz == 0 and out.shape == reference.shape
    else:
        np.testing.assert_array_equal(out, reference)
