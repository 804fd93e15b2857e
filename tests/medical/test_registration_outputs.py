"""Results back in the fixed image's geometry: analytic translations, consistency of the voxel field
with the torch warp, and the written NIfTI files (affine, shapes, intent) read back with nibabel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from threefold.datasets.resample import resample_volume
from threefold.medical.registration.outputs import fixed_space_outputs, write_outputs
from threefold.medical.registration.warp import warp

nib = pytest.importorskip("nibabel")

FIXED_AFFINE = np.array([[-1.5, 0, 0, 30.0], [0, 1.2, 0, -20.0], [0, 0, 2.0, -16.0], [0, 0, 0, 1]])
FIXED_SHAPE = (20, 24, 14)


def _smooth(shape, seed):
    x = ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), 2.0)
    return (x - x.min()) / (x.max() - x.min())


def test_pure_translation_prealign():
    moving = _smooth((30, 30, 30), 0)
    m_aff = np.diag([1.0, 1.0, 1.0, 1.0])
    m_aff[:3, 3] = -15.0
    t = np.array([2.0, -3.0, 1.5])
    prealign = np.eye(4)
    prealign[:3, 3] = t
    grid = np.diag([1.1, 1.1, 1.1, 1.0])
    grid[:3, 3] = -17.0
    out = fixed_space_outputs(moving, m_aff, FIXED_SHAPE, FIXED_AFFINE, grid, np.zeros((3, 32, 32, 32)), prealign)
    np.testing.assert_allclose(out["displacement_mm"], np.broadcast_to(t, (*FIXED_SHAPE, 3)), atol=1e-5)
    expected_vox = np.linalg.inv(FIXED_AFFINE[:3, :3]) @ t  # mm -> fixed voxels (axis 0 flipped)
    np.testing.assert_allclose(out["displacement_vox"], np.broadcast_to(expected_vox, (*FIXED_SHAPE, 3)), atol=1e-5)
    np.testing.assert_allclose(out["jacobian"], 1.0, atol=1e-5)
    ref = resample_volume(moving, m_aff, FIXED_SHAPE, FIXED_AFFINE, world_transform=prealign)
    np.testing.assert_allclose(out["warped"], ref, atol=1e-5)


def test_grid_displacement_on_the_fixed_grid_is_the_voxel_field():
    # training grid == fixed grid: the voxel field is the grid field and warped == warp(moving, ddf)
    moving = _smooth(FIXED_SHAPE, 1).astype(np.float32)
    u = np.stack([np.full(FIXED_SHAPE, 1.0), np.full(FIXED_SHAPE, -2.0), np.full(FIXED_SHAPE, 0.5)])
    out = fixed_space_outputs(moving, FIXED_AFFINE, FIXED_SHAPE, FIXED_AFFINE, FIXED_AFFINE, u)
    np.testing.assert_allclose(np.moveaxis(out["displacement_vox"], -1, 0), u, atol=1e-5)
    np.testing.assert_allclose(out["displacement_mm"][0, 0, 0], FIXED_AFFINE[:3, :3] @ u[:, 0, 0, 0], atol=1e-5)
    ref = warp(torch.from_numpy(moving)[None, None], torch.from_numpy(u).float()[None])[0, 0].numpy()
    inner = (slice(1, -2), slice(3, -1), slice(1, -2))
    np.testing.assert_allclose(out["warped"][inner], ref[inner], atol=1e-5)


def test_voxel_field_reproduces_warped_with_the_torch_warp():
    from scipy.spatial.transform import Rotation

    moving = _smooth((36, 36, 36), 2)
    m_aff = np.diag([0.9, 0.9, 0.9, 1.0])
    m_aff[:3, 3] = -16.0
    prealign = np.eye(4)
    prealign[:3, :3] = Rotation.from_euler("z", 6, degrees=True).as_matrix()
    prealign[:3, 3] = [1.0, -0.5, 0.8]
    grid = np.diag([1.0, 1.0, 1.0, 1.0])
    grid[:3, 3] = -16.0
    rng = np.random.default_rng(3)
    ddf = np.stack([ndimage.gaussian_filter(rng.standard_normal((32, 32, 32)), 4) for _ in range(3)])
    ddf *= 2.0 / np.abs(ddf).max()
    f_aff = np.diag([-1.0, 1.0, 1.5, 1.0])  # a fixed field of view inside the moving one
    f_aff[:3, 3] = [10.0, -11.0, -10.0]
    f_shape = (20, 22, 14)
    out = fixed_space_outputs(moving, m_aff, f_shape, f_aff, grid, ddf, prealign)
    on_fixed = resample_volume(moving, m_aff, f_shape, f_aff)  # moving resampled, no transform
    u_vox = torch.from_numpy(np.moveaxis(out["displacement_vox"], -1, 0)).double()[None]
    again = warp(torch.from_numpy(on_fixed)[None, None], u_vox)[0, 0].numpy()
    inner = (slice(3, -3), slice(3, -3), slice(3, -3))
    err = np.abs(again[inner] - out["warped"][inner]).max()  # a second interpolation only
    moved = np.abs(on_fixed[inner] - out["warped"][inner]).max()
    assert err < 0.05 and moved > 5 * err, (err, moved)
    assert out["jacobian"].min() > 0


def test_written_files_have_the_fixed_affine(tmp_path):
    moving = _smooth((30, 30, 30), 4)
    out = fixed_space_outputs(moving, np.eye(4), FIXED_SHAPE, FIXED_AFFINE, np.eye(4), np.zeros((3, 32, 32, 32)))
    paths = write_outputs(tmp_path, out, FIXED_AFFINE)
    assert sorted(p.name for p in paths.values()) == sorted(
        ["warped.nii.gz", "displacement.nii.gz", "displacement_vox.nii.gz", "jacobian.nii.gz"])
    for name, shape in (("warped", FIXED_SHAPE), ("jacobian", FIXED_SHAPE), ("displacement", (*FIXED_SHAPE, 3)),
                        ("displacement_vox", (*FIXED_SHAPE, 3))):
        img = nib.load(tmp_path / f"{name}.nii.gz")
        assert img.shape == shape, name
        np.testing.assert_allclose(img.affine, FIXED_AFFINE, atol=1e-6)
        np.testing.assert_allclose(img.header.get_sform(), FIXED_AFFINE, atol=1e-6)
    disp = nib.load(tmp_path / "displacement.nii.gz")
    assert disp.header.get_intent()[0] == "displacement vector"
    np.testing.assert_allclose(np.asarray(disp.dataobj), out["displacement_mm"], atol=1e-6)
