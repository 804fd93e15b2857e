"""IM-NET / BSP-Net HDF5 reader and writer. Fixtures are written here with h5py from the published key
layout (IM-NET ``point_sampling/2_gather_256vox_16_32_64.py``), not by the package's writer."""

from __future__ import annotations

import numpy as np
import pytest

from threefold.datasets.errors import DataFormatError, MissingFileError
from threefold.datasets.imnet_hdf5 import IMNetShapes, points_to_coords, read_imnet_hdf5, write_imnet_hdf5
from threefold.datasets.registry import get_dataset

h5py = pytest.importorskip("h5py")

COUNTS = {16: 4096, 32: 4096, 64: 16384}


def spec_arrays(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    data = {"voxels": (rng.random((n, 64, 64, 64, 1)) < 0.2).astype(np.uint8)}
    for r, k in COUNTS.items():
        data[f"points_{r}"] = rng.integers(0, 256, size=(n, k, 3), dtype=np.uint8)
        data[f"values_{r}"] = rng.integers(0, 2, size=(n, k, 1), dtype=np.uint8)
    return data


def write_spec_file(path, data, extra_keys=()):
    with h5py.File(path, "w") as f:
        # Same calls as the IM-NET script: fixed-shape uint8 datasets, filled per key.
        for key, arr in data.items():
            f.create_dataset(key, list(arr.shape), np.uint8)
            f[key][...] = arr
        for key in extra_keys:
            f.create_dataset(key, data=np.zeros((len(data["voxels"]), 2, 2), np.uint8))


def test_read_spec_fixture(tmp_path):
    data = spec_arrays(3)
    path = tmp_path / "all_vox256_img_train.hdf5"
    write_spec_file(path, data, extra_keys=("pixels",))
    got = read_imnet_hdf5(path)
    assert set(got) == set(data)
    for key in data:
        np.testing.assert_array_equal(got[key], data[key])
        assert got[key].dtype == np.uint8


def test_coordinate_conversion_matches_published_formula():
    p = np.array([[0, 127, 255]], dtype=np.uint8)
    np.testing.assert_allclose(points_to_coords(p), [[0.5 / 256 - 0.5, 127.5 / 256 - 0.5, 255.5 / 256 - 0.5]])
    assert points_to_coords(p).dtype == np.float32


def test_dataset_samples_and_registry(tmp_path):
    data = spec_arrays(2, seed=1)
    write_spec_file(tmp_path / "toy_train.hdf5", data)
    (tmp_path / "toy_train.txt").write_text("a\nb\n")
    ds = IMNetShapes(tmp_path, split="train", resolution=32)
    assert len(ds) == 2
    s = ds[1]
    assert s["name"] == "b" and s["voxels"].shape == (1, 64, 64, 64) and s["voxels"].dtype == np.float32
    np.testing.assert_array_equal(s["voxels"][0], data["voxels"][1, ..., 0])
    np.testing.assert_allclose(s["points"], (data["points_32"][1].astype(np.float64) + 0.5) / 256 - 0.5, atol=1e-7)
    np.testing.assert_array_equal(s["values"], data["values_32"][1])
    assert get_dataset("imnet-hdf5").cls is IMNetShapes


def test_writer_round_trip_and_names(tmp_path):
    data = spec_arrays(2, seed=2)
    path = tmp_path / "out_test.hdf5"
    write_imnet_hdf5(path, data, names=["x", "y"])
    with h5py.File(path, "r") as f:  # read back with plain h5py, key by key
        for key, arr in data.items():
            assert f[key].dtype == np.uint8
            np.testing.assert_array_equal(f[key][()], arr)
    assert (tmp_path / "out_test.txt").read_text() == "x\ny\n"
    got = read_imnet_hdf5(path)
    for key in data:
        np.testing.assert_array_equal(got[key], data[key])


def test_voxels_without_channel_axis_accepted(tmp_path):
    data = spec_arrays(1, seed=3)
    data["voxels"] = data["voxels"][..., 0]
    write_spec_file(tmp_path / "a.hdf5", data)
    assert read_imnet_hdf5(tmp_path / "a.hdf5")["voxels"].shape == (1, 64, 64, 64, 1)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(voxels=np.zeros((1, 32, 32, 32, 1), np.uint8)), "voxels has shape"),
        (lambda d: d.update(points_16=d["points_16"][:, :, :2]), "points_16 has shape"),
        (lambda d: d.update(values_64=d["values_64"][:, :100]), "values_64 has shape"),
        (lambda d: d.update(values_32=d["values_32"] * 3), "values_32 holds values up to 3"),
        (lambda d: d.pop("points_32"), "missing key"),
    ],
)
def test_bad_files_are_reported(tmp_path, mutate, message):
    data = spec_arrays(1, seed=4)
    mutate(data)
    path = tmp_path / "bad.hdf5"
    write_spec_file(path, data)
    with pytest.raises(DataFormatError, match=message) as err:
        read_imnet_hdf5(path)
    assert "bad.hdf5" in str(err.value)


def test_float_points_refused(tmp_path):
    data = spec_arrays(1, seed=5)
    path = tmp_path / "float.hdf5"
    with h5py.File(path, "w") as f:
        for key, arr in data.items():
            f.create_dataset(key, data=points_to_coords(arr) if key == "points_16" else arr)
    with pytest.raises(DataFormatError, match="points_16 has dtype float32"):
        read_imnet_hdf5(path)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(MissingFileError):
        read_imnet_hdf5(tmp_path / "nope.hdf5")
    (tmp_path / "junk.hdf5").write_bytes(b"not hdf5")
    with pytest.raises(DataFormatError, match="not a readable HDF5"):
        read_imnet_hdf5(tmp_path / "junk.hdf5")
    with pytest.raises(MissingFileError, match="exactly one"):
        IMNetShapes(tmp_path, split="train")


def test_writer_refuses_wrong_point_count(tmp_path):
    data = spec_arrays(1, seed=6)
    data["points_64"], data["values_64"] = data["points_64"][:, :4096], data["values_64"][:, :4096]
    with pytest.raises(DataFormatError, match="points_64 has 4096 points"):
        write_imnet_hdf5(tmp_path / "w.hdf5", data)


@pytest.mark.parametrize("chunked", [True, False])
def test_declared_but_unwritten_shapes_are_refused(tmp_path, chunked):
    """Every key consistently declares 3 shapes but only the first is stored: the header lies about the
    size (reading would return zeros), so the reader refuses it from the metadata."""
    data = spec_arrays(1)
    with h5py.File(tmp_path / "a.hdf5", "w") as f:
        for key, arr in data.items():
            shape = (3, *arr.shape[1:])
            if chunked:
                ds = f.create_dataset(key, shape=shape, dtype=np.uint8, chunks=(1, *arr.shape[1:]))
                ds[0] = arr[0]
            else:  # contiguous and never written: no storage allocated
                f.create_dataset(key, shape=shape, dtype=np.uint8)
    what = "1 of 3 chunks" if chunked else f"0 of {3 * 64**3} bytes"
    with pytest.raises(DataFormatError, match=f"voxels declares shape .* stores only {what}"):
        read_imnet_hdf5(tmp_path / "a.hdf5")
