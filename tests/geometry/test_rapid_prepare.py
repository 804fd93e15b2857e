"""``threefold prepare semantickitti``: the per-scan RAPiD caches on the synthetic sample — parallel,
resumable, keyed by file and parameters, equal to computing the features directly, and read by the
``semantickitti-rapidseg`` pipeline without recomputation."""

from __future__ import annotations

import numpy as np
import pytest

from threefold.datasets.semantickitti import SemanticKITTI, lidar_rings, read_labels, read_scan
from threefold.geometry.rapid.features import rapid_features
from threefold.geometry.rapid.prepare import c_rapid_rows, prepare_rapid_features, r_rapid_rows

pytest.importorskip("open3d")


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    from threefold.datasets.lidar_synthetic import generate_lidar_sample

    root = tmp_path_factory.mktemp("kitti")
    generate_lidar_sample(root, sequences=("00", "08"), scans_per_sequence=2, azimuth_step_deg=2.0)
    # a test-split sequence without labels
    (root / "sequences/11/velodyne").mkdir(parents=True)
    # (a scan of sequence 00 in reverse point order: other bytes, as the caches are keyed by content)
    scan = np.fromfile(root / "sequences/00/velodyne/000001.bin", dtype="<f4").reshape(-1, 4)
    scan[::-1].tofile(root / "sequences/11/velodyne/000000.bin")
    return root


def test_prepare_parallel_resumable_and_correct(sample, tmp_path):
    out = tmp_path / "cache"
    first = prepare_rapid_features(sample, out, workers=2, progress=False)
    # 5 scans: 5 R-RAPiD entries and 4 C-RAPiD entries (sequence 11 has no labels)
    assert (first["scans"], first["computed"], first["skipped"]) == (5, 9, 0)
    assert len(list((out / "rapid-r").rglob("*.entry"))) == 5 and len(list((out / "rapid-c").rglob("*.entry"))) == 4
    again = prepare_rapid_features(sample, out, workers=2, progress=False)
    assert (again["computed"], again["skipped"]) == (0, 9)

    bin_path = sample / "sequences/08/velodyne/000001.bin"
    label_path = SemanticKITTI.label_path(bin_path)
    scan = read_scan(bin_path)
    np.testing.assert_array_equal(r_rapid_rows(out, bin_path),
                                  rapid_features(scan["coord"], scan["remission"], lidar_rings(scan["coord"])))
    np.testing.assert_array_equal(c_rapid_rows(out, bin_path, label_path),
                                  rapid_features(scan["coord"], scan["remission"],
                                                 read_labels(label_path, len(scan["coord"]))))

    # an edited label file is a new key: exactly that scan's C-RAPiD entry is recomputed
    raw = np.fromfile(label_path, dtype="<u4")
    raw[:10] = 40
    raw.tofile(label_path)
    assert prepare_rapid_features(sample, out, workers=1, progress=False)["computed"] == 1
    # other parameters are other entries
    assert prepare_rapid_features(sample, out, workers=1, progress=False, sequences=["08"], variants=["r"],
                                  k=(8, 6, 3))["computed"] == 2


def test_pipeline_reads_prepared_rows(sample, tmp_path, monkeypatch):
    rapidseg = pytest.importorskip("threefold.pipelines.rapidseg")
    out = tmp_path / "cache"
    prepare_rapid_features(sample, out, workers=1, progress=False, sequences=["00"])

    def no_compute(*args, **kwargs):
        raise AssertionError("the pipeline recomputed RAPiD rows that prepare had cached")

    monkeypatch.setattr(rapidseg, "compute_rapid", no_compute)
    rows = rapidseg.RapidRows(rapidseg.FeatureConfig(), out)
    ds = SemanticKITTI(sample, ["00"])
    for i in range(len(ds)):
        item = ds[i]
        assert rows.r_rows(item).shape == (item["coord"].shape[0], 10)
        assert rows.c_rows(item, ds.label_path(ds.scans[i][2])).shape == (item["coord"].shape[0], 10)


def test_cli_prepare(sample, tmp_path):
    from threefold.pipelines.cli import main

    assert main(["prepare", "semantickitti", "--data", str(sample), "--out", str(tmp_path / "c")]) == 0
    assert len(list((tmp_path / "c").rglob("*.entry"))) == 9
