"""Classical SimpleITK registration: the field convention against SimpleITK's own resampling, and
recovery of the phantoms' known deformation (B-spline MI across contrasts, demons within one)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from threefold.datasets.errors import ConfigError, DataFormatError
from threefold.datasets.registration_phantoms import LABELS, RegistrationPhantoms
from threefold.medical.deformation import folding_percentage, jacobian_determinant
from threefold.medical.registration.classical import _field_to_ddf, _to_itk, register_classical
from threefold.medical.registration.warp import warp

sitk = pytest.importorskip("SimpleITK")


def test_field_convention_matches_simpleitk_resample():
    from scipy import ndimage

    rng = np.random.default_rng(0)
    moving = ndimage.gaussian_filter(rng.random((20, 24, 28)), 2).astype(np.float32)
    img = _to_itk(sitk, moving)
    tx = sitk.BSplineTransformInitializer(img, [3, 3, 3], order=3)
    tx.SetParameters(rng.normal(0, 1.5, len(tx.GetParameters())).tolist())
    ref = np.transpose(sitk.GetArrayFromImage(sitk.Resample(img, img, tx, sitk.sitkLinear, 0.0)), (2, 1, 0))
    field = sitk.TransformToDisplacementField(tx, sitk.sitkVectorFloat64, img.GetSize(), img.GetOrigin(),
                                              img.GetSpacing(), img.GetDirection())
    ddf = _field_to_ddf(sitk, field)
    assert ddf.shape == (3, 20, 24, 28)
    ours = warp(torch.from_numpy(moving)[None, None], ddf[None])[0, 0].numpy()
    inside = ref != 0  # ITK leaves samples outside the volume at 0; warp repeats the border
    assert inside.mean() > 0.8
    np.testing.assert_allclose(ours[inside], ref[inside], atol=1e-5)


@pytest.fixture(scope="module")
def pair():
    return RegistrationPhantoms(1, size=32, seed=0, split="test")[0]


def _epe(ddf, pair):
    brain = pair["fixed_label"][0] > 0
    return float((ddf - pair["ddf_true"]).norm(dim=0)[brain].mean())


def _dice_wm(ddf, pair):
    w = warp(pair["moving_label"][None], ddf[None], "nearest")[0] == LABELS["white_matter"]
    f = pair["fixed_label"] == LABELS["white_matter"]
    return float(2 * (w & f).sum() / (w.sum() + f.sum()))


def test_bspline_mi_recovers_cross_modal_deformation(pair):
    ddf = register_classical(pair["moving"], pair["fixed"], "bspline", iterations=5, threads=1)  # T1 -> b0
    assert ddf.shape == (3, 32, 32, 32) and ddf.dtype == torch.float32
    zero = torch.zeros_like(ddf)
    assert _epe(ddf, pair) < 0.75 * _epe(zero, pair)
    assert _dice_wm(ddf, pair) > _dice_wm(zero, pair) + 0.05
    assert float(folding_percentage(jacobian_determinant(ddf.double()))) < 1.0


def test_demons_recovers_same_contrast_deformation(pair):
    fixed = warp(pair["moving"][None], pair["ddf_true"][None])[0]  # T1 -> T1
    ddf = register_classical(pair["moving"][None], fixed[None], "demons")
    zero = torch.zeros_like(ddf)
    assert _epe(ddf, pair) < 0.6 * _epe(zero, pair)
    assert _dice_wm(ddf, pair) > _dice_wm(zero, pair) + 0.1


def test_bad_inputs():
    vol = np.random.default_rng(0).random((12, 12, 12))
    with pytest.raises(DataFormatError, match="one grid"):
        register_classical(vol, vol[:10])
    with pytest.raises(DataFormatError, match="constant"):
        register_classical(np.ones_like(vol), vol)
    with pytest.raises(DataFormatError, match="3-D"):
        register_classical(vol[0], vol[0])
    with pytest.raises(ConfigError, match="method"):
        register_classical(vol, vol, "syn")
