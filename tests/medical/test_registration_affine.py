"""Affine pre-alignment: ITK geometry against a NIfTI read by SimpleITK itself, the RAS world matrix
against SimpleITK's own resampling, and recovery of a known rigid transform across contrasts
(acceptance 3 of issue 6: within 1 mm and 1°)."""

from __future__ import annotations

import numpy as np
import pytest

from threefold.datasets.errors import ConfigError, DataFormatError
from threefold.datasets.registration_phantoms import registration_phantom
from threefold.datasets.resample import resample_volume
from threefold.medical.registration.affine import (
    _world_matrix_ras,
    register_affine,
    rotation_angle_deg,
    to_sitk,
)

sitk = pytest.importorskip("SimpleITK")
nib = pytest.importorskip("nibabel")


def _oblique_affine(spacing, angles_deg, origin):
    from scipy.spatial.transform import Rotation

    a = np.eye(4)
    a[:3, :3] = Rotation.from_euler("xyz", angles_deg, degrees=True).as_matrix() @ np.diag(spacing)
    a[:3, :3] = np.diag([-1.0, 1.0, 1.0]) @ a[:3, :3]  # an axis flip as well
    a[:3, 3] = origin
    return a


def test_to_sitk_geometry_equals_simpleitk_reading_the_nifti(tmp_path):
    affine = _oblique_affine([1.5, 0.9, 2.5], [10.0, -20.0, 5.0], [12.0, -30.0, 7.5])
    data = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    nib.save(img, tmp_path / "x.nii.gz")
    ref = sitk.ReadImage(str(tmp_path / "x.nii.gz"))
    ours = to_sitk(data, affine)
    np.testing.assert_allclose(ours.GetSpacing(), ref.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(ours.GetOrigin(), ref.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(ours.GetDirection(), ref.GetDirection(), atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(ref))


def test_world_matrix_resamples_like_simpleitk():
    # an ITK transform (on LPS points) turned into a RAS matrix must resample exactly as ITK does
    rng = np.random.default_rng(1)
    moving = rng.random((20, 22, 18))
    from scipy import ndimage

    moving = ndimage.gaussian_filter(moving, 2.0)
    m_aff = _oblique_affine([1.0, 1.2, 1.1], [0.0, 0.0, 8.0], [-10.0, -12.0, -9.0])
    f_aff = _oblique_affine([1.4, 1.0, 1.3], [5.0, 3.0, 0.0], [-9.0, -11.0, -10.0])
    f_shape = (14, 20, 15)
    tx = sitk.Euler3DTransform()
    tx.SetCenter((1.0, 2.0, -3.0))
    tx.SetRotation(0.05, -0.04, 0.03)
    tx.SetTranslation((1.5, -0.5, 2.0))
    ref_img = sitk.Resample(to_sitk(moving.astype(np.float32), m_aff), to_sitk(np.zeros(f_shape, np.float32), f_aff),
                            tx, sitk.sitkLinear, 0.0)
    ref = np.transpose(sitk.GetArrayFromImage(ref_img), (2, 1, 0))
    ours = resample_volume(moving, m_aff, f_shape, f_aff, world_transform=_world_matrix_ras(tx))
    # ITK also samples up to half a voxel beyond the moving volume's edge voxels (clamping), where
    # resample_volume returns cval: compare where both sampled
    inside = (ref != 0) & (ours != 0)
    assert inside.mean() > 0.5 and ((ref != 0) != (ours != 0)).mean() < 0.15
    np.testing.assert_allclose(ours[inside], ref[inside], atol=1e-4)


@pytest.mark.parametrize("transform", ["rigid", "affine"])
def test_rigid_transform_recovered_within_1mm_and_1deg(transform):
    from scipy.spatial.transform import Rotation

    ph = registration_phantom(11, size=64, max_displacement_vox=1e-4)  # T1-like and b0-like, aligned
    a_m = ph["affine"]
    centre = (a_m @ np.array([31.5, 31.5, 31.5, 1.0]))[:3]
    rot = Rotation.from_euler("xyz", [4.0, -3.0, 5.0], degrees=True).as_matrix()
    truth = np.eye(4)  # fixed world -> moving world: a rotation about the brain centre and a shift in mm
    truth[:3, :3] = rot
    truth[:3, 3] = centre - rot @ centre + np.array([3.0, -2.0, 4.0])
    spacing = np.array([1.5, 1.2, 2.5])  # non-isotropic fixed voxels; the moving image has 1 mm voxels
    shape = tuple(int(s) for s in np.ceil(70.0 / spacing))
    a_f = np.diag([*spacing, 1.0])
    a_f[:3, 3] = centre - spacing * (np.asarray(shape) - 1) / 2.0
    fixed = resample_volume(ph["fixed"], a_m, shape, a_f, world_transform=truth)  # b0-like contrast

    res = register_affine(ph["moving"], a_m, fixed, a_f, transform=transform)  # T1-like moving
    assert res.stages == (("rigid",) if transform == "rigid" else ("rigid", "affine"))
    points = a_f @ np.vstack([np.indices(shape).reshape(3, -1), np.ones((1, int(np.prod(shape))))])
    brain = fixed.reshape(-1) > 0.1
    error_mm = np.linalg.norm((res.matrix @ points - truth @ points)[:3], axis=0)[brain]
    angle = rotation_angle_deg(res.matrix[:3, :3] @ truth[:3, :3].T)
    assert error_mm.max() < 1.0, error_mm.max()
    assert angle < 1.0, angle
    # doing nothing is far off: the test can fail
    assert np.linalg.norm((points - truth @ points)[:3], axis=0)[brain].mean() > 4.0


def test_bad_inputs():
    vol, aff = np.random.default_rng(0).random((8, 8, 8)), np.eye(4)
    with pytest.raises(DataFormatError, match="constant"):
        register_affine(np.zeros((8, 8, 8)), aff, vol, aff)
    with pytest.raises(DataFormatError, match="3-D"):
        register_affine(vol[0], aff, vol, aff)
    sheared = np.eye(4)
    sheared[0, 1] = 0.5
    with pytest.raises(DataFormatError, match="shear"):
        register_affine(vol, sheared, vol, aff)
    with pytest.raises(ConfigError, match="transform"):
        register_affine(vol, aff, vol, aff, transform="similarity")
    with pytest.raises(DataFormatError, match="empty"):
        register_affine(vol, aff, vol, aff, fixed_mask=np.zeros((8, 8, 8)))
