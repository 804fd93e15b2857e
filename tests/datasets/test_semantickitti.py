"""SemanticKITTI reader, label mapping, prediction writer, dataset and the synthetic LiDAR sample.

Format fixtures are written here from the published format (float32 x, y, z, remission records;
uint32 labels with the semantic id in the low 16 bits), never with the package's own writer.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from threefold.datasets.errors import ConfigError, DataFormatError, MissingFileError
from threefold.datasets.semantickitti import (
    SEMANTICKITTI_CLASSES,
    SPLITS,
    SemanticKITTI,
    lidar_rings,
    read_labels,
    read_scan,
    semantickitti_config,
    write_predictions,
)

DATA = Path(os.environ.get("THREEFOLD_TEST_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
KITTI = DATA / "semantickitti"
needs_kitti = pytest.mark.skipif(not (KITTI / "semantic-kitti.yaml").is_file(),
                                 reason=f"SemanticKITTI test files absent under {KITTI}")

# The official mapping written out by hand (semantic-kitti.yaml, learning_map then minus one):
# raw id -> threefold class (0..18) or -1.
HAND_MAP = {0: -1, 1: -1, 10: 0, 11: 1, 13: 4, 15: 2, 16: 4, 18: 3, 20: 4, 30: 5, 31: 6, 32: 7, 40: 8, 44: 9,
            48: 10, 49: 11, 50: 12, 51: 13, 52: -1, 60: 8, 70: 14, 71: 15, 72: 16, 80: 17, 81: 18, 99: -1,
            252: 0, 253: 6, 254: 5, 255: 7, 256: 4, 257: 4, 258: 3, 259: 4}


def _write_bin(path: Path, records: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.asarray(records, dtype="<f4").tofile(path)
    return path


def _write_label(path: Path, semantic: np.ndarray, instance: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    inst = np.zeros_like(semantic) if instance is None else instance
    (np.asarray(semantic, dtype=np.uint32) | (np.asarray(inst, dtype=np.uint32) << 16)).astype("<u4").tofile(path)
    return path


# ------------------------------------------------------------------------------------- label config
def test_class_names_in_learning_order():
    assert SEMANTICKITTI_CLASSES == (
        "car", "bicycle", "motorcycle", "truck", "other-vehicle", "person", "bicyclist", "motorcyclist", "road",
        "parking", "sidewalk", "other-ground", "building", "fence", "vegetation", "trunk", "terrain", "pole",
        "traffic-sign")
    assert SPLITS["train"] == ["00", "01", "02", "03", "04", "05", "06", "07", "09", "10"]
    assert SPLITS["val"] == ["08"] and SPLITS["test"] == [str(s) for s in range(11, 22)]


@needs_kitti
def test_shipped_config_equals_official_yaml():
    import yaml

    official = yaml.safe_load((KITTI / "semantic-kitti.yaml").read_text())
    shipped = semantickitti_config()
    for key in ("labels", "color_map", "content", "learning_map", "learning_map_inv", "learning_ignore", "split"):
        assert shipped[key] == official[key], key
    assert len(shipped["labels"]) == 34
    names = tuple(official["labels"][official["learning_map_inv"][c]] for c in range(1, 20))
    assert names == SEMANTICKITTI_CLASSES
    # the hand table above agrees with the official learning map (minus one, 0 -> -1)
    assert {r: official["learning_map"][r] - 1 for r in official["learning_map"]} == HAND_MAP


# ------------------------------------------------------------------------------------- reader
def test_read_scan_and_labels_from_spec(tmp_path):
    rng = np.random.default_rng(0)
    rec = rng.normal(scale=20, size=(len(HAND_MAP), 4)).astype(np.float32)
    rec[:, 3] = rng.uniform(0, 1, len(rec))
    b = _write_bin(tmp_path / "sequences/00/velodyne/000000.bin", rec)
    raw = np.array(sorted(HAND_MAP), dtype=np.uint32)
    lab = _write_label(tmp_path / "sequences/00/labels/000000.label", raw, np.arange(len(raw)) * 7)
    scan = read_scan(b)
    assert scan["coord"].dtype == np.float32 and scan["coord"].shape == (len(rec), 3)
    np.testing.assert_array_equal(scan["coord"], rec[:, :3])
    np.testing.assert_array_equal(scan["remission"], rec[:, 3])
    got = read_labels(lab, len(rec))
    assert got.dtype == np.int64
    assert got.tolist() == [HAND_MAP[int(r)] for r in raw]


def test_bad_inputs_name_the_file(tmp_path):
    b = tmp_path / "bad.bin"
    b.write_bytes(b"\0" * 20)
    with pytest.raises(DataFormatError, match="bad.bin.*multiple of 16"):
        read_scan(b)
    rec = np.ones((5, 4), np.float32)
    rec[3, 1] = np.nan
    with pytest.raises(DataFormatError, match="nan.bin.*NaN"):
        read_scan(_write_bin(tmp_path / "nan.bin", rec))
    lab = _write_label(tmp_path / "short.label", np.array([10, 40, 40], np.uint32))
    with pytest.raises(DataFormatError, match="short.label.*5 points"):
        read_labels(lab, 5)
    unknown = _write_label(tmp_path / "unknown.label", np.array([10, 7, 40, 300], np.uint32))
    with pytest.raises(DataFormatError, match=r"unknown.label.*\[7, 300\]"):
        read_labels(unknown, 4)
    with pytest.raises(MissingFileError):
        read_scan(tmp_path / "absent.bin")


@needs_kitti
def test_real_scans():
    s99 = read_scan(KITTI / "sequences/99/velodyne/000000.bin")
    s00 = read_scan(KITTI / "sequences/00/velodyne/000000.bin")
    assert s99["coord"].shape == (123389, 3) and s00["coord"].shape == (124668, 3)
    lab = read_labels(KITTI / "sequences/99/labels/000000.label", 123389)
    # counts from PROVENANCE.md: raw 0:4458, 1:5, 52:809, 99:1652 are ignored; car = 10 + 252 = 544 + 990
    assert int((lab == -1).sum()) == 4458 + 5 + 809 + 1652
    assert int((lab == 0).sum()) == 544 + 990
    assert int((lab == SEMANTICKITTI_CLASSES.index("vegetation")).sum()) == 24514


# ------------------------------------------------------------------------------------- writer
def test_write_predictions_submission_format(tmp_path):
    classes = np.array([0, 8, 18, -1, 12, 4], dtype=np.int64)
    path = write_predictions(tmp_path, "11", "42", classes)
    assert path == tmp_path / "sequences/11/predictions/000042.label"
    raw = np.fromfile(path, dtype="<u4")
    # learning_map_inv, by hand: car 10, road 40, traffic-sign 81, ignore -> 0 unlabeled, building 50, other-vehicle 20
    assert raw.tolist() == [10, 40, 81, 0, 50, 20]
    write_predictions(tmp_path, "11", "000042", torch.tensor([1, 2]))
    assert np.fromfile(path, dtype="<u4").tolist() == [11, 15]
    with pytest.raises(DataFormatError, match="outside"):
        write_predictions(tmp_path, "11", "000043", np.array([19]))
    with pytest.raises(ConfigError):
        write_predictions(tmp_path, "../x", "000043", np.array([1]))


@needs_kitti
def test_label_round_trip_on_real_file(tmp_path):
    import yaml

    official = yaml.safe_load((KITTI / "semantic-kitti.yaml").read_text())
    raw = np.fromfile(KITTI / "sequences/99/labels/000000.label", dtype="<u4") & 0xFFFF
    lab = read_labels(KITTI / "sequences/99/labels/000000.label", raw.size)
    path = write_predictions(tmp_path, "99", "0", lab)
    written = np.fromfile(path, dtype="<u4")
    lm, inv = official["learning_map"], official["learning_map_inv"]
    expected = np.array([inv[lm[int(r)]] for r in raw], dtype=np.uint32)
    np.testing.assert_array_equal(written, expected)
    # learning_map -> learning_map_inv -> learning_map is the identity on learning ids
    np.testing.assert_array_equal(np.array([lm[int(r)] for r in written]), np.array([lm[int(r)] for r in raw]))
    np.testing.assert_array_equal(read_labels(path, raw.size), lab)


# ------------------------------------------------------------------------------------- rings
def test_lidar_rings_uniform_beams_and_yaw_invariance():
    elev = np.deg2rad(np.linspace(2.0, -24.8, 64))
    rng = np.random.default_rng(1)
    beam = rng.integers(0, 64, 500)
    az = rng.uniform(0, 2 * np.pi, 500)
    r = rng.uniform(3, 80, 500)
    # perturb elevation by up to 40 % of the half beam spacing: still the nearest beam
    e = elev[beam] + rng.uniform(-0.4, 0.4, 500) * np.deg2rad(26.8 / 63) / 2
    xyz = np.stack([r * np.cos(e) * np.cos(az), r * np.cos(e) * np.sin(az), r * np.sin(e)], 1).astype(np.float32)
    np.testing.assert_array_equal(lidar_rings(xyz), beam)
    t = lidar_rings(torch.from_numpy(xyz))
    assert t.dtype == torch.int64 and t.tolist() == beam.tolist()
    yaw = 0.7
    rot = np.array([[np.cos(yaw), -np.sin(yaw), 0], [np.sin(yaw), np.cos(yaw), 0], [0, 0, 1]])
    np.testing.assert_array_equal(lidar_rings((xyz @ rot.T).astype(np.float32)), beam)


# ------------------------------------------------------------------------------------- dataset
def test_dataset_splits_labels_and_rings(tmp_path):
    rng = np.random.default_rng(2)
    for seq, n in (("00", 30), ("01", 20), ("08", 25), ("11", 10)):
        rec = rng.normal(scale=10, size=(n, 4))
        _write_bin(tmp_path / f"sequences/{seq}/velodyne/000000.bin", rec)
        _write_bin(tmp_path / f"sequences/{seq}/velodyne/000001.bin", rec[: n - 3])
        if seq != "11":
            _write_label(tmp_path / f"sequences/{seq}/labels/000000.label", rng.choice([0, 10, 40, 70], n))
            _write_label(tmp_path / f"sequences/{seq}/labels/000001.label", rng.choice([0, 10, 40, 70], n - 3))
    train = SemanticKITTI(tmp_path, "train")
    assert len(train) == 4 and train.with_labels
    item = train[1]
    assert (item["sequence"], item["frame"]) == ("00", "000001")
    assert item["coord"].shape == (27, 3) and item["coord"].dtype == torch.float32
    assert item["remission"].shape == (27,) and item["ring"].dtype == torch.int64
    assert item["label"].dtype == torch.int64 and set(item["label"].tolist()) <= {-1, 0, 8, 14}
    assert item["ring"].tolist() == lidar_rings(item["coord"]).tolist()
    assert [s[:2] for s in SemanticKITTI(tmp_path, "val").scans] == [("08", "000000"), ("08", "000001")]
    test = SemanticKITTI(tmp_path, "test")
    assert not test.with_labels and "label" not in test[0]
    assert len(SemanticKITTI(tmp_path / "sequences" / "..", ["1", "8"])) == 4
    with pytest.raises(MissingFileError, match="label file missing"):
        SemanticKITTI(tmp_path, "test", with_labels=True)
    with pytest.raises(ConfigError):
        SemanticKITTI(tmp_path, "training")
    with pytest.raises(MissingFileError):
        SemanticKITTI(tmp_path, ["05"])


def test_registered():
    from threefold.datasets.registry import get_dataset

    assert get_dataset("semantickitti").cls is SemanticKITTI


# ------------------------------------------------------------------------------------- synthetic sample
def test_synthetic_sample_layout_determinism_and_rings(tmp_path):
    pytest.importorskip("open3d")
    from threefold.datasets.lidar_synthetic import generate_lidar_sample

    a = generate_lidar_sample(tmp_path / "a", sequences=("00", "08"), scans_per_sequence=2, azimuth_step_deg=1.0)
    b = generate_lidar_sample(tmp_path / "b", sequences=("00", "08"), scans_per_sequence=2, azimuth_step_deg=1.0)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.suffix in (".bin", ".label"))
    assert len(files) == 8
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    other = generate_lidar_sample(tmp_path / "c", sequences=("00",), scans_per_sequence=1, azimuth_step_deg=1.0, seed=1)
    assert (other / files[0]).read_bytes() != (a / files[0]).read_bytes()
    # idempotent: a second call leaves complete files untouched
    mtimes = {f: (a / f).stat().st_mtime_ns for f in files}
    generate_lidar_sample(a, sequences=("00", "08"), scans_per_sequence=2, azimuth_step_deg=1.0)
    assert mtimes == {f: (a / f).stat().st_mtime_ns for f in files}

    train, val = SemanticKITTI(a, "train"), SemanticKITTI(a, "val")
    assert len(train) == 2 and len(val) == 2 and train.with_labels
    item = train[0]
    n = item["coord"].shape[0]
    assert 15_000 < n < 23_040  # 360 firings x 64 beams, minus rays that hit nothing within 80 m
    assert float(item["coord"].norm(dim=1).max()) < 80.1
    assert 0 <= float(item["remission"].min()) and float(item["remission"].max()) <= 0.99
    raw = np.fromfile(a / "sequences/00/labels/000000.label", dtype="<u4") & 0xFFFF
    assert set(raw.tolist()) <= set(semantickitti_config()["labels"])
    present = {SEMANTICKITTI_CLASSES[c] for c in item["label"].unique().tolist() if c >= 0}
    assert present >= {"car", "road", "sidewalk", "building", "vegetation", "terrain"}
    # every point lies on one of the 64 beams: its elevation is within float32 noise of a beam's
    beams = np.deg2rad(np.linspace(2.0, -24.8, 64))
    c = item["coord"].double().numpy()
    elev = np.arctan2(c[:, 2], np.hypot(c[:, 0], c[:, 1]))
    nearest = np.abs(elev[:, None] - beams[None, :]).argmin(1)
    assert np.abs(elev - beams[nearest]).max() < 1e-5
    np.testing.assert_array_equal(item["ring"].numpy(), nearest)
