"""HCP-style reader on small NIfTI files written here with nibabel: mean b0 from bvals (b0 not volume
0), canonical orientation, the preprocessing chain's geometry, pairs files, and clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from threefold.datasets.errors import ConfigError, DataFormatError, MissingFileError
from threefold.datasets.hcp import HCPRegistration, read_mean_b0
from threefold.datasets.registration_transforms import MinMaxNormalize
from threefold.datasets.registry import get_dataset

nib = pytest.importorskip("nibabel")

BVALS = np.array([1000.0, 5.0, 2000.0, 0.0, 995.0, 10.0])  # b0 volumes are 1, 3 and 5
T1_AFFINE = np.array([[-1.0, 0, 0, 12.0], [0, 1.0, 0, -14.0], [0, 0, 1.0, -12.0], [0, 0, 0, 1]])  # LAS
DWI_AFFINE = np.array([[2.0, 0, 0, -12.0], [0, 2.0, 0, -14.0], [0, 0, 2.0, -12.0], [0, 0, 0, 1]])  # RAS


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    return path


def _world(affine, shape):
    idx = np.indices(shape).reshape(3, -1)
    return (affine[:3, :3] @ idx + affine[:3, 3:4]).reshape(3, *shape)


def _subject(root: Path, name: str, seed: int, bvals=BVALS, mask=True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    t1 = rng.random((24, 28, 24)).astype(np.float32)
    dwi = rng.random((12, 14, 12, len(bvals))).astype(np.float32) * 100
    # the b0 volumes: a linear function of world position (plus a per-volume offset) so resampling is checkable
    w = _world(DWI_AFFINE, (12, 14, 12))
    for v in np.flatnonzero(bvals <= 50):
        dwi[..., v] = 200 + 3 * w[0] - 2 * w[1] + w[2] + v
    base = root / name / "T1w"
    _save(base / "T1w_acpc_dc_restore_brain.nii.gz", t1, T1_AFFINE)
    _save(base / "Diffusion" / "data.nii.gz", dwi, DWI_AFFINE)
    (base / "Diffusion" / "bvals").write_text(" ".join(f"{b:g}" for b in bvals) + "\n")
    bvecs = rng.standard_normal((3, len(bvals)))
    (base / "Diffusion" / "bvecs").write_text("\n".join(" ".join(f"{x:.6f}" for x in row) for row in bvecs) + "\n")
    if mask:
        m = np.zeros((12, 14, 12), np.uint8)
        m[2:10, 3:11, 2:9] = 1
        _save(base / "Diffusion" / "nodif_brain_mask.nii.gz", m, DWI_AFFINE)
    return {"t1": t1, "dwi": dwi}


def test_mean_b0_uses_bvals_not_volume_0(tmp_path):
    data = _subject(tmp_path, "100307", 0)
    d = tmp_path / "100307" / "T1w" / "Diffusion"
    out = read_mean_b0(d / "data.nii.gz", d / "bvals", bvecs_path=d / "bvecs")
    assert out["b0_indices"].tolist() == [1, 3, 5]
    expected = data["dwi"][..., [1, 3, 5]].astype(np.float64).mean(axis=-1)
    np.testing.assert_allclose(out["image"][0].numpy(), expected, rtol=1e-6)
    assert not np.allclose(out["image"][0].numpy(), data["dwi"][..., 0])
    np.testing.assert_allclose(out["affine"].numpy(), DWI_AFFINE)
    assert out["spacing"].tolist() == [2.0, 2.0, 2.0]
    # a stricter threshold keeps b = 0 and 5 only
    assert read_mean_b0(d / "data.nii.gz", d / "bvals", b0_threshold=5.0)["b0_indices"].tolist() == [1, 3]


def test_dataset_item_geometry_and_ranges(tmp_path):
    data = _subject(tmp_path, "100307", 0)
    _subject(tmp_path, "100408", 1)
    ds = HCPRegistration(tmp_path, size=32, split=None, margin_mm=None)
    assert [p["subject"] for p in ds.pairs] == ["100307", "100408"]
    item = ds[0]
    for key in ("moving", "fixed"):
        assert item[key].shape == (1, 32, 32, 32) and item[key].dtype == torch.float32
        assert float(item[key].min()) == 0.0 and float(item[key].max()) == 1.0
    assert item["fixed_mask"].dtype == torch.bool and item["fixed_mask"].any()
    assert item["fixed_shape"].tolist() == [12, 14, 12]
    np.testing.assert_allclose(item["fixed_affine"].numpy(), DWI_AFFINE)
    assert item["subject"] == "100307"
    # the grid covers the b0 field of view (28 mm along j) with isotropic voxels
    grid = item["affine"].numpy()
    np.testing.assert_allclose(np.linalg.norm(grid[:3, :3], axis=0), 28.0 / 32)
    # the raw pair: T1w reoriented from LAS to RAS (i axis flipped)
    raw = ds.read_pair(0)
    np.testing.assert_array_equal(raw["moving"][0].numpy(), data["t1"][::-1])
    assert raw["moving_affine"][0, 0] > 0
    # fixed on the grid = the linear world function of the b0s, masked, min-max scaled
    w = _world(grid, (32, 32, 32))
    mean_offset = np.mean([1, 3, 5])
    expected = 200 + 3 * w[0] - 2 * w[1] + w[2] + mean_offset
    fixed, mask = item["fixed"][0].numpy(), item["fixed_mask"][0].numpy()
    raw_mask = raw["fixed_mask"][0].numpy()
    # inside the mask (interior of the field of view) trilinear interpolation of a linear function is
    # exact; outside it the image is 0, so min-max maps 0 -> 0 and the brain maximum -> 1
    np.testing.assert_allclose(fixed[mask], expected[mask] / expected[mask].max(), rtol=1e-5)
    assert (fixed[~mask] == 0).all()
    assert mask.sum() > 0.5 * raw_mask.sum() * (2.0 / (28.0 / 32)) ** 3  # the mask kept its volume roughly


def test_mask_margin_crops_the_grid(tmp_path):
    _subject(tmp_path, "100307", 0)
    item = HCPRegistration(tmp_path, size=32, split=None, margin_mm=2.0)[0]
    # mask bounding box 8 x 8 x 7 voxels of 2 mm, plus 1 voxel each side -> 20 mm longest
    np.testing.assert_allclose(np.linalg.norm(item["affine"][:3, :3].numpy(), axis=0), 20.0 / 32)


def test_minmax_equals_monai_scale_intensity():
    transforms = pytest.importorskip("monai.transforms")
    x = torch.randn(1, 5, 6, 7) * 3 + 2
    ours = MinMaxNormalize()({"moving": x, "fixed": x * 2})["moving"]
    ref = transforms.ScaleIntensity(minv=0.0, maxv=1.0)(x)
    torch.testing.assert_close(ours, torch.as_tensor(ref), atol=1e-6, rtol=0)


def test_splits_pairs_file_and_cache(tmp_path):
    for i in range(5):
        _subject(tmp_path, f"s{i}", i, mask=False)
    parts = [HCPRegistration(tmp_path, size=32, split=s, split_fractions=(0.6, 0.2, 0.2)) for s in ("train", "val", "test")]
    names = [[p["subject"] for p in ds.pairs] for ds in parts]
    assert sorted(sum(names, [])) == [f"s{i}" for i in range(5)] and [len(n) for n in names] == [3, 1, 1]

    d = "s1/T1w/Diffusion"
    (tmp_path / "pairs.txt").write_text(
        f"# subject, moving + dwi + bvals, moving + 3-D fixed\ns0\ns1/T1w/T1w_acpc_dc_restore_brain.nii.gz "
        f"{d}/data.nii.gz {d}/bvals\ns2/T1w/T1w_acpc_dc_restore_brain.nii.gz s2/b0.nii.gz\n")
    _save(tmp_path / "s2" / "b0.nii.gz", np.random.default_rng(9).random((12, 14, 12)).astype(np.float32), DWI_AFFINE)
    ds = HCPRegistration(tmp_path, size=32, split=None, pairs_file="pairs.txt", cache_dir=tmp_path / "cache")
    assert len(ds) == 3 and ds.pairs[0]["subject"] == "s0" and "dwi" in ds.pairs[1] and "fixed" in ds.pairs[2]
    first = ds[2]
    again = ds[2]  # from the cache
    assert first["fixed"].shape == (1, 32, 32, 32)
    torch.testing.assert_close(first["moving"], again["moving"])
    assert again["subject"] == first["subject"]
    assert any((tmp_path / "cache" / "hcp-pairs").rglob("*.entry"))


def test_registered_and_errors(tmp_path):
    assert get_dataset("hcp").cls is HCPRegistration
    _subject(tmp_path, "a", 0)
    d = tmp_path / "a" / "T1w" / "Diffusion"
    (d / "bvals").write_text("1000 5 2000\n")
    with pytest.raises(DataFormatError, match="6 volumes but .* 3 b-values"):
        HCPRegistration(tmp_path, size=32, split=None)[0]
    (d / "bvals").write_text("1000 500 2000 900 1000 700\n")
    with pytest.raises(DataFormatError, match="no b-value <= 50"):
        HCPRegistration(tmp_path, size=32, split=None)[0]
    (d / "bvals").write_text("1000 x 2000 0 1000 10\n")
    with pytest.raises(DataFormatError, match="numbers"):
        HCPRegistration(tmp_path, size=32, split=None)[0]
    (d / "bvals").write_text(" ".join(f"{b:g}" for b in BVALS))
    (d / "bvecs").write_text("1 0 0\n0 1 0\n")
    with pytest.raises(DataFormatError, match="bvecs has shape"):
        HCPRegistration(tmp_path, size=32, split=None)[0]
    (d / "bvecs").unlink()  # optional: skipped when absent
    assert HCPRegistration(tmp_path, size=32, split=None)[0]["fixed"].shape == (1, 32, 32, 32)
    (d / "data.nii.gz").unlink()
    with pytest.raises(MissingFileError, match="no dwi file"):
        HCPRegistration(tmp_path, size=32, split=None)
    with pytest.raises(MissingFileError, match="no registration pairs"):
        HCPRegistration(tmp_path, size=32, split=None, layout={"moving": "{subject}/anat/T1w.nii.gz"})
    with pytest.raises(ConfigError, match="unknown layout keys"):
        HCPRegistration(tmp_path, layout={"t2": "x"})
    with pytest.raises(ConfigError, match="split"):
        HCPRegistration(tmp_path, split="training")
    other = tmp_path / "other"
    _save(other / "b" / "T1w" / "T1w_acpc_dc_restore_brain.nii.gz", np.zeros((4, 4, 4, 2), np.float32), T1_AFFINE)
    _save(other / "b" / "b0.nii.gz", np.ones((4, 4, 4), np.float32), DWI_AFFINE)
    with pytest.raises(DataFormatError, match="expected a 3-D T1w"):
        HCPRegistration(other, split=None, layout={"fixed": "{subject}/b0.nii.gz"}).read_pair(0)
    with pytest.raises(MissingFileError, match="pairs file"):
        HCPRegistration(tmp_path, pairs_file="nope.txt")
