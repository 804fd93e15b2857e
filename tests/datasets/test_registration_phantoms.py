"""Registration phantoms: label consistency under the torch warp, a diffeomorphic ground truth of the
documented size, inverted T1 / b0 contrasts, determinism and independent splits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from threefold.datasets.errors import ConfigError
from threefold.datasets.registration_phantoms import LABELS, RegistrationPhantoms, registration_phantom
from threefold.datasets.registry import get_dataset
from threefold.medical.deformation import jacobian_determinant
from threefold.medical.registration.warp import integrate_velocity, warp


@pytest.fixture(scope="module")
def pair64():
    return RegistrationPhantoms(1, size=64, seed=3, split="train")[0]


def test_item_keys_shapes_and_ranges(pair64):
    s = pair64
    assert s["moving"].shape == s["fixed"].shape == (1, 64, 64, 64)
    assert s["moving"].dtype == s["fixed"].dtype == torch.float32
    assert s["moving_label"].dtype == s["fixed_label"].dtype == torch.int64
    assert s["ddf_true"].shape == (3, 64, 64, 64) and s["ddf_true"].dtype == torch.float32
    assert s["affine"].shape == (4, 4) and s["affine"].dtype == torch.float64
    assert s["subject"] == "phantom-train-0000"
    for k in ("moving", "fixed"):
        assert s[k].min() == 0.0 and s[k].max() == 1.0
    assert set(torch.unique(s["moving_label"]).tolist()) == set(LABELS.values())


def test_fixed_label_is_moving_label_warped_by_truth(pair64):
    # the generator uses SciPy; this is the torch (MONAI-convention) warp the models use
    warped = warp(pair64["moving_label"][None], pair64["ddf_true"][None], mode="nearest")[0]
    assert torch.equal(warped, pair64["fixed_label"])
    # and the deformation is not trivial: without it white matter overlaps much less
    wm = LABELS["white_matter"]
    a, b = pair64["moving_label"] == wm, pair64["fixed_label"] == wm
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) < 0.95


def test_ground_truth_is_diffeomorphic_with_documented_size():
    ph = registration_phantom((3, 1, 0), size=64, max_displacement_vox=4.0)
    ddf = torch.from_numpy(ph["ddf_true"]).double()[None]
    norm = ddf.norm(dim=1)
    assert 3.8 <= norm.max() <= 4.2 and 0.5 < norm.mean() < 2.0
    jac = jacobian_determinant(ddf)
    assert jac.min() > 0.2
    # the SciPy integration agrees with the torch scaling and squaring (= MONAI DVF2DDF) of its SVF,
    # up to the 2e-3-voxel nudge away from rounding ties
    ref = integrate_velocity(torch.from_numpy(ph["svf"])[None], steps=7)
    assert (ref - ddf).abs().max() < 3e-3


def test_contrasts_are_inverted_between_t1_and_b0(pair64):
    def means(image, label):
        return {name: float(image[label == code].mean()) for name, code in LABELS.items()}

    t1 = means(pair64["moving"], pair64["moving_label"])
    b0 = means(pair64["fixed"], pair64["fixed_label"])
    assert t1["white_matter"] > t1["grey_matter"] > t1["csf"] > t1["background"]
    assert t1["white_matter"] > t1["ventricles"] + 0.3
    assert b0["ventricles"] > b0["grey_matter"] > b0["white_matter"]
    assert b0["ventricles"] > b0["white_matter"] + 0.3
    # a cross-modal pair: T1 and b0 intensities are anti-correlated inside the brain once aligned
    inside = pair64["fixed_label"][0] > 0
    unwarp_t1 = warp(pair64["moving"][None], pair64["ddf_true"][None])[0, 0]
    corr = np.corrcoef(unwarp_t1[inside].numpy(), pair64["fixed"][0][inside].numpy())[0, 1]
    assert corr < -0.2


def test_deterministic_and_splits_independent():
    a = RegistrationPhantoms(2, size=32, seed=7, split="val")
    b = RegistrationPhantoms(2, size=32, seed=7, split="val", cache=True)
    c = RegistrationPhantoms(2, size=32, seed=7, split="test")
    assert torch.equal(a[1]["fixed"], b[1]["fixed"]) and torch.equal(a[1]["ddf_true"], b[1]["ddf_true"])
    assert torch.equal(b[1]["moving"], b[1]["moving"])  # second read from the cache
    assert not torch.equal(a[0]["moving"], a[1]["moving"])
    assert not torch.equal(a[0]["moving"], c[0]["moving"])
    assert len(a) == 2
    with pytest.raises(IndexError):
        a[2]


def test_registered_and_bad_options():
    assert get_dataset("registration-phantoms").cls is RegistrationPhantoms
    with pytest.raises(ConfigError, match="split"):
        RegistrationPhantoms(2, split="training")
    with pytest.raises(ConfigError, match="size"):
        RegistrationPhantoms(2, size=16)
    with pytest.raises(ConfigError, match="max_displacement_vox"):
        RegistrationPhantoms(2, max_displacement_vox=0.0)
    with pytest.raises(ConfigError, match="n_pairs"):
        RegistrationPhantoms(0)
