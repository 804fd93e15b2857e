"""Point-cloud readers against the published formats: a real SemanticKITTI scan, PLY/PCD headers
written here by hand from the specs (and files written by open3d as an independent writer), .npy from
NumPy's writer, and every validation error the issue lists."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from threefold.datasets.errors import (
    DataFormatError,
    MissingExtraError,
    MissingFileError,
    ThreefoldError,
    UnsafePickleError,
)
from threefold.datasets.pointclouds import (
    LabelMap,
    PointCloudFolder,
    read_bin,
    read_point_labels,
    read_points,
)
from threefold.datasets.registry import get_dataset

RNG = np.random.default_rng(7)
XYZI = RNG.normal(scale=10.0, size=(37, 4)).astype(np.float32)


def _write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


# ----------------------------------------------------------------------------------- real data
def test_real_semantickitti_scan(test_data):
    scan = test_data / "semantickitti" / "sequences" / "00" / "velodyne" / "000000.bin"
    sample = read_points(scan)
    coord, feat = sample["coord"].numpy(), sample["feat"].numpy()
    assert coord.shape == (124668, 3) and coord.dtype == np.float32 and feat.shape == (124668, 1)
    # ranges published in PROVENANCE.md (metres; remission in [0, 0.99])
    assert np.allclose(coord.min(0), [-78.1, -55.7, -11.6], atol=0.06)
    assert np.allclose(coord.max(0), [78.0, 44.9, 2.8], atol=0.06)
    assert 0.0 <= feat.min() and feat.max() <= 0.991
    assert np.linalg.norm(coord, axis=1).max() == pytest.approx(79.7, abs=0.06)
    # the 50-point mmdetection3d excerpt is a subset of this scan, point for point
    mini = np.frombuffer((test_data / "semantickitti_mini/sequences/00/velodyne/000000.bin").read_bytes(), "<f4")
    rows = {r.tobytes() for r in np.concatenate([coord, feat], axis=1)}
    assert all(r.tobytes() in rows for r in mini.reshape(-1, 4))


def test_real_labels_with_semantickitti_learning_map(test_data):
    seq = test_data / "semantickitti" / "sequences" / "99"
    cfg = yaml.safe_load((test_data / "semantickitti" / "semantic-kitti.yaml").read_text())
    points = read_points(seq / "velodyne" / "000000.bin")
    raw = read_point_labels(seq / "labels" / "000000.label", points["coord"].shape[0])
    ignore = [c for c, flag in cfg["learning_ignore"].items() if flag]
    lmap = LabelMap.from_learning_map(cfg["learning_map"], ignore=ignore, inverse=cfg["learning_map_inv"])
    label = lmap.encode(raw["label_raw"])
    assert lmap.num_classes == 19 and label.dtype == torch.int64
    # brute force: raw id -> learning_map class; class 0 (unlabeled) -> -1, classes 1..19 -> 0..18
    expected = np.array([cfg["learning_map"][int(r)] - 1 for r in raw["label_raw"].numpy()])
    assert np.array_equal(label.numpy(), expected)
    # raw 0 unlabeled, 1 outlier, 52 other-structure, 99 other-object map to class 0, which is ignored
    assert int((label == -1).sum()) == 4458 + 5 + 809 + 1652
    assert int((raw["label_raw"] == 40).sum()) == 20975  # counts from PROVENANCE.md
    assert len(torch.unique(raw["instance"])) == 12
    back = lmap.decode(label)
    kept = label >= 0
    assert np.array_equal(back[kept].numpy(), [cfg["learning_map_inv"][int(c) + 1] for c in label[kept]])
    assert set(back[~kept].tolist()) == {0}


# ------------------------------------------------------------------------------------------ .bin
def test_bin_roundtrip_and_errors(tmp_path):
    f = _write(tmp_path / "a.bin", XYZI.tobytes())
    s = read_bin(f)
    assert np.array_equal(s["coord"].numpy(), XYZI[:, :3]) and np.array_equal(s["feat"].numpy(), XYZI[:, 3:])
    bad = _write(tmp_path / "b.bin", XYZI.tobytes()[:-3])
    with pytest.raises(DataFormatError, match=r"b\.bin.*not a multiple of 16"):
        read_points(bad)
    nan = XYZI.copy()
    nan[5, 1] = np.nan
    with pytest.raises(DataFormatError, match=r"c\.bin.*NaN/inf coordinates.*point 5"):
        read_points(_write(tmp_path / "c.bin", nan.tobytes()))
    inf = XYZI.copy()
    inf[3, 3] = np.inf
    with pytest.raises(DataFormatError, match="NaN/inf feature"):
        read_points(_write(tmp_path / "d.bin", inf.tobytes()))
    with pytest.raises(DataFormatError, match="no points"):
        read_points(_write(tmp_path / "e.bin", b""))
    nusc = RNG.normal(size=(9, 5)).astype(np.float32)
    assert read_bin(_write(tmp_path / "n.bin", nusc.tobytes()), num_features=5)["feat"].shape == (9, 2)


def test_missing_file_and_wrong_extension(tmp_path):
    with pytest.raises(MissingFileError, match="nope.bin"):
        read_points(tmp_path / "nope.bin")
    with pytest.raises(DataFormatError, match=r"\.las.*expected one of"):
        read_points(_write(tmp_path / "x.las", b"1234"))
    (tmp_path / "dir.ply").mkdir()
    with pytest.raises(MissingFileError, match="folder"):
        read_points(tmp_path / "dir.ply")


# ------------------------------------------------------------------------------------------ .ply
def _ply_header(fmt: str, n: int, props: list[tuple[str, str]], faces: int | None = None) -> str:
    lines = ["ply", f"format {fmt} 1.0", "comment written by the test from the PLY spec", f"element vertex {n}"]
    lines += [f"property {t} {name}" for name, t in props]
    if faces is not None:
        lines += [f"element face {faces}", "property list uchar int vertex_indices"]
    return "\n".join(lines + ["end_header"]) + "\n"


def test_ply_ascii_handwritten_with_faces_and_label(tmp_path):
    body = "".join(f"{x} {y} {z} {i} {k}\n" for (x, y, z, i), k in zip(XYZI.tolist(), range(37)))
    text = _ply_header("ascii", 37, [("x", "float"), ("y", "float"), ("z", "float"), ("intensity", "float"),
                                     ("label", "int")], faces=1) + body + "3 0 1 2\n"
    s = read_points(_write(tmp_path / "a.ply", text), label_field="label")
    assert np.allclose(s["coord"].numpy(), XYZI[:, :3], rtol=1e-6) and np.allclose(s["feat"].numpy(), XYZI[:, 3:], rtol=1e-6)
    assert s["label_raw"].tolist() == list(range(37))
    short = _ply_header("ascii", 38, [("x", "float"), ("y", "float"), ("z", "float")]) + "1 2 3\n" * 37
    with pytest.raises(DataFormatError, match=r"short\.ply.*declares 38 lines.*has 37"):
        read_points(_write(tmp_path / "short.ply", short))
    # a deflated vertex count must not let the face line be read as a vertex, nor leave a vertex unread
    deflated = text.replace("element vertex 37", "element vertex 36")
    with pytest.raises(DataFormatError, match=r"deflated\.ply.*declares 37 lines.*has 38"):
        read_points(_write(tmp_path / "deflated.ply", deflated), label_field="label")


@pytest.mark.parametrize("fmt,endian", [("binary_little_endian", "<"), ("binary_big_endian", ">")])
def test_ply_binary_handwritten(tmp_path, fmt, endian):
    rgb = RNG.integers(0, 256, size=(37, 3)).astype(np.uint8)
    packed = b"".join(struct.pack(endian + "ffffBBB", *p, *c) for p, c in zip(XYZI.tolist(), rgb.tolist()))
    head = _ply_header(fmt, 37, [("x", "float"), ("y", "float"), ("z", "float"), ("intensity", "float"),
                                 ("red", "uchar"), ("green", "uchar"), ("blue", "uchar")])
    s = read_points(_write(tmp_path / "b.ply", head.encode() + packed))
    assert np.array_equal(s["coord"].numpy(), XYZI[:, :3])
    assert np.array_equal(s["feat"].numpy(), np.concatenate([XYZI[:, 3:], rgb.astype(np.float32)], axis=1))
    with pytest.raises(DataFormatError, match=r"t\.ply.*truncated"):
        read_points(_write(tmp_path / "t.ply", head.encode() + packed[:-1]))
    with pytest.raises(DataFormatError, match="trailing bytes"):
        read_points(_write(tmp_path / "x.ply", head.encode() + packed + b"\0"))
    huge = head.replace("element vertex 37", "element vertex 1000000000000")
    with pytest.raises(DataFormatError, match="truncated"):
        read_points(_write(tmp_path / "h.ply", huge.encode() + packed))
    # a mesh: a triangle and a quad after the vertices; one vertex too many in the header must not
    # silently eat face bytes as a vertex
    faces = struct.pack(endian + "B3i", 3, 0, 1, 2) + struct.pack(endian + "B4i", 4, 0, 1, 2, 3)
    mesh = head.replace("end_header", "element face 2\nproperty list uchar int vertex_indices\nend_header")
    assert read_points(_write(tmp_path / "m.ply", mesh.encode() + packed + faces))["coord"].shape == (37, 3)
    with pytest.raises(DataFormatError, match=r"m2\.ply"):
        read_points(_write(tmp_path / "m2.ply", mesh.replace("vertex 37", "vertex 38").encode() + packed + faces))
    with pytest.raises(DataFormatError, match=r"m3\.ply.*truncated"):
        read_points(_write(tmp_path / "m3.ply", mesh.encode() + packed + faces[:-1]))


def test_ply_and_pcd_written_by_open3d(tmp_path):
    o3d = pytest.importorskip("open3d")
    cloud = o3d.t.geometry.PointCloud()
    cloud.point.positions = o3d.core.Tensor(XYZI[:, :3].copy())
    cloud.point.intensity = o3d.core.Tensor(XYZI[:, 3:].copy())
    cases = [("a.ply", {"write_ascii": True}), ("b.ply", {"write_ascii": False}), ("a.pcd", {"write_ascii": True}),
             ("b.pcd", {"write_ascii": False}), ("c.pcd", {"write_ascii": False, "compressed": True})]
    for name, kw in cases:
        o3d.t.io.write_point_cloud(str(tmp_path / name), cloud, **kw)
        s = read_points(tmp_path / name)
        # open3d's ASCII PLY prints 6 significant digits; every other case must be bit-exact
        rtol = 1e-5 if name == "a.ply" else 0.0
        assert np.allclose(s["coord"].numpy(), XYZI[:, :3], rtol=rtol, atol=0), name
        assert np.allclose(s["feat"].numpy(), XYZI[:, 3:], rtol=rtol, atol=0), name


# ------------------------------------------------------------------------------------------ .pcd
def _pcd_header(n: int, data: str, fields: str = "x y z intensity label", size: str = "4 4 4 4 4",
                type_: str = "F F F F U", count: str = "1 1 1 1 1") -> str:
    return (f"# .PCD v0.7 - Point Cloud Data file format\nVERSION 0.7\nFIELDS {fields}\nSIZE {size}\nTYPE {type_}\n"
            f"COUNT {count}\nWIDTH {n}\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\nPOINTS {n}\nDATA {data}\n")


def test_pcd_ascii_and_binary_handwritten(tmp_path):
    labels = np.arange(37, dtype=np.uint32) * 3
    body = "".join(f"{x!r} {y!r} {z!r} {i!r} {k}\n" for (x, y, z, i), k in zip(XYZI.astype(float).tolist(), labels.tolist()))
    s = read_points(_write(tmp_path / "a.pcd", _pcd_header(37, "ascii") + body), label_field="label")
    assert np.array_equal(s["coord"].numpy(), XYZI[:, :3]) and s["label_raw"].tolist() == labels.tolist()
    packed = b"".join(struct.pack("<ffffI", *p, k) for p, k in zip(XYZI.tolist(), labels.tolist()))
    s = read_points(_write(tmp_path / "b.pcd", _pcd_header(37, "binary").encode() + packed), label_field="label")
    assert np.array_equal(s["feat"].numpy(), XYZI[:, 3:]) and s["label_raw"].tolist() == labels.tolist()
    with pytest.raises(DataFormatError, match=r"t\.pcd.*truncated"):
        read_points(_write(tmp_path / "t.pcd", _pcd_header(37, "binary").encode() + packed[:-4]))
    huge = _pcd_header(37, "binary").replace("POINTS 37", "POINTS 1000000000000").replace("WIDTH 37", "WIDTH 1000000000000")
    with pytest.raises(DataFormatError, match="truncated"):
        read_points(_write(tmp_path / "h.pcd", huge.encode() + packed))
    with pytest.raises(DataFormatError, match="declares 37 point lines, the data section has 36"):
        read_points(_write(tmp_path / "s.pcd", _pcd_header(37, "ascii") + "".join(body.splitlines(True)[:36])))
    with pytest.raises(DataFormatError, match="5 FIELDS but 4 SIZE"):
        read_points(_write(tmp_path / "m.pcd", _pcd_header(37, "ascii", size="4 4 4 4") + body))
    nan = _pcd_header(2, "ascii") + "nan nan nan 0 0\n1 2 3 4 5\n"
    with pytest.raises(DataFormatError, match="NaN/inf coordinates"):
        read_points(_write(tmp_path / "n.pcd", nan))


def test_pcd_compressed_block_that_cannot_hold_its_declared_size(tmp_path):
    # 10^6 points x 12 bytes declared from a 9-byte LZF block: refused before open3d allocates
    head = _pcd_header(1000000, "binary_compressed", fields="x y z", size="4 4 4", type_="F F F", count="1 1 1")
    block = bytes([7]) + b"\0" * 8
    data = head.encode() + struct.pack("<II", len(block), 12 * 1000000) + block
    with pytest.raises(DataFormatError, match=r"z\.pcd.*cannot unpack"):
        read_points(_write(tmp_path / "z.pcd", data))


def test_pcd_multi_count_field_and_padding(tmp_path):
    # a 2-value descriptor and a PCL "_" padding field; features must keep both descriptor values
    head = _pcd_header(3, "binary", fields="x y z desc _", size="4 4 4 4 1", type_="F F F F U", count="1 1 1 2 4")
    rows = [(1.0, 2.0, 3.0, 0.5, 0.25), (4.0, 5.0, 6.0, 1.5, 1.25), (7.0, 8.0, 9.0, 2.5, 2.25)]
    packed = b"".join(struct.pack("<5f4x", *r) for r in rows)
    s = read_points(_write(tmp_path / "d.pcd", head.encode() + packed))
    assert np.array_equal(s["feat"].numpy(), np.array(rows, dtype=np.float32)[:, 3:])


# ------------------------------------------------------------------------------------ .npy / .txt
def test_npy_and_txt(tmp_path):
    np.save(tmp_path / "a.npy", XYZI.astype(np.float64))
    assert np.allclose(read_points(tmp_path / "a.npy")["coord"].numpy(), XYZI[:, :3])
    np.save(tmp_path / "f.npy", np.asfortranarray(XYZI))
    assert np.array_equal(read_points(tmp_path / "f.npy")["feat"].numpy(), XYZI[:, 3:])
    np.save(tmp_path / "o.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UnsafePickleError, match="o.npy"):
        read_points(tmp_path / "o.npy")
    np.save(tmp_path / "two.npy", XYZI[:, :2])
    with pytest.raises(DataFormatError, match=r"two\.npy.*x, y, z"):
        read_points(tmp_path / "two.npy")
    # forge the header's shape: the reader must refuse from the header, before allocating
    raw = (tmp_path / "a.npy").read_bytes().replace(b"(37, 4)", b"(10**12, 4)".replace(b"10**12", b"999999999999"), 1)
    with pytest.raises(DataFormatError, match="header declares shape"):
        read_points(_write(tmp_path / "h.npy", raw))
    np.savetxt(tmp_path / "c.txt", XYZI, delimiter=",")
    np.savetxt(tmp_path / "s.txt", XYZI)
    for name in ("c.txt", "s.txt"):
        s = read_points(tmp_path / name)
        assert np.array_equal(s["coord"].numpy(), XYZI[:, :3]) and np.array_equal(s["feat"].numpy(), XYZI[:, 3:])
    with pytest.raises(DataFormatError, match="malformed"):
        read_points(_write(tmp_path / "r.txt", "1 2 3\n4 5\n"))
    with pytest.raises(DataFormatError, match="no points"):
        read_points(_write(tmp_path / "e.txt", "\n"))


# ------------------------------------------------------------------------------------------ labels
def test_label_length_mismatch_and_map_errors(tmp_path):
    lab = _write(tmp_path / "a.label", np.arange(10, dtype="<u4").tobytes())
    with pytest.raises(DataFormatError, match=r"a\.label.*11 points"):
        read_point_labels(lab, 11)
    np.save(tmp_path / "b.npy", np.arange(5))
    with pytest.raises(DataFormatError, match=r"b\.npy.*5 labels.*6 points"):
        read_point_labels(tmp_path / "b.npy", 6)
    lmap = LabelMap({10: 0, 20: 1, 0: -1})
    with pytest.raises(DataFormatError, match=r"\[30\]"):
        lmap.encode(torch.tensor([10, 30]))
    assert lmap.encode(torch.tensor([20, 0, 10])).tolist() == [1, -1, 0]
    assert lmap.decode(torch.tensor([1, -1, 0])).tolist() == [20, 0, 10]
    with pytest.raises(DataFormatError, match="outside"):
        lmap.decode(torch.tensor([2]))
    with pytest.raises(DataFormatError, match="0..C-1"):
        LabelMap({1: 0, 2: 2})


# ----------------------------------------------------------------------------------------- dataset
def test_pointcloud_folder(tmp_path):
    (tmp_path / "train" / "points").mkdir(parents=True)
    (tmp_path / "train" / "labels").mkdir()
    _write(tmp_path / "train" / "points" / "s0.bin", XYZI.tobytes())
    np.save(tmp_path / "train" / "points" / "s1.npy", XYZI[:20])
    _write(tmp_path / "train" / "labels" / "s0.label", (np.arange(37, dtype="<u4") % 3 * 10).tobytes())
    np.savetxt(tmp_path / "train" / "labels" / "s1.txt", np.arange(20) % 3 * 10, fmt="%d")

    def shift(sample, gen):
        return {**sample, "coord": sample["coord"] + torch.rand(3, generator=gen)}

    entry = get_dataset("pointcloud-folder")
    assert entry.cls is PointCloudFolder and entry.modality == "points"
    ds = entry.cls(tmp_path, split="train", label_map={0: -1, 10: 0, 20: 1}, transform=shift, seed=3)
    assert len(ds) == 2 and ds.num_classes == 2
    s1 = ds[1]
    assert s1["name"] == "s1" and s1["label"].tolist() == [[-1, 0, 1][i % 3] for i in range(20)]
    assert torch.equal(ds[1]["coord"], s1["coord"])  # same (seed, epoch, index) -> same draw
    ds.set_epoch(1)
    assert not torch.equal(ds[1]["coord"], s1["coord"])
    (tmp_path / "train" / "labels" / "s1.txt").unlink()
    with pytest.raises(MissingFileError, match="s1"):
        ds[1]
    with pytest.raises(MissingFileError, match="val"):
        PointCloudFolder(tmp_path, split="val")
    plain = PointCloudFolder(tmp_path, split="train", num_classes=2)
    with pytest.raises(DataFormatError, match="label_map"):
        plain[0]  # raw ids 10, 20 are not classes 0..1
    assert issubclass(DataFormatError, ThreefoldError)


def test_reader_modules_do_not_import_heavy_extras():
    code = ("import sys, threefold.datasets.pointclouds, threefold.datasets.volumes, threefold.datasets.molecules; "
            "print(sorted(m for m in ('open3d', 'nibabel', 'rdkit', 'lightning', 'monai') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_missing_open3d_names_the_extra(tmp_path, monkeypatch):
    head = _pcd_header(1, "binary_compressed", fields="x y z", size="4 4 4", type_="F F F", count="1 1 1")
    soa = struct.pack("<3f", 1.0, 2.0, 3.0)
    f = _write(tmp_path / "c.pcd", head.encode() + struct.pack("<II", 13, 12) + bytes([11]) + soa)
    monkeypatch.setitem(sys.modules, "open3d", None)  # makes `import open3d` fail
    with pytest.raises(MissingExtraError, match=r"threefold\[lidar\]"):
        read_points(f)
