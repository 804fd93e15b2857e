"""NIfTI reading/writing with nibabel as the independent writer/reader, geometry checked analytically
(world coordinates of every voxel), and the validation errors the issue lists."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from threefold.datasets.errors import DataFormatError, MissingFileError
from threefold.datasets.registry import get_dataset
from threefold.datasets.volumes import NiftiFolder, read_nifti, spacing_from_affine, write_nifti

nib = pytest.importorskip("nibabel")

RNG = np.random.default_rng(3)
VOL = RNG.normal(size=(5, 6, 7)).astype(np.float32)
# an oblique LPS-like affine: x flipped, y/z mixed by a rotation, anisotropic voxels (mm)
_R = np.array([[-1.0, 0, 0], [0, np.cos(0.3), -np.sin(0.3)], [0, np.sin(0.3), np.cos(0.3)]])
AFFINE = np.eye(4)
AFFINE[:3, :3] = _R @ np.diag([0.8, 1.2, 2.5])
AFFINE[:3, 3] = [40.0, -20.0, 10.0]


def _save(path, data, affine=AFFINE):
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def _world(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    return idx @ affine[:3, :3].T + affine[:3, 3]


@pytest.mark.parametrize("name", ["v.nii", "v.nii.gz"])
def test_read_3d_and_4d(tmp_path, name):
    s = read_nifti(_save(tmp_path / name, VOL))
    assert s["image"].shape == (1, 5, 6, 7) and s["image"].dtype == torch.float32
    assert np.array_equal(s["image"][0].numpy(), VOL)
    assert np.allclose(s["affine"].numpy(), AFFINE) and s["affine"].dtype == torch.float64
    assert np.allclose(s["spacing"].numpy(), [0.8, 1.2, 2.5])
    four = np.stack([VOL, 2 * VOL, 3 * VOL], axis=-1)
    s4 = read_nifti(_save(tmp_path / f"four_{name}", four))
    assert s4["image"].shape == (3, 5, 6, 7) and np.array_equal(s4["image"][2].numpy(), 3 * VOL)


def test_scaling_and_integer_labels(tmp_path):
    img = nib.Nifti1Image(np.arange(210, dtype=np.int16).reshape(5, 6, 7), AFFINE)
    img.header.set_slope_inter(0.5, 10.0)
    nib.save(img, tmp_path / "s.nii")
    assert np.allclose(read_nifti(tmp_path / "s.nii")["image"][0].numpy(), np.arange(210).reshape(5, 6, 7) * 0.5 + 10)
    lab = read_nifti(_save(tmp_path / "l.nii", np.arange(210, dtype=np.uint8).reshape(5, 6, 7) % 4),
                     dtype=torch.int64)["image"]
    assert lab.dtype == torch.int64 and lab.flatten().tolist() == (np.arange(210) % 4).tolist()
    with pytest.raises(DataFormatError, match="not integers"):
        read_nifti(_save(tmp_path / "f.nii", VOL), dtype=torch.int64)


def test_canonical_keeps_every_voxel_at_its_world_position(tmp_path):
    s = read_nifti(_save(tmp_path / "o.nii.gz", VOL), canonical=True)
    aff = s["affine"].numpy()
    # RAS+: the closest-canonical axes point right, anterior, superior (positive diagonal dominance)
    assert np.all(np.argmax(np.abs(aff[:3, :3]), axis=0) == [0, 1, 2]) and np.all(np.diag(aff[:3, :3]) > 0)
    new_world = _world(aff, s["image"].shape[1:])
    old_world = _world(AFFINE, VOL.shape)
    # brute force: each new voxel matches the old voxel at the same world point, with the same value
    d = ((new_world[:, None, :] - old_world[None, :, :]) ** 2).sum(-1)
    match = d.argmin(1)
    assert np.allclose(d.min(1), 0, atol=1e-8)
    assert np.array_equal(s["image"][0].numpy().reshape(-1), VOL.reshape(-1)[match])


def test_errors(tmp_path):
    with pytest.raises(MissingFileError, match="gone.nii"):
        read_nifti(tmp_path / "gone.nii")
    with pytest.raises(DataFormatError, match=r"x\.img.*not a NIfTI"):
        read_nifti(tmp_path / "x.img")
    with pytest.raises(DataFormatError, match=r"flat\.nii.*2 dimensions"):
        read_nifti(_save(tmp_path / "flat.nii", VOL[0]))
    with pytest.raises(DataFormatError, match=r"five\.nii.*5 dimensions"):
        read_nifti(_save(tmp_path / "five.nii", VOL[..., None, None].repeat(2, -1).repeat(2, -2)))
    nan = VOL.copy()
    nan[1, 2, 3] = np.nan
    with pytest.raises(DataFormatError, match=r"nan\.nii.*NaN/inf.*\(1, 2, 3\)"):
        read_nifti(_save(tmp_path / "nan.nii", nan))
    raw = _save(tmp_path / "ok.nii", VOL).read_bytes()
    (tmp_path / "cut.nii").write_bytes(raw[:-5])
    with pytest.raises(DataFormatError, match=r"cut\.nii.*truncated"):
        read_nifti(tmp_path / "cut.nii")
    (tmp_path / "cut.nii.gz").write_bytes(gzip.compress(raw[:-5]))
    with pytest.raises(DataFormatError, match=r"cut\.nii\.gz.*truncated"):
        read_nifti(tmp_path / "cut.nii.gz")
    # NIfTI-1 header: dim[0..7] are int16 at byte 40; declare a 30000^3 volume in a tiny file
    big = bytearray(raw)
    big[40:56] = struct.pack("<8h", 3, 30000, 30000, 30000, 1, 1, 1, 1)
    (tmp_path / "big.nii.gz").write_bytes(gzip.compress(bytes(big)))
    with pytest.raises(DataFormatError, match=r"big\.nii\.gz.*(truncated|max_bytes)"):
        read_nifti(tmp_path / "big.nii.gz", max_bytes=1 << 50)
    (tmp_path / "junk.nii").write_bytes(b"\x00" * 10)
    with pytest.raises(DataFormatError, match="junk.nii"):
        read_nifti(tmp_path / "junk.nii")


def test_write_back_in_original_geometry(tmp_path):
    pred = torch.from_numpy((VOL > 0).astype(np.int64))[None]
    out = write_nifti(tmp_path / "pred.nii.gz", pred, torch.from_numpy(AFFINE))
    back = nib.load(out)  # nibabel reads it back independently
    assert np.allclose(back.affine, AFFINE) and int(back.header["sform_code"]) == 1
    assert np.array_equal(np.asanyarray(back.dataobj), (VOL > 0).astype(np.int32))
    with pytest.raises(DataFormatError, match="int32"):
        write_nifti(tmp_path / "x.nii", torch.full((2, 2, 2), 2**40), AFFINE)
    assert np.allclose(spacing_from_affine(AFFINE).numpy(), [0.8, 1.2, 2.5])


def test_nifti_folder(tmp_path):
    (tmp_path / "val" / "images").mkdir(parents=True)
    (tmp_path / "val" / "labels").mkdir()
    _save(tmp_path / "val" / "images" / "case1.nii.gz", VOL)
    _save(tmp_path / "val" / "labels" / "case1.nii.gz", (VOL > 0).astype(np.uint8))
    entry = get_dataset("nifti-folder")
    assert entry.cls is NiftiFolder and entry.modality == "volume"
    ds = entry.cls(tmp_path, split="val")
    s = ds[0]
    assert s["name"] == "case1" and s["label"].shape == (1, 5, 6, 7) and s["label"].dtype == torch.int64
    assert np.array_equal(s["label"][0].numpy(), (VOL > 0).astype(np.int64))
    _save(tmp_path / "val" / "labels" / "case1.nii.gz", (VOL[:4] > 0).astype(np.uint8))
    with pytest.raises(DataFormatError, match="does not match image"):
        ds[0]
    shifted = AFFINE.copy()
    shifted[0, 3] += 1.0
    _save(tmp_path / "val" / "labels" / "case1.nii.gz", (VOL > 0).astype(np.uint8), shifted)
    with pytest.raises(DataFormatError, match="affine differs"):
        ds[0]
    with pytest.raises(MissingFileError, match="train"):
        NiftiFolder(tmp_path, split="train")
