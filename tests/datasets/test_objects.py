"""Object datasets on fixtures written here from the published layouts (ShapeNet-55 ``.npy`` + lists,
ModelNet40 resampled text + lists, ModelNet40 / ScanObjectNN HDF5), never by threefold's writers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from threefold.datasets.errors import ConfigError, DataFormatError, MissingFileError, UnsafePickleError
from threefold.datasets.objects import (
    ModelNet40,
    ModelNet40H5,
    ScaleAndTranslate,
    ScanObjectNN,
    ShapeNet55,
    collate_objects,
    normalize_unit_sphere,
)

h5py = pytest.importorskip("h5py")


def np_normalize(p: np.ndarray) -> np.ndarray:
    c = p - p.mean(0)
    return c / np.sqrt((c**2).sum(1)).max()


def sorted_rows(a: np.ndarray) -> np.ndarray:
    return a[np.lexsort(a.T[::-1])]


# ------------------------------------------------------------------------------------- ShapeNet-55
@pytest.fixture
def shapenet(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    (tmp_path / "shapenet_pc").mkdir()
    clouds = {}
    names = {"train": ["04379243-aaa.npy", "02691156-bbb.npy", "04379243-ccc.npy"], "test": ["03001627-ddd.npy"]}
    for split, files in names.items():
        for f in files:
            clouds[f] = rng.normal(size=(64, 3)).astype(np.float32) * [1, 2, 3] + [5, 0, -1]
            np.save(tmp_path / "shapenet_pc" / f, clouds[f])
        (tmp_path / f"{split}.txt").write_text("\n".join(files) + "\n")
    return tmp_path, clouds


def test_shapenet55_reads_lists_taxonomy_and_normalises(shapenet):
    root, clouds = shapenet
    ds = ShapeNet55(root, "train", num_points=64)
    assert len(ds) == 3 and ds.class_names == ["02691156", "03001627", "04379243"]
    item = ds[1]
    assert item["name"] == "02691156-bbb" and int(item["category"]) == 0
    assert int(ds[0]["category"]) == 2 and int(ShapeNet55(root, "test", 64)[0]["category"]) == 1
    # All 64 points: a permutation of the normalised file.
    np.testing.assert_allclose(sorted_rows(item["coord"].numpy()), sorted_rows(np_normalize(clouds["02691156-bbb.npy"])),
                               atol=1e-5)


def test_shapenet55_subset_is_seeded_and_distinct_rows(shapenet):
    root, clouds = shapenet
    a, b = ShapeNet55(root, "train", 16, seed=3), ShapeNet55(root, "train", 16, seed=3)
    x = a[0]["coord"]
    assert torch.equal(x, b[0]["coord"])
    b.set_epoch(1)
    assert not torch.equal(x, b[0]["coord"])
    # Every returned point is a distinct file row under one similarity (subset, then normalise):
    # try each file pair as the images of points 0 and 1, recover scale and offset, map all back.
    orig = clouds["04379243-aaa.npy"].astype(np.float64)
    xs = x.numpy().astype(np.float64)
    np.testing.assert_allclose(xs.mean(0), 0, atol=1e-5)
    assert np.sqrt((xs**2).sum(1)).max() == pytest.approx(1, abs=1e-5)
    found = None
    for i in range(len(orig)):
        for j in range(len(orig)):
            if i == j:
                continue
            r = np.linalg.norm(orig[i] - orig[j]) / np.linalg.norm(xs[0] - xs[1])
            back = xs * r + (orig[i] - r * xs[0])
            d = np.sqrt(((back[:, None] - orig[None]) ** 2).sum(-1))
            if d.min(1).max() < 1e-3:
                found = d.argmin(1)
    assert found is not None and len(set(found.tolist())) == 16


def test_shapenet55_bad_inputs(tmp_path, shapenet):
    root, _ = shapenet
    with pytest.raises(ConfigError, match="split"):
        ShapeNet55(root, "val")
    np.save(root / "shapenet_pc" / "04379243-aaa.npy", np.zeros((64, 4), np.float32))
    with pytest.raises(DataFormatError, match="04379243-aaa.npy.*expected \\(N, 3\\)"):
        ShapeNet55(root, "train", 8)[0]
    bad = np.ones((64, 3), np.float32)
    bad[3, 1] = np.nan
    np.save(root / "shapenet_pc" / "04379243-aaa.npy", bad)
    with pytest.raises(DataFormatError, match="NaN"):
        ShapeNet55(root, "train", 8)[0]
    np.save(root / "shapenet_pc" / "04379243-aaa.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UnsafePickleError, match="04379243-aaa.npy: .npy holds Python objects"):
        ShapeNet55(root, "train", 8)[0]
    np.save(root / "shapenet_pc" / "04379243-aaa.npy", np.ones((4, 3), np.float32))
    with pytest.raises(DataFormatError, match="fewer than num_points"):
        ShapeNet55(root, "train", 8)[0]
    (root / "train.txt").write_text("not-a-taxonomy.npy\n")
    with pytest.raises(DataFormatError, match="taxonomy"):
        ShapeNet55(root, "train")
    with pytest.raises(MissingFileError, match="shapenet_pc"):
        ShapeNet55(tmp_path / "nowhere", "train")


# ---------------------------------------------------------------------------------- ModelNet40 text
@pytest.fixture
def modelnet(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    classes = ["airplane", "bathtub", "night_stand"]
    (tmp_path / "modelnet40_shape_names.txt").write_text("\n".join(classes) + "\n")
    files = {}
    for split, stems in {"train": ["airplane_0001", "night_stand_0002", "bathtub_0001"], "test": ["airplane_0003"]}.items():
        for stem in stems:
            cls = stem.rsplit("_", 1)[0]
            (tmp_path / cls).mkdir(exist_ok=True)
            xyz = rng.normal(size=(40, 3)) * 3 + 2
            nrm = rng.normal(size=(40, 3))
            nrm /= np.linalg.norm(nrm, axis=1, keepdims=True)
            rows = np.concatenate([xyz, nrm], 1)
            # The published layout: comma-separated, six values per line.
            (tmp_path / cls / f"{stem}.txt").write_text("\n".join(",".join(f"{v:.6f}" for v in r) for r in rows) + "\n")
            files[stem] = np.round(rows, 6)
        (tmp_path / f"modelnet40_{split}.txt").write_text("\n".join(stems) + "\n")
    return tmp_path, files


def test_modelnet40_reads_first_points_normals_and_classes(modelnet):
    root, files = modelnet
    ds = ModelNet40(root, "train", num_points=25, use_normals=True)
    assert len(ds) == 3 and ds.num_classes == 3
    item = ds[1]
    assert item["name"] == "night_stand_0002" and int(item["category"]) == 2
    rows = files["night_stand_0002"]
    np.testing.assert_allclose(item["coord"].numpy(), np_normalize(rows[:25, :3]), atol=1e-5)
    np.testing.assert_allclose(item["normal"].numpy(), rows[:25, 3:], atol=1e-6)
    assert "normal" not in ModelNet40(root, "test", 25)[0]


def np_fps(p: np.ndarray, k: int) -> np.ndarray:
    idx = [0]
    d = ((p - p[0]) ** 2).sum(1)
    for _ in range(k - 1):
        idx.append(int(np.argmax(d)))
        d = np.minimum(d, ((p - p[idx[-1]]) ** 2).sum(1))
    return np.array(idx)


def test_modelnet40_injected_sampler_and_cache(modelnet, tmp_path):
    root, files = modelnet
    calls = []

    def sampler(points: torch.Tensor, k: int) -> torch.Tensor:
        calls.append(k)
        return torch.from_numpy(np_fps(points.numpy().astype(np.float64), k))

    ds = ModelNet40(root, "train", 10, sampler=sampler, cache_dir=tmp_path / "cache")
    rows = files["airplane_0001"]
    want = np_normalize(rows[np_fps(rows[:, :3], 10), :3])
    np.testing.assert_allclose(ds[0]["coord"].numpy(), want, atol=1e-5)
    again = ModelNet40(root, "train", 10, sampler=sampler, cache_dir=tmp_path / "cache")
    np.testing.assert_allclose(again[0]["coord"].numpy(), want, atol=1e-5)
    assert calls == [10]  # the second read came from the cache


def test_modelnet40_bad_inputs(modelnet):
    root, _ = modelnet
    (root / "airplane" / "airplane_0001.txt").write_text("1,2,3,4,5\n1,2,3,4,5\n")
    with pytest.raises(DataFormatError, match="airplane_0001.txt.*expected 6"):
        ModelNet40(root, "train", 1)[0]
    (root / "airplane" / "airplane_0001.txt").write_text("1,2,x,0,0,1\n")
    with pytest.raises(DataFormatError, match="airplane_0001.txt"):
        ModelNet40(root, "train", 1)[0]
    (root / "airplane" / "airplane_0001.txt").unlink()
    with pytest.raises(MissingFileError, match="airplane_0001.txt"):
        ModelNet40(root, "train", 1)[0]
    with pytest.raises(DataFormatError, match="fewer than num_points"):
        ModelNet40(root, "train", 1000)[1]
    (root / "modelnet40_test.txt").write_text("chair_0001\n")
    with pytest.raises(DataFormatError, match="chair_0001"):
        ModelNet40(root, "test")
    (root / "modelnet40_test.txt").write_text("\n")
    with pytest.raises(DataFormatError, match="empty"):
        ModelNet40(root, "test")


# ------------------------------------------------------------------------------------------- HDF5
def write_h5(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            f.create_dataset(k, data=v)


def test_modelnet40_h5_concatenates_files_in_index_order(tmp_path):
    rng = np.random.default_rng(2)
    parts = {i: rng.normal(size=(2, 32, 3)).astype(np.float32) for i in (0, 1, 10)}
    for i, data in parts.items():
        write_h5(tmp_path / f"ply_data_train{i}.h5", data=data, label=np.full((2, 1), i % 7, np.uint8))
    write_h5(tmp_path / "ply_data_test0.h5", data=parts[0], label=np.zeros((2, 1), np.uint8))
    ds = ModelNet40H5(tmp_path, "train", 16)
    assert len(ds) == 6 and ds.num_classes == 4  # labels 0, 1, 3 -> classes 0..3
    np.testing.assert_allclose(ds[4]["coord"].numpy(), np_normalize(parts[10][0, :16]), atol=1e-5)
    assert [int(ds[i]["category"]) for i in range(6)] == [0, 0, 1, 1, 3, 3]
    write_h5(tmp_path / "ply_data_test0.h5", data=parts[0], label=np.zeros((3, 1), np.uint8))
    with pytest.raises(DataFormatError, match="3 entries for 2 clouds"):
        ModelNet40H5(tmp_path, "test")
    write_h5(tmp_path / "ply_data_test0.h5", points=parts[0])
    with pytest.raises(DataFormatError, match="no dataset 'data'"):
        ModelNet40H5(tmp_path, "test")
    (tmp_path / "ply_data_test0.h5").write_bytes(b"not hdf5")
    with pytest.raises(DataFormatError, match="not a readable HDF5"):
        ModelNet40H5(tmp_path, "test")


@pytest.mark.parametrize("variant,folder,suffix", [
    ("obj_bg", "main_split", ""), ("obj_only", "main_split_nobg", ""),
    ("pb_t50_rs", "main_split", "_augmentedrot_scale75"),
])
def test_scanobjectnn_variants(tmp_path, variant, folder, suffix):
    rng = np.random.default_rng(3)
    data = rng.uniform(-1, 1, size=(4, 2048, 3)).astype(np.float32)
    label = np.array([0, 14, 3, 3], np.int64)
    mask = rng.integers(-1, 2, size=(4, 2048)).astype(np.int32)
    for stem in ("training", "test"):
        write_h5(tmp_path / "h5_files" / folder / f"{stem}_objectdataset{suffix}.h5", data=data, label=label, mask=mask)
    test = ScanObjectNN(tmp_path, "test", variant)
    assert len(test) == 4 and int(test[1]["category"]) == 14
    np.testing.assert_array_equal(test[2]["coord"].numpy(), data[2])  # stored coordinates, not renormalised
    np.testing.assert_array_equal(test[2]["mask"].numpy(), mask[2])
    train = ScanObjectNN(tmp_path, "train", variant, seed=5)
    x = train[0]
    assert not np.array_equal(x["coord"].numpy(), data[0])  # shuffled ...
    order = np.lexsort(x["coord"].numpy().T)
    np.testing.assert_array_equal(x["coord"].numpy()[order], data[0][np.lexsort(data[0].T)])  # ... a permutation
    # the mask travels with its points
    pos = {tuple(p): i for i, p in enumerate(data[0])}
    idx = np.array([pos[tuple(p)] for p in x["coord"].numpy()])
    np.testing.assert_array_equal(x["mask"].numpy(), mask[0][idx])


def test_scanobjectnn_bad_inputs(tmp_path):
    data = np.zeros((2, 8, 3), np.float32)
    data[:, :, 0] = np.arange(8)
    write_h5(tmp_path / "main_split" / "training_objectdataset.h5", data=data, label=np.array([0, 15]))
    with pytest.raises(DataFormatError, match="label 15"):
        ScanObjectNN(tmp_path, "train", "obj_bg", None)
    with pytest.raises(ConfigError, match="variant"):
        ScanObjectNN(tmp_path, "train", "hardest")
    with pytest.raises(MissingFileError, match="main_split_nobg"):
        ScanObjectNN(tmp_path, "train", "obj_only")
    write_h5(tmp_path / "main_split" / "training_objectdataset.h5", data=data, label=np.array([0, 1]),
             mask=np.zeros((2, 7)))
    with pytest.raises(DataFormatError, match="'mask'"):
        ScanObjectNN(tmp_path, "train", "obj_bg", None)
    write_h5(tmp_path / "main_split" / "training_objectdataset.h5", data=data, label=np.array([0, 1]))
    with pytest.raises(ConfigError, match="num_points=2048 exceeds"):
        ScanObjectNN(tmp_path, "train", "obj_bg")


# ------------------------------------------------------------------------------------- transforms
def test_normalize_unit_sphere_matches_numpy_and_rejects_a_point():
    p = np.random.default_rng(4).normal(size=(50, 3)) * 7 + 3
    np.testing.assert_allclose(normalize_unit_sphere(torch.from_numpy(p)).numpy(), np_normalize(p), atol=1e-12)
    with pytest.raises(DataFormatError, match="zero radius"):
        normalize_unit_sphere(torch.ones(5, 3))


def test_scale_and_translate_ranges_and_determinism():
    # Points 0 and (1, 1, 1): the output's first row is the translation, the difference the scales.
    sample = {"coord": torch.tensor([[0.0, 0, 0], [1.0, 1, 1]], dtype=torch.float64), "normal": torch.zeros(2, 3)}
    t = ScaleAndTranslate()
    scales, shifts = [], []
    for seed in range(400):
        out = t(sample, torch.Generator().manual_seed(seed))
        shifts.append(out["coord"][0].numpy())
        scales.append((out["coord"][1] - out["coord"][0]).numpy())
        assert "normal" not in out
    scales, shifts = np.array(scales), np.array(shifts)
    assert scales.min() >= 2 / 3 and scales.max() <= 1.5 and scales.min() < 0.7 and scales.max() > 1.45
    assert np.abs(shifts).max() <= 0.2 and np.abs(shifts).max() > 0.19
    assert np.corrcoef(scales[:, 0], scales[:, 1])[0, 1] < 0.2  # independent per axis
    a = t(sample, torch.Generator().manual_seed(9))["coord"]
    assert torch.equal(a, t(sample, torch.Generator().manual_seed(9))["coord"])
    with pytest.raises(ConfigError):
        ScaleAndTranslate(scale=(2.0, 1.0))


def test_collate_objects_stacks_and_rejects_mismatches():
    a = {"coord": torch.zeros(4, 3), "category": torch.tensor(1), "name": "a"}
    b = {"coord": torch.ones(4, 3), "category": torch.tensor(2), "name": "b"}
    batch = collate_objects([a, b])
    assert batch["coord"].shape == (2, 4, 3) and batch["category"].tolist() == [1, 2] and batch["name"] == ["a", "b"]
    with pytest.raises(DataFormatError, match="shapes"):
        collate_objects([a, {**b, "coord": torch.ones(5, 3)}])
    with pytest.raises(DataFormatError, match="fields"):
        collate_objects([a, {"coord": torch.ones(4, 3)}])


def test_few_shot_episode_draws_way_classes_shot_and_query_each(tmp_path):
    from threefold.datasets.objects import few_shot_episode

    labels = np.repeat(np.arange(6), 10)
    data = np.zeros((60, 8, 3), np.float32)
    data[:, :, 0] = np.arange(60)[:, None]  # row i is recognisable by its x
    data[:, :, 1] = np.arange(8)[None]
    for stem in ("training", "test"):
        write_h5(tmp_path / "main_split" / f"{stem}_objectdataset.h5", data=data, label=labels)
    train = ScanObjectNN(tmp_path, "train", "obj_bg", None, shuffle=False)
    test = ScanObjectNN(tmp_path, "test", "obj_bg", None)
    sup, qry = few_shot_episode(train, test, way=3, shot=4, query=2, seed=7)
    assert len(sup) == 12 and len(qry) == 6 and sup.num_classes == 3
    rows = [int(sup[i]["coord"][0, 0]) for i in range(12)]
    new = [int(sup[i]["category"]) for i in range(12)]
    assert len(set(rows)) == 12 and np.bincount(new).tolist() == [4, 4, 4]
    old = labels[rows]
    assert all(len(set(old[np.array(new) == k])) == 1 for k in range(3))  # one original class per new one
    assert [int(qry[i]["category"]) for i in range(6)].count(0) == 2
    again, _ = few_shot_episode(train, test, 3, 4, 2, seed=7)
    assert again.indices == sup.indices
    with pytest.raises(ConfigError, match="fewer than the 11"):
        few_shot_episode(train, test, 3, 11, 2, seed=7)
