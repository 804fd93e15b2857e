"""BraTS 2018 / 2023 / MSD Task01 readers, label mapping, preprocessing, prediction writer and the
synthetic brain phantoms. Fixtures are written here with nibabel from the published layouts."""

from __future__ import annotations

import json

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")

from threefold.datasets.brain_phantoms import brain_phantom, write_brats2018_phantoms  # noqa: E402
from threefold.datasets.brats import (  # noqa: E402
    BraTS,
    detect_layout,
    from_ordinal,
    list_cases,
    preprocess,
    read_case,
    to_ordinal,
    uncrop,
    write_prediction,
)
from threefold.datasets.errors import DataFormatError, MissingFileError  # noqa: E402

SHAPE = (6, 7, 5)
AFFINE = np.array([[-1.0, 0, 0, 5.0], [0, -1.2, 0, 8.0], [0, 0, 2.0, -3.0], [0, 0, 0, 1]])


def _seg(values, seed=0):
    return np.random.default_rng(seed).choice(values, size=SHAPE).astype(np.uint8)


def _save(path, data, affine=AFFINE):
    nib.save(nib.Nifti1Image(data, affine), str(path))


def _brats_case(root, case, names, sep, seg, affine=AFFINE, shapes=None):
    folder = root / case
    folder.mkdir(parents=True)
    for i, name in enumerate(names):
        shape = (shapes or {}).get(name, SHAPE)
        _save(folder / f"{case}{sep}{name}.nii.gz", np.full(shape, 10.0 * (i + 1), np.float32), affine)
    if seg is not None:
        _save(folder / f"{case}{sep}seg.nii.gz", seg)
    return folder


def test_brats2018_reader_channels_labels_geometry(tmp_path):
    seg = _seg([0, 1, 2, 4])
    # file order t1, t1ce, t2, flair get 10, 20, 30, 40
    _brats_case(tmp_path, "Brats18_A_1", ["t1", "t1ce", "t2", "flair"], "_", seg)
    assert detect_layout(tmp_path) == "brats2018"
    sample = read_case(list_cases(tmp_path)[0])
    assert sample["image"].shape == (4,) + SHAPE and sample["image"].dtype == np.float32
    assert sample["image"][:, 0, 0, 0].tolist() == [10, 20, 30, 40]
    np.testing.assert_array_equal(sample["label"], np.select([seg == 2, seg == 1, seg == 4], [1, 2, 3], 0))
    np.testing.assert_allclose(sample["affine"], AFFINE)
    np.testing.assert_allclose(sample["spacing"], [1.0, 1.2, 2.0])


def test_brats2018_training_root_with_grade_folders(tmp_path):
    """The BraTS 2018 training archive nests cases in HGG/ and LGG/."""
    for grade, case in (("HGG", "Brats18_CBICA_AAA_1"), ("LGG", "Brats18_TCIA09_1")):
        _brats_case(tmp_path / grade, case, ["t1", "t1ce", "t2", "flair"], "_", _seg([0, 1, 2, 4]))
    (tmp_path / "survival_data.csv").write_text("BraTS18ID,Age\n")
    assert detect_layout(tmp_path) == "brats2018"
    assert [c.name for c in list_cases(tmp_path)] == ["Brats18_CBICA_AAA_1", "Brats18_TCIA09_1"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFormatError, match=r"empty: neither a case folder"):
        list_cases(tmp_path)


def test_brats2023_reader_with_resection_cavity(tmp_path):
    seg = _seg([0, 1, 2, 3, 4])
    # file order t1n, t1c, t2w, t2f -> canonical t1, t1ce, t2, flair
    _brats_case(tmp_path, "BraTS-GLI-00001-000", ["t1n", "t1c", "t2w", "t2f"], "-", seg)
    assert detect_layout(tmp_path) == "brats2023"
    sample = read_case(list_cases(tmp_path)[0])
    assert sample["image"][:, 0, 0, 0].tolist() == [10, 20, 30, 40]
    np.testing.assert_array_equal(sample["label"], np.select([seg == 2, seg == 1, seg == 3], [1, 2, 3], 0))
    np.testing.assert_array_equal(sample["resection"], seg == 4)
    assert not np.any(sample["label"][seg == 4])  # the cavity is in none of WT / TC / ET


def test_msd_reader_orders_channels_from_dataset_json(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    meta = {
        "name": "BRATS",
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
        "training": [{"image": "./imagesTr/BRATS_001.nii.gz", "label": "./labelsTr/BRATS_001.nii.gz"}],
        "test": ["./imagesTs/BRATS_485.nii.gz"],
    }
    (tmp_path / "imagesTs").mkdir()
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    image = np.stack([np.full(SHAPE, v, np.float32) for v in (40.0, 10.0, 20.0, 30.0)], -1)  # FLAIR, T1w, T1gd, T2w
    _save(tmp_path / "imagesTr" / "BRATS_001.nii.gz", image)
    _save(tmp_path / "imagesTs" / "BRATS_485.nii.gz", image)
    seg = _seg([0, 1, 2, 3])
    _save(tmp_path / "labelsTr" / "BRATS_001.nii.gz", seg)
    assert detect_layout(tmp_path) == "msd"
    assert [(c.name, c.seg is None) for c in list_cases(tmp_path)] == [("BRATS_001", False), ("BRATS_485", True)]
    assert [c.name for c in list_cases(tmp_path, require_labels=True)] == ["BRATS_001"]
    sample = read_case(list_cases(tmp_path)[0])
    assert sample["case"] == "BRATS_001"
    assert sample["image"][:, 1, 2, 3].tolist() == [10, 20, 30, 40]
    np.testing.assert_array_equal(sample["label"], seg)  # MSD 1 oedema, 2 non-enhancing, 3 enhancing = ordinal
    np.testing.assert_allclose(sample["spacing"], [1.0, 1.2, 2.0])


@pytest.mark.parametrize(
    "layout, values, regions",
    [
        # value: (WT, TC, ET) from the challenges' region definitions
        ("brats2018", [0, 1, 2, 4], {0: (0, 0, 0), 1: (1, 1, 0), 2: (1, 0, 0), 4: (1, 1, 1)}),
        ("brats2023", [0, 1, 2, 3, 4], {0: (0, 0, 0), 1: (1, 1, 0), 2: (1, 0, 0), 3: (1, 1, 1), 4: (0, 0, 0)}),
        ("msd", [0, 1, 2, 3], {0: (0, 0, 0), 1: (1, 0, 0), 2: (1, 1, 0), 3: (1, 1, 1)}),
    ],
)
def test_label_round_trip_and_regions(layout, values, regions):
    seg = _seg(values, seed=3)
    y, resection = to_ordinal(seg, layout)
    for value, (wt, tc, et) in regions.items():
        sel = seg == value
        assert np.all((y[sel] >= 1) == wt) and np.all((y[sel] >= 2) == tc) and np.all((y[sel] >= 3) == et)
    np.testing.assert_array_equal(from_ordinal(y, layout, resection), seg)


@pytest.mark.parametrize(
    "layout, bad", [("brats2018", [0, 1, 3]), ("brats2023", [0, 5]), ("msd", [0, 4])]
)
def test_wrong_label_set_names_file_and_values(tmp_path, layout, bad):
    with pytest.raises(DataFormatError, match=rf"case_seg\.nii\.gz.*\[{bad[-1]}\].*{layout}"):
        to_ordinal(np.array(bad), layout, "case_seg.nii.gz")


def test_wrong_label_set_in_file(tmp_path):
    _brats_case(tmp_path, "c1", ["t1", "t1ce", "t2", "flair"], "_", _seg([0, 1, 3]))
    with pytest.raises(DataFormatError, match=r"c1_seg\.nii\.gz: label values \[3\]"):
        read_case(list_cases(tmp_path)[0])


def test_missing_modality_names_file(tmp_path):
    folder = _brats_case(tmp_path, "c1", ["t1", "t1ce", "t2", "flair"], "_", _seg([0, 1]))
    (folder / "c1_t1ce.nii.gz").unlink()
    with pytest.raises(MissingFileError, match=r"c1_t1ce\.nii\.gz"):
        list_cases(tmp_path, "brats2018")


def test_mismatched_shape_and_affine_between_modalities(tmp_path):
    _brats_case(tmp_path / "a", "c1", ["t1", "t1ce", "t2", "flair"], "_", None, shapes={"t2": (6, 7, 6)})
    with pytest.raises(DataFormatError, match=r"c1_t2\.nii\.gz: shape \(6, 7, 6\)"):
        read_case(list_cases(tmp_path / "a")[0])
    folder = _brats_case(tmp_path / "b", "c1", ["t1", "t1ce", "t2", "flair"], "_", _seg([0, 2]))
    shifted = AFFINE.copy()
    shifted[0, 3] += 0.5
    _save(folder / "c1_seg.nii.gz", _seg([0, 2]), shifted)
    with pytest.raises(DataFormatError, match=r"c1_seg\.nii\.gz: affine differs.*0\.5 mm"):
        read_case(list_cases(tmp_path / "b")[0])


def test_preprocess_crop_zscore_and_uncrop():
    rng = np.random.default_rng(0)
    image = np.zeros((4, 10, 12, 9), np.float32)
    image[:, 2:7, 3:11, 1:5] = rng.uniform(1, 5, (4, 5, 8, 4))
    image[0, 2, 3, 1] = 0.0  # a zero voxel in one modality stays brain when others are non-zero
    label = np.zeros((10, 12, 9), np.uint8)
    label[3:5, 4:6, 2:4] = 3
    out = preprocess({"image": image, "label": label})
    assert out["bbox"].tolist() == [[2, 7], [3, 11], [1, 5]]
    crop = image[:, 2:7, 3:11, 1:5]
    ref = (crop - crop.reshape(4, -1).mean(1)[:, None, None, None]) / crop.reshape(4, -1).std(1)[:, None, None, None]
    np.testing.assert_allclose(out["image"], ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(uncrop(out["label"], out["bbox"], label.shape), label)


def test_write_prediction_keeps_geometry_and_brats_values(tmp_path):
    y = _seg([0, 1, 2, 3])
    path = write_prediction(tmp_path / "pred" / "c1.nii.gz", y, AFFINE, "brats2018")
    img = nib.load(str(path))
    np.testing.assert_allclose(img.affine, AFFINE)
    assert img.shape == SHAPE and img.get_data_dtype() == np.uint8
    seg = np.asarray(img.dataobj)
    assert set(np.unique(seg)) <= {0, 1, 2, 4}
    np.testing.assert_array_equal(seg, np.select([y == 1, y == 2, y == 3], [2, 1, 4], 0))


def test_phantom_deterministic_nested_and_varied():
    a, b, c = brain_phantom(7), brain_phantom(7), brain_phantom(8)
    for key in ("image", "label", "tissue"):
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["label"], c["label"])
    for ph in (a, c):
        y = ph["label"]
        assert set(np.unique(y)) == {0, 1, 2, 3}
        brain = np.any(ph["image"] != 0, 0)
        assert not np.any(y[~brain]) and np.all(ph["image"][:, ~brain] == 0)
        # the enhancing rim separates necrosis from oedema: no necrosis voxel touches oedema
        from scipy import ndimage

        assert not np.any(ndimage.binary_dilation(y == 2) & (y == 1))
    centres = [np.argwhere(brain_phantom(s)["label"] > 0).mean(0) for s in range(4)]
    assert np.ptp(np.array(centres), axis=0).max() > 3  # lesions move between cases


def test_phantom_no_single_modality_threshold_separates_lesions():
    """Brute force: the best threshold (either direction) on any single modality, chosen with the
    labels, stays far from a usable segmentation of every region."""
    phs = [brain_phantom(s) for s in range(4)]
    brain = [np.any(p["image"] != 0, 0) for p in phs]
    img = np.concatenate([p["image"][:, m] for p, m in zip(phs, brain)], 1)
    y = np.concatenate([p["label"][m] for p, m in zip(phs, brain)])
    for level, limit in ((1, 0.8), (2, 0.5), (3, 0.5)):
        t = y >= level
        for channel in range(4):
            v = img[channel]
            best = 0.0
            for th in np.quantile(v, np.linspace(0.01, 0.99, 99)):
                for p in (v > th, v < th):
                    best = max(best, 2 * np.sum(p & t) / (np.sum(p) + np.sum(t)))
            assert best < limit, (level, channel, best)


def test_phantoms_written_in_brats2018_layout_and_split(tmp_path):
    write_brats2018_phantoms(tmp_path, 5, seed=1, shape=(32, 32, 32))
    seg = np.asarray(nib.load(str(tmp_path / "Brats18_Phantom_002" / "Brats18_Phantom_002_seg.nii.gz")).dataobj)
    assert {0, 2, 4} <= set(np.unique(seg)) <= {0, 1, 2, 4}
    ph = brain_phantom(1 * 100003 + 2, (32, 32, 32))
    np.testing.assert_array_equal(seg, np.select([ph["label"] == 1, ph["label"] == 2, ph["label"] == 3], [2, 1, 4], 0))
    flair = nib.load(str(tmp_path / "Brats18_Phantom_002" / "Brats18_Phantom_002_flair.nii.gz")).get_fdata()
    np.testing.assert_allclose(flair, ph["image"][3], rtol=1e-6)
    train, val = BraTS(tmp_path, "train", n_folds=5), BraTS(tmp_path, "val", n_folds=5)
    names = [c.name for c in train.cases] + [c.name for c in val.cases]
    assert len(val) == 1 and sorted(names) == [f"Brats18_Phantom_{i:03d}" for i in range(5)]
    item = train[0]
    assert item["image"].shape[1:] == item["label"].shape and "bbox" in item


def test_writer_and_msd_listing_stay_inside_their_folders(tmp_path):
    """A case name or a dataset.json entry that climbs out of its folder is refused; nothing is written outside."""
    from threefold.datasets.brats import write_case_brats2018
    from threefold.datasets.paths import UnsafePathError

    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UnsafePathError, match=r"\.\./escape"):
        write_case_brats2018(out, "../escape", np.zeros((4, *SHAPE), np.float32), np.zeros(SHAPE, np.int64), AFFINE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and not any(out.iterdir())

    task = tmp_path / "Task01"
    (task / "imagesTr").mkdir(parents=True)
    _save(tmp_path / "outside.nii.gz", np.zeros(SHAPE, np.float32))
    for image in ("../outside.nii.gz", str(tmp_path / "outside.nii.gz"), "imagesTr/../../outside.nii.gz"):
        (task / "dataset.json").write_text(json.dumps({"training": [{"image": image, "label": image}]}))
        with pytest.raises(DataFormatError, match=r"training\[0\]\.image .* leaves the task folder"):
            list_cases(task, "msd")
