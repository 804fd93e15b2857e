"""Memory guard (issue #10 §2): a file whose header declares an enormous size is refused with a
threefold error *before* the reader allocates for it.

Each case forges a small file (at most a few hundred kB) whose header promises far more data than
it holds; the reader runs under ``tracemalloc`` (NumPy reports its buffers to it, including the
lazily zeroed ones of ``np.zeros``/``calloc``, so a refused-too-late allocation shows even though the
pages were never touched). Contract: a :class:`ThreefoldError`, and a traced peak under ``LIMIT``.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tracemalloc
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from threefold.datasets.errors import ThreefoldError

LIMIT = 64 * 2**20  # bytes; every forged file below is < 1 MB, its declared payload > 1 GB


def peak_while_refusing(read: Callable[[], object]) -> int:
    """Traced peak bytes during ``read()``, which must raise a threefold error."""
    tracemalloc.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(ThreefoldError):
                read()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _npy(tmp: Path) -> Callable[[], object]:
    from threefold.datasets.pointclouds import read_npy

    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "<f4", "fortran_order": False, "shape": (10**9, 4)})
    (tmp / "a.npy").write_bytes(head.getvalue() + np.zeros((8, 4), "<f4").tobytes())
    return lambda: read_npy(tmp / "a.npy")


def _ply(tmp: Path) -> Callable[[], object]:
    from threefold.datasets.pointclouds import read_ply

    head = "ply\nformat binary_little_endian 1.0\nelement vertex 1000000000\nproperty float x\nproperty float y\nproperty float z\nend_header\n"
    (tmp / "a.ply").write_bytes(head.encode() + np.zeros((8, 3), "<f4").tobytes())
    return lambda: read_ply(tmp / "a.ply")


def _pcd(tmp: Path) -> Callable[[], object]:
    from threefold.datasets.pointclouds import read_pcd

    head = ("VERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\nWIDTH 1000000000\nHEIGHT 1\n"
            "VIEWPOINT 0 0 0 1 0 0 0\nPOINTS 1000000000\nDATA binary\n")
    (tmp / "a.pcd").write_bytes(head.encode() + np.zeros((8, 3), "<f4").tobytes())
    return lambda: read_pcd(tmp / "a.pcd")


def _nifti1(dims: tuple[int, ...]) -> bytes:
    """A NIfTI-1 single-file header for float32 voxels of shape ``dims``, identity sform, and 1000
    zero voxels: far fewer than declared."""
    # NIfTI-1 header (348 bytes): sizeof_hdr, dim[8] int16 at 40, datatype int16 at 70 (16 = float32),
    # bitpix at 72, pixdim[8] float32 at 76, vox_offset float32 at 108, magic "n+1\0" at 344
    hdr = bytearray(348)
    struct.pack_into("<i", hdr, 0, 348)
    struct.pack_into("<8h", hdr, 40, len(dims), *dims, *(1,) * (7 - len(dims)))
    struct.pack_into("<hh", hdr, 70, 16, 32)
    struct.pack_into("<8f", hdr, 76, 1, 1, 1, 1, 1, 1, 1, 1)
    struct.pack_into("<f", hdr, 108, 352.0)
    struct.pack_into("<h", hdr, 254, 1)  # sform_code: scanner
    struct.pack_into("<4f", hdr, 280, 1, 0, 0, 0)
    struct.pack_into("<4f", hdr, 296, 0, 1, 0, 0)
    struct.pack_into("<4f", hdr, 312, 0, 0, 1, 0)
    hdr[344:348] = b"n+1\0"
    return bytes(hdr) + b"\0" * 4 + np.zeros(1000, "<f4").tobytes()


def _nifti(tmp: Path) -> Callable[[], object]:
    pytest.importorskip("nibabel")
    from threefold.datasets.volumes import read_nifti

    (tmp / "a.nii").write_bytes(_nifti1((2000, 2000, 2000)))
    return lambda: read_nifti(tmp / "a.nii")


def _dwi(name: str, dims: tuple[int, int, int, int]) -> Callable[[Path], Callable[[], object]]:
    """A 4-D DWI with two b0 volumes (FSL bvals "0 5"): ``read_mean_b0`` reads only those, but its
    float64 accumulator is sized by the header's first three dimensions."""
    def forge(tmp: Path) -> Callable[[], object]:
        pytest.importorskip("nibabel")
        from threefold.datasets.hcp import read_mean_b0

        data = _nifti1(dims)
        (tmp / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
        (tmp / "bvals").write_text("0 5\n")
        return lambda: read_mean_b0(tmp / name, tmp / "bvals")
    return forge


def _tu(tmp: Path) -> Callable[[], object]:
    from threefold.datasets.tu import load_tu

    files = {"A": "1, 2\n2, 1\n", "graph_indicator": "1\n1\n", "graph_labels": "0\n", "node_labels": "0\n8000\n"}
    for k, v in files.items():
        (tmp / f"G_{k}.txt").write_text(v)
    return lambda: load_tu(tmp, "G")


def _planetoid_files(tmp: Path, x_shape: tuple[int, int] | None = None, max_test_id: int | None = None) -> None:
    """Cora-named raw files (3 train + 500 val nodes, 2 test nodes); optionally a forged csr shape
    or test id. Pickled with protocol 4 (the allow-list unpickler reads any protocol)."""
    import scipy.sparse as sp

    n_all = 503
    feats = sp.csr_matrix(np.eye(n_all, 4, dtype=np.float32))
    x = sp.csr_matrix(np.eye(3, 4, dtype=np.float32))
    if x_shape is not None:
        x._shape = x_shape
    objs = {"x": x, "y": np.eye(3, dtype=np.int32), "allx": feats, "ally": np.eye(n_all, 3, dtype=np.int32),
            "tx": sp.csr_matrix(np.ones((2, 4), np.float32)), "ty": np.eye(2, 3, dtype=np.int32),
            "graph": {i: [(i + 1) % 505] for i in range(505)}}
    for k, v in objs.items():
        (tmp / f"ind.cora.{k}").write_bytes(pickle.dumps(v, protocol=4))
    (tmp / "ind.cora.test.index").write_text(f"503\n{max_test_id or 504}\n")


def _planetoid_test_index(tmp: Path) -> Callable[[], object]:
    from threefold.datasets.planetoid import load_planetoid

    _planetoid_files(tmp, max_test_id=5_000_000)  # one line of text declares 5 M nodes
    return lambda: load_planetoid(tmp, "cora")


def _planetoid_csr_shape(tmp: Path) -> Callable[[], object]:
    from threefold.datasets.planetoid import load_planetoid

    _planetoid_files(tmp, x_shape=(3, 400_000_000))  # a 3 x 4 matrix that claims 400 M columns
    return lambda: load_planetoid(tmp, "cora")


def _imnet(tmp: Path) -> Callable[[], object]:
    h5py = pytest.importorskip("h5py")
    from threefold.datasets.imnet_hdf5 import read_imnet_hdf5

    with h5py.File(tmp / "a.hdf5", "w") as f:  # 3000 shapes declared, no chunk written: 100 kB on disk
        f.create_dataset("voxels", shape=(3000, 64, 64, 64, 1), dtype=np.uint8, chunks=(1, 64, 64, 64, 1))
        for r, n in ((16, 4096), (32, 4096), (64, 16384)):
            f.create_dataset(f"points_{r}", data=np.zeros((1, n, 3), np.uint8))
            f.create_dataset(f"values_{r}", data=np.zeros((1, n, 1), np.uint8))
    return lambda: read_imnet_hdf5(tmp / "a.hdf5")


def _scanobjectnn(tmp: Path) -> Callable[[], object]:
    h5py = pytest.importorskip("h5py")
    from threefold.datasets.objects import ScanObjectNN

    (tmp / "main_split").mkdir()
    with h5py.File(tmp / "main_split" / "test_objectdataset_augmentedrot_scale75.h5", "w") as f:
        f.create_dataset("data", shape=(10**5, 2048, 3), dtype="f4", chunks=(1, 2048, 3))  # 2.4 GB declared
        f["label"] = np.zeros(10**5, np.int64)
    return lambda: ScanObjectNN(tmp, "test", "pb_t50_rs")


def _shapenet_npy(tmp: Path) -> Callable[[], object]:
    from threefold.datasets.objects import read_shapenet_npy

    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "<f4", "fortran_order": False, "shape": (10**9, 3)})
    (tmp / "02691156-a.npy").write_bytes(head.getvalue() + np.zeros((8, 3), "<f4").tobytes())
    return lambda: read_shapenet_npy(tmp / "02691156-a.npy")


@pytest.mark.parametrize("forge", [
    pytest.param(_scanobjectnn, id="scanobjectnn-hdf5-shape"),
    pytest.param(_shapenet_npy, id="shapenet-npy-shape"),
    pytest.param(_npy, id="npy-shape"),
    pytest.param(_ply, id="ply-vertex-count"),
    pytest.param(_pcd, id="pcd-points"),
    pytest.param(_nifti, id="nifti-dims"),
    # 27 GB a volume declared: over read_mean_b0's max_volume_bytes
    pytest.param(_dwi("dwi.nii.gz", (1500, 1500, 1500, 2)), id="hcp-dwi-volume-dims"),
    # 512 MB a volume (under the cap) in a 4 kB .nii: refused from the file size
    pytest.param(_dwi("dwi.nii", (400, 400, 400, 2)), id="hcp-dwi-truncated-nii"),
    pytest.param(_tu, id="tu-node-label"),
    pytest.param(_planetoid_test_index, id="planetoid-test-index"),
    pytest.param(_planetoid_csr_shape, id="planetoid-csr-shape"),
    pytest.param(_imnet, id="imnet-hdf5-shape"),
])
def test_enormous_declared_size_is_refused_before_allocating(tmp_path, forge):
    read = forge(tmp_path)
    peak = peak_while_refusing(read)
    assert peak < LIMIT, f"peak {peak / 2**20:.0f} MiB traced before the refusal"
