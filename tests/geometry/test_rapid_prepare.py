"""``threefold prepare semantickitti``: the per-scan RAPiD cache on the synthetic sample — parallel,
resumable, keyed by file content and parameters, equal to computing the features directly."""

from __future__ import annotations

import numpy as np
import pytest

from threefold.datasets.semantickitti import SemanticKITTI, lidar_rings, read_labels, read_scan
from threefold.geometry.rapid.features import rapid_features
from threefold.geometry.rapid.prepare import cached_scan_features, prepare_rapid_features

pytest.importorskip("open3d")


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    from threefold.datasets.lidar_synthetic import generate_lidar_sample

    root = tmp_path_factory.mktemp("kitti")
    generate_lidar_sample(root, sequences=("00", "08"), scans_per_sequence=2, azimuth_step_deg=2.0)
    # a test-split sequence without labels
    (root / "sequences/11/velodyne").mkdir(parents=True)
    (root / "sequences/11/velodyne/000000.bin").write_bytes((root / "sequences/00/velodyne/000001.bin").read_bytes())
    return root


def test_prepare_parallel_resumable_and_correct(sample, tmp_path):
    out = tmp_path / "cache"
    first = prepare_rapid_features(sample, out, workers=2, progress=False)
    assert (first["scans"], first["computed"], first["skipped"]) == (5, 5, 0)
    assert len(list(first["cache"].rglob("*.entry"))) == 5
    again = prepare_rapid_features(sample, out, workers=2, progress=False)
    assert (again["computed"], again["skipped"]) == (0, 5)

    bin_path = sample / "sequences/08/velodyne/000001.bin"
    label_path = SemanticKITTI.label_path(bin_path)
    entry = cached_scan_features(out, bin_path, label_path)
    scan = read_scan(bin_path)
    np.testing.assert_array_equal(entry["r_rapid"], rapid_features(scan["coord"], scan["remission"],
                                                                   lidar_rings(scan["coord"])))
    np.testing.assert_array_equal(entry["c_rapid"], rapid_features(scan["coord"], scan["remission"],
                                                                   read_labels(label_path, len(scan["coord"]))))
    assert "c_rapid" not in cached_scan_features(out, sample / "sequences/11/velodyne/000000.bin")

    # a changed label file is a new key: exactly that scan is recomputed
    raw = np.fromfile(label_path, dtype="<u4")
    raw[:10] = 40
    raw.tofile(label_path)
    assert prepare_rapid_features(sample, out, workers=1, progress=False)["computed"] == 1
    # other parameters are another cache
    assert prepare_rapid_features(sample, out, workers=1, progress=False, sequences=["08"],
                                  k=(8, 6, 3))["computed"] == 2


def test_cli_prepare(sample, tmp_path, capsys):
    from threefold.pipelines.cli import main

    assert main(["prepare", "semantickitti", "--data", str(sample), "--out", str(tmp_path / "c")]) == 0
    assert len(list((tmp_path / "c").rglob("*.entry"))) == 5
